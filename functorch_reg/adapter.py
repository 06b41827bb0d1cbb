"""A ``torch.optim.Optimizer`` that runs a functional update rule in place.

:class:`TorchOptimizer` puts :func:`~functorch_reg.sgd`, :func:`~functorch_reg.adam` or
:func:`~functorch_reg.adamw` behind the ``torch.optim`` interface, so that an existing
training loop, LR scheduler and checkpoint code use it unchanged. This module keeps that
protocol (param groups, hyperparameters, ``step``, ``zero_grad``, the checkpoint format);
where each group's state lives, per param or in one flat buffer, is
``functorch_reg._adapter_groups``'s job.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, StateDict

from ._adapter_groups import FlatGroup, Gathered, GroupState, LeafGroup, check_flat_rule, param_tree
from ._compile_log import Announced
from .optim.base import Optimizer, State, check_optimizer

__all__ = ["TorchOptimizer"]

# Bookkeeping that torch.optim.lr_scheduler and swa_utils keep in param groups.
_SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
)
_GROUP_KEYS = frozenset({"params", "param_names"})
# Hyperparameters of torch.optim's and functorch_reg's rules, and other libraries' names
# for them: in a group of a rule that does not take them, they are a mistake, not a tag.
_HYPERPARAMETER_NAMES = frozenset(
    {
        "lr", "learning_rate", "betas", "beta1", "beta2", "eps", "epsilon",
        "weight_decay", "wd", "momentum", "dampening", "nesterov", "amsgrad",
        "maximize", "alpha", "centered", "rho", "lr_decay", "momentum_decay",
        "decoupled_weight_decay", "prox_strength",
    }
)  # fmt: skip


class TorchOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is a functional update rule, in place.

    Each param group's hyperparameters (``lr``, ``betas``, ``weight_decay``, ...) default
    to the functional optimizer's and are passed to ``optimizer.step_`` as per-call
    overrides, so per-group settings, LR schedulers (``torch.optim.lr_scheduler``,
    including momentum cycling) and ``zero_grad`` behave as with ``torch.optim``. One
    difference: under a schedule of the betas, Adam's bias correction uses their running
    product (see :func:`~functorch_reg.adam`), where ``torch.optim.Adam`` uses
    ``beta ** step`` with the current beta.

    State lives in ``self.state[param]`` under the functional state's field names
    (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``beta_powers`` for Adam;
    ``momentum_buffer``, ``count`` for SGD) plus ``skipped``, the group's count of
    skipped non-finite steps, shared by the group's params. It is created on a param's
    first gradient, as in ``torch.optim``, so ``state_dict``/``load_state_dict`` and
    ``torch.load(weights_only=True)`` work, and a resumed run is bit-identical.

    A param whose ``.grad`` is ``None`` is frozen: neither it nor its state changes. A
    ``requires_grad=False`` param never gets a gradient, so it is never updated or
    decayed and gets no state, with ``flat=True`` too, as with ``torch.optim``.

    Group keys that are not hyperparameters (Lightning's ``"name"``, timm's
    ``"lr_scale"``, a scheduler's ``"initial_lr"``) are kept in ``param_groups`` and
    ``state_dict`` and not passed to the rule, as in ``torch.optim``. A key that is a
    hyperparameter of another rule (``"momentum"`` for Adam), another library's name
    for one (``"wd"``, ``"learning_rate"``) or a near-miss of one this rule takes
    (``"weight_deacy"``) is refused.
    When params are given as ``model.named_parameters()``, the functional optimizer's
    ``mask`` globs see their names; otherwise a group's leaves are named ``"0"``,
    ``"1"``, ... by position, so prefer predicate masks (``fr.select.weights()``) or
    per-group ``weight_decay``. The mask applies within each group: a glob must match
    a leaf of every group.

    With ``compile=True`` the update of all groups is one ``torch.compile(fullgraph=True)``
    graph, compiled on the first step. Hyperparameters then reach it as 0-d float32
    tensors on the params' device (``fill_``-ed from the groups' values before each
    step), so a scheduler that changes them every step never recompiles; a Python zero
    other than ``lr`` is passed as a literal, which compiles the term out as in the
    functional API. Eager steps pass the groups' values as they are. A change in which
    params have gradients, or a hyperparameter moving to or from exactly zero,
    compiles a new graph.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param group dicts, as for any
            ``torch.optim.Optimizer``.
        optimizer: a functional optimizer, e.g. ``fr.adamw(lr=1e-3)``; its
            hyperparameters are the groups' defaults.
        compile: compile the update with ``torch.compile(fullgraph=True)``.
        compile_options: further ``torch.compile`` keyword arguments (``mode``,
            ``backend``, ``fullgraph``); needs ``compile=True``.
        flat: keep each param group's params, gradients and state in one contiguous
            buffer each (see :mod:`functorch_reg.flat`), so a step is one kernel per
            group. Each ``p.data`` becomes a view of the group's buffer (module code is
            unchanged) and each ``p.grad`` a view of one gradient buffer that backward
            accumulates into; ``zero_grad()`` zeroes that buffer. Every trainable param
            of a group then steps every time (a param without a gradient gets a zero
            one); ``requires_grad=False`` params are left out of the buffer, never
            updated, and get no ``.grad`` (freeze or unfreeze them before building the
            optimizer: a change later raises at the next step). The functional
            optimizer's ``mask`` must select the group's buffer: choose decay per group
            with ``weight_decay`` instead. ``state_dict()`` has the same format as with
            ``flat=False``, so a checkpoint loads either way. Params that other code
            re-points (``model.to()``, ``p.grad = ...``) are copied back in at the next
            step. DTensor (FSDP2) params are refused. Under DDP, keep
            ``gradient_as_bucket_view=False`` (the default): DDP then copies the
            reduced gradients into these views; with ``True`` it replaces them by its
            bucket views, which costs a copy per step here.

    Raises:
        TypeError: ``optimizer`` is not a functional optimizer, a group has a
            hyperparameter this rule does not take (or a near-miss of one it takes) or
            one of the wrong type, or a param is not floating-point.
        ValueError: a hyperparameter is out of range, a ``mask`` glob matches no leaf
            of a group, a group lists a param twice, or ``compile_options`` comes
            without ``compile``.

    Examples:
        >>> import functorch_reg as fr
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = fr.TorchOptimizer(
        ...     [
        ...         {"params": [model.weight]},
        ...         {"params": [model.bias], "weight_decay": 0.0},
        ...     ],
        ...     fr.adamw(lr=1e-2, weight_decay=0.1),
        ... )
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     model(torch.randn(8, 3)).square().mean().backward()
        ...     optimizer.step()
        ...     scheduler.step()
        >>> sorted(optimizer.state_dict()["state"][0])
        ['beta_powers', 'exp_avg', 'exp_avg_sq', 'skipped']
    """

    def __init__(
        self,
        params: ParamsT,
        optimizer: Optimizer,
        *,
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        flat: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            hint = "; call the factory first" if callable(optimizer) else ""
            raise TypeError(
                "TorchOptimizer needs a functional optimizer such as fr.adamw(lr=1e-3), "
                f"got {type(optimizer).__name__}{hint}"
            )
        if compile_options is not None and not compile:
            raise ValueError("TorchOptimizer: compile_options needs compile=True")
        if flat:
            check_flat_rule(optimizer)
        self._functional = optimizer
        # The storage of each param group's state, in the order of param_groups; the
        # only place where flat=True and flat=False differ.
        self._groups: list[GroupState] = []
        self._new_group: Callable[..., GroupState] = FlatGroup if flat else LeafGroup
        self._compiled = compile
        self._update: Callable[..., None] = (
            Announced(
                torch.compile(_update_groups, **{"fullgraph": True, **(compile_options or {})}),
                "TorchOptimizer",
            )
            if compile
            else _update_groups
        )
        # Per group index, the 0-d tensors that carry its hyperparameters into the graph.
        self._scalars: list[dict[str, Tensor]] = []
        defaults = dict(optimizer.hyperparams)
        if "betas" in defaults:
            defaults["betas"] = tuple(defaults["betas"])
        # torch.optim adds keys of its own to self.defaults (e.g. on load_state_dict).
        self._hyperparam_names = tuple(defaults)
        super().__init__(params, defaults)

    @property
    def functional(self) -> Optimizer:
        """The functional update rule this optimizer runs (as passed to the constructor).

        >>> import torch, functorch_reg as fr
        >>> rule = fr.adamw(lr=1e-3)
        >>> fr.TorchOptimizer(torch.nn.Linear(2, 1).parameters(), rule).functional is rule
        True
        """
        return self._functional

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checked against the functional optimizer.

        Missing hyperparameters take the defaults. The group's hyperparameters, and
        the functional optimizer's ``mask`` and ``prox`` on its params, are validated
        now; on an error the optimizer is left as it was.

        Args:
            param_group: ``{"params": [...], **hyperparameters}``.
        """
        if (
            "decay_reference_lr" in self.defaults
            and "lr" in param_group
            and "decay_reference_lr" not in param_group
        ):
            # decay_scaling="schedule" divides by the initial lr: a group that sets its
            # own lr starts from that, as torch's schedulers record initial_lr per group.
            lr = param_group["lr"]
            param_group = {
                **param_group,
                "decay_reference_lr": lr.detach().clone() if isinstance(lr, Tensor) else lr,
            }
        super().add_param_group(param_group)
        try:
            index = len(self.param_groups) - 1
            self._check_group(index)
            group = self.param_groups[index]
            params, names = group["params"], group.get("param_names")
            labels = [self._label(index, position) for position in range(len(params))]
            storage = self._new_group(
                self._functional, params, names, labels, f"param group {index}"
            )
        except Exception:
            self.param_groups.pop()
            raise
        self._groups.append(storage)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every param that has a gradient, in place.

        Every group is checked before any is updated, and a step that raises leaves
        params and state as they were (a first step creates no state).

        Args:
            closure: re-evaluates the model and returns the loss; called with
                gradients enabled before the update.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            RuntimeError: a gradient is sparse.
            ValueError: a group's hyperparameter is out of range or not finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, (group, storage) in enumerate(zip(self.param_groups, self._groups, strict=True)):
            storage.check()
            if any(p.grad is not None for p in group["params"]):
                self._validate_hyperparams(f"param group {index}", group)
        created = [
            p for group in self.param_groups for p in group["params"] if not self.state.get(p)
        ]
        try:
            self._step_groups()
        except BaseException:
            # A first step that fails (e.g. while compiling) leaves no state behind.
            for p in created:
                self.state.pop(p, None)
            raise
        return loss

    def step_and_report(
        self, *, decay: Literal["decoupled", "coupled"] = "decoupled"
    ) -> dict[str, dict[str, Tensor]]:
        """:meth:`step`, and that step's decay diagnostics per param
        (:func:`functorch_reg.diagnostics.report`): call it instead of ``step()`` every
        N steps to log them. It copies the params before the step, nothing more.

        Each group's ``lr``, ``weight_decay`` (or with ``decay_timescale``,
        :math:`1 / (\\eta_0 \\tau)`, its ``"lr"``-scaling value) and ``betas[0]`` or
        ``momentum`` are used; decay chosen by the functional optimizer's ``mask`` is not
        seen, so give undecayed params a group with ``weight_decay=0``. Params are
        named by ``param_names`` (``named_parameters()``), else ``"group.position"``.

        Args:
            decay: ``"decoupled"`` (AdamW, ``sgd(decoupled=True)``) or ``"coupled"``.
        """
        from . import diagnostics

        before = [[p.detach().clone() for p in group["params"]] for group in self.param_groups]
        self.step()
        out: dict[str, dict[str, Tensor]] = {}
        for index, (group, olds) in enumerate(zip(self.param_groups, before, strict=True)):
            names = group.get("param_names") or [f"{index}.{i}" for i in range(len(olds))]
            if "decay_timescale" in group:
                rate = 1 / (group["decay_reference_lr"] * group["decay_timescale"])
            else:
                rate = group.get("weight_decay", 0.0)
            momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
            out.update(
                diagnostics.report(
                    dict(zip(names, olds, strict=True)),
                    {name: p.detach() for name, p in zip(names, group["params"], strict=True)},
                    {name: p.grad for name, p in zip(names, group["params"], strict=True)},
                    lr=group["lr"],
                    weight_decay=rate,
                    momentum=momentum,
                    decay=decay,
                )
            )
        return out

    def _step_groups(self) -> None:
        steps: list[Gathered] = []
        hyperparams: list[dict[str, Any]] = []
        with torch.no_grad():
            for index, (group, storage) in enumerate(
                zip(self.param_groups, self._groups, strict=True)
            ):
                gathered = storage.gather(self.state)
                if gathered is not None:
                    steps.append(gathered)
                    hyperparams.append(self._hyperparams(index, group))
            if steps:
                self._update(
                    [s.step_ for s in steps],
                    [s.params for s in steps],
                    [s.grads for s in steps],
                    [s.state for s in steps],
                    hyperparams,
                )

    def _validate_hyperparams(self, label: str, group: Mapping[str, Any]) -> None:
        """Raise, naming the group, unless its hyperparameters suit the functional step.

        Under ``compile=True`` the graph cannot read its tensor inputs, so this is
        where their values are checked."""
        missing = [name for name in self._hyperparam_names if name not in group]
        if missing:
            raise ValueError(f"TorchOptimizer: {label} lacks hyperparameter {missing[0]!r}")
        values = {name: _to_cpu(group[name]) for name in self._hyperparam_names}
        try:
            check_optimizer(self._functional, None, **values)
        except (TypeError, ValueError) as error:
            raise type(error)(f"TorchOptimizer: {label}: {error}") from error

    @torch._disable_dynamo  # type: ignore[attr-defined]  # as torch.optim.Optimizer.zero_grad
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients: with ``flat=True`` zero each group's gradient buffer
        (whatever ``set_to_none`` says, so the gradients stay views of it), else as
        ``torch.optim.Optimizer.zero_grad``."""
        name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"  # as torch.optim's
        with torch.autograd.profiler.record_function(name):
            for storage in self._groups:
                storage.zero_grad(set_to_none)

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a :meth:`state_dict`, validated before anything changes.

        Args:
            state_dict: the output of :meth:`state_dict` of a ``TorchOptimizer`` with
                the same functional optimizer and param groups.

        Raises:
            ValueError: the groups, the params with state, or a state tensor's key,
                shape or dtype do not match this optimizer, or a saved group's
                hyperparameter is out of range or not finite; with ``flat=True``, a
                checkpoint whose group has state for some params only, or params
                stepped different numbers of times (from ``flat=False``), which a
                flat group cannot step. Saved params are matched by ``param_names``
                when both sides have them (a checkpoint may list them in another
                order); names that differ are refused.
        """
        state_dict = _by_name(self.param_groups, state_dict)
        saved = self._saved_slots(state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            self._validate_hyperparams(f"param group {index} of state_dict", group)
        for storage in self._groups:
            storage.check_saved(saved)
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its param's dtype, but beta_powers is
        # float64 on purpose: put back exact copies, which also keep later in-place
        # steps out of the caller's checkpoint.
        for p, slots in saved.items():
            self.state[p] = {key: value.to(p.device, copy=True) for key, value in slots.items()}

    def _check_group(self, index: int) -> None:
        group = self.param_groups[index]
        _check_keys(f"param group {index}", set(group) - set(self.defaults), self._hyperparam_names)
        params = group["params"]
        for position, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(
                    "TorchOptimizer updates floating-point params only; "
                    f"{self._label(index, position)} is {p.dtype}"
                )
        names = group.get("param_names", params)
        if len(set(params)) != len(params) or len(set(names)) != len(names):
            raise ValueError(f"TorchOptimizer: param group {index} lists a param twice")
        # Masks, prox and decay_to are checked against the group's params now (on meta
        # copies: no memory, no device work), not at the first step.
        try:
            check_optimizer(
                self._functional,
                param_tree(params, group.get("param_names")),
                **{name: _to_cpu(group[name]) for name in self._hyperparam_names},
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"TorchOptimizer: param group {index}: {error}") from error

    def _hyperparams(self, index: int, group: dict[str, Any]) -> dict[str, Any]:
        values = {name: group[name] for name in self._hyperparam_names}
        if not self._compiled:
            return values
        while len(self._scalars) <= index:
            self._scalars.append({})
        scalars, device = self._scalars[index], group["params"][0].device

        def as_input(name: str, value: Any) -> Any:
            # lr is not a switch in any rule, and schedules pass through exactly zero.
            if name != "lr" and not isinstance(value, Tensor) and value == 0:
                return 0.0
            if name not in scalars:
                scalars[name] = torch.zeros((), dtype=torch.float32, device=device)
            scalar = scalars[name]
            return scalar.copy_(value) if isinstance(value, Tensor) else scalar.fill_(value)

        def as_inputs(name: str, value: Any) -> Any:
            if name == "betas":
                return as_input("beta1", value[0]), as_input("beta2", value[1])
            if isinstance(value, (tuple, list)):  # e.g. fr.muon's adam_betas
                return tuple(as_input(f"{name}.{i}", v) for i, v in enumerate(value))
            return as_input(name, value)

        return {name: as_inputs(name, value) for name, value in values.items()}

    def _saved_slots(self, state_dict: StateDict) -> dict[Tensor, dict[str, Tensor]]:
        """Each param's saved state, checked against this optimizer."""
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
            )
        owners = {}
        for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(saved_group["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {index} has {len(saved_group['params'])} params in "
                    f"state_dict but {len(group['params'])} here"
                )
            for position, key in enumerate(saved_group["params"]):
                owners[key] = (index, position)
        slots = {}
        for key, saved in state_dict["state"].items():
            if key not in owners:
                raise ValueError(f"state_dict has state for param {key!r} of no param group")
            if not saved:  # an entry that a mere lookup of the defaultdict created
                continue
            index, position = owners[key]
            self._groups[index].check_entry(position, saved)
            slots[groups[index]["params"][position]] = saved
        return slots

    def _label(self, index: int, position: int) -> str:
        group = self.param_groups[index]
        if "param_names" in group:
            return f"param {group['param_names'][position]!r}"
        return f"param {position} of param group {index}"


def _check_keys(label: str, extra: set[Any], accepted: Sequence[str]) -> None:
    """Refuse a group key that is not a default of the rule but looks like a
    hyperparameter (another rule's, another library's name, or a near-miss of one
    that the rule takes); keep tags such as Lightning's ``"name"``."""
    for key in sorted(extra - _GROUP_KEYS - _SCHEDULER_KEYS, key=str):
        close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.75)
        if close or key in _HYPERPARAMETER_NAMES:
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"TorchOptimizer: {label} has unknown hyperparameter {key!r}; the "
                "functional optimizer accepts " + ", ".join(sorted(accepted)) + hint
            )


def _by_name(param_groups: Sequence[Mapping[str, Any]], state_dict: StateDict) -> StateDict:
    """``state_dict`` with each saved group's params in the order of ``param_groups``, by
    ``param_names`` where both have them (torch matches params by position)."""
    groups = list(state_dict.get("param_groups", []))
    for index, (group, saved) in enumerate(zip(param_groups, groups, strict=False)):
        names, saved_names = group.get("param_names"), saved.get("param_names")
        if names is None or saved_names is None or list(names) == list(saved_names):
            continue
        if sorted(names) != sorted(saved_names):
            missing = sorted(set(names) - set(saved_names)) or ["-"]
            extra = sorted(set(saved_names) - set(names)) or ["-"]
            raise ValueError(
                f"param group {index} of state_dict names other params: missing "
                f"{missing[0]!r}, unexpected {extra[0]!r}; load a checkpoint of this model"
            )
        position = {name: i for i, name in enumerate(saved_names)}
        order = [position[name] for name in names]
        groups[index] = {
            **saved,
            "params": [saved["params"][i] for i in order],
            "param_names": list(names),
        }
    return {**state_dict, "param_groups": groups}


def _to_cpu(value: Any) -> Any:
    """A hyperparameter with its tensors on the CPU, where they combine with meta tensors."""
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    return value.detach().cpu() if isinstance(value, Tensor) else value


def _update_groups(
    steps: list[Callable[..., None]],
    trees: list[Any],
    grads: list[Any],
    states: list[State],
    hyperparams: list[dict[str, Any]],
) -> None:
    for step_, tree, group_grads, state, overrides in zip(
        steps, trees, grads, states, hyperparams, strict=True
    ):
        step_(tree, group_grads, state, **overrides)
