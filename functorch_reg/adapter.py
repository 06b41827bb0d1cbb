"""A ``torch.optim.Optimizer`` that runs a functional update rule in place.

:class:`TorchOptimizer` puts :func:`~functorch_reg.sgd`, :func:`~functorch_reg.adam` or
:func:`~functorch_reg.adamw` behind the ``torch.optim`` interface, so that an existing
training loop, LR scheduler and checkpoint code use it unchanged.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, StateDict

from ._compile_log import Announced
from .adapter_flat import FlatGroup
from .optim.base import DISABLED, Optimizer, State, check_optimizer, enabled, leaf_table_field
from .tree import flatten

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
        if flat and optimizer.for_flat is None:
            _check_mask_selects_a_buffer(optimizer)
        # Per group index, with flat=True: the functional optimizer for its buffer (a
        # mask or prox written for params translated to it, or refused).
        self._flat_optimizers: dict[int, Optimizer] = {}
        # Per group index, with flat=True: the packed group, and its functional state.
        # A group without trainable params has no FlatGroup (None).
        self._flat_groups: dict[int, FlatGroup | None] | None = {} if flat else None
        self._flat_states: dict[int, tuple[State, list[dict[str, Tensor]]]] = {}
        self._functional = optimizer
        template = optimizer.init([torch.empty((), device="meta")])
        self._state_type: type[Any] = type(template)
        self._slot_names = tuple(
            field
            for field, tree in zip(template._fields[:-1], template[:-1], strict=True)
            if enabled(tree)
        )
        table_field = leaf_table_field(self._state_type)
        self._table_field = table_field if table_field in self._slot_names else None
        # Per group index, the functional state's leaf table, whose rows the group's
        # params hold as views in self.state (see _leaf_table).
        self._tables: dict[int, Tensor] = {}
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
            if self._flat_groups is not None:
                group = self.param_groups[index]
                kept = [i for i, p in enumerate(group["params"]) if p.requires_grad]
                trainable = [group["params"][i] for i in kept]
                names = group.get("param_names")
                names = None if names is None else [names[i] for i in kept]
                packed = FlatGroup(trainable, f"param group {index}", names) if trainable else None
                if packed is not None and self._functional.for_flat is not None:
                    try:
                        self._flat_optimizers[index] = self._functional.for_flat(packed.layout)
                    except ValueError as error:
                        raise ValueError(
                            f"TorchOptimizer(flat=True), param group {index}: {error}; or "
                            "split the param group by the mask"
                        ) from None
                self._flat_groups[index] = packed
        except Exception:
            self.param_groups.pop()
            raise

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
        for index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "TorchOptimizer does not support sparse gradients; "
                        f"{self._label(index, position)} has one"
                    )
            if self._flat_groups is not None:
                self._check_trainable_unchanged(index)
            if any(p.grad is not None for p in group["params"]):
                self._validate_hyperparams(f"param group {index}", group)
        created = [
            p for group in self.param_groups for p in group["params"] if not self.state.get(p)
        ]
        tables = dict(self._tables)
        try:
            self._step_groups()
        except BaseException:
            # A first step that fails (e.g. while compiling) leaves no state behind.
            for p in created:
                self.state.pop(p, None)
            self._tables = tables
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
        trees: list[Any] = []
        grads: list[Any] = []
        states: list[State] = []
        hyperparams: list[dict[str, Any]] = []
        steps: list[Callable[..., None]] = []
        with torch.no_grad():
            for index, group in enumerate(self.param_groups):
                params = group["params"]
                if self._flat_groups is not None:
                    packed = self._flat_groups[index]
                    if packed is None:
                        continue
                    packed.refresh(packed.members)
                    trees.append({packed.key: packed.params})
                    grads.append({packed.key: packed.grads})
                    steps.append(self._flat_optimizers.get(index, self._functional).step_)
                    states.append(self._flat_state(index))
                    hyperparams.append(self._hyperparams(index, group))
                    continue
                group_grads = [p.grad for p in params]
                if all(g is None for g in group_grads):
                    continue
                trees.append(_tree(group, params))
                grads.append(_tree(group, group_grads))
                states.append(self._functional_state(index, group_grads))
                hyperparams.append(self._hyperparams(index, group))
                steps.append(self._functional.step_)
            if trees:
                self._update(steps, trees, grads, states, hyperparams)

    def _validate_hyperparams(self, label: str, group: Mapping[str, Any]) -> None:
        """Raise, naming the group, unless its hyperparameters suit the functional step.

        Under ``compile=True`` the graph cannot read its tensor inputs, so this is
        where their values are checked."""
        missing = [name for name in self._hyperparam_names if name not in group]
        if missing:
            raise ValueError(f"TorchOptimizer: {label} lacks hyperparameter {missing[0]!r}")
        values = {name: _to_cpu(group[name]) for name in self._hyperparam_names}
        validate = self._functional.validate
        try:
            if validate is not None:
                validate(**values)
        except (TypeError, ValueError) as error:
            raise type(error)(f"TorchOptimizer: {label}: {error}") from error

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients: with ``flat=True`` zero each group's gradient buffer
        (whatever ``set_to_none`` says, so the gradients stay views of it), else as
        ``torch.optim.Optimizer.zero_grad``."""
        if self._flat_groups is None:
            super().zero_grad(set_to_none)
            return
        for packed in self._flat_groups.values():
            if packed is not None:
                packed.refresh(packed.members)
                packed.grads.zero_()

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
        state_dict = self._by_name(state_dict)
        saved = self._saved_slots(state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            self._validate_hyperparams(f"param group {index} of state_dict", group)
        if self._flat_groups is not None:
            for index, packed in self._flat_groups.items():
                if packed is not None:  # a group of frozen params only has no buffer
                    members = packed.members
                    self._check_flat_slots(index, members, [saved.get(p) for p in members])
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its param's dtype, but beta_powers is
        # float64 on purpose: put back exact copies, which also keep later in-place
        # steps out of the caller's checkpoint.
        for p, slots in saved.items():
            self.state[p] = {key: value.to(p.device, copy=True) for key, value in slots.items()}

    def _check_trainable_unchanged(self, index: int) -> None:
        """With ``flat=True``, raise unless the group's trainable params are the packed ones."""
        assert self._flat_groups is not None
        packed = self._flat_groups[index]
        members = [] if packed is None else packed.members
        params = self.param_groups[index]["params"]
        if [id(p) for p in _trainable(params)] != [id(p) for p in members]:
            packed_ids = {id(p) for p in members}
            position = next(
                i for i, p in enumerate(params) if p.requires_grad != (id(p) in packed_ids)
            )
            raise ValueError(
                f"TorchOptimizer(flat=True): {self._label(index, position)} changed "
                "requires_grad since the optimizer was built; a flat group's buffer holds "
                "the params that were trainable then: build a new optimizer after "
                "freezing or unfreezing, or use flat=False"
            )

    def _check_group(self, index: int) -> None:
        group = self.param_groups[index]
        extra = set(group) - set(self.defaults) - _GROUP_KEYS - _SCHEDULER_KEYS
        for key in sorted(extra, key=str):
            close = difflib.get_close_matches(str(key), self._hyperparam_names, n=1, cutoff=0.75)
            if close or key in _HYPERPARAMETER_NAMES:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"TorchOptimizer: param group {index} has unknown hyperparameter "
                    f"{key!r}; the functional optimizer accepts "
                    + ", ".join(sorted(self._hyperparam_names))
                    + hint
                )
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
                _tree(group, params),
                **{name: _to_cpu(group[name]) for name in self._hyperparam_names},
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"TorchOptimizer: param group {index}: {error}") from error

    def _functional_state(self, index: int, grads: Sequence[Tensor | None]) -> State:
        """Group ``index``'s functional state: views of ``self.state``, created where missing.

        A param without a gradient and without state gets ``None`` slots, which the
        functional step leaves alone, so frozen params cost no memory.
        """
        group = self.param_groups[index]
        params = group["params"]
        for p, g in zip(params, grads, strict=True):
            if g is not None and not self.state.get(p):
                self.state[p] = self._fresh_slots(p)
        slots = [self.state.get(p) or None for p in params]
        skipped = next(s for s in slots if s is not None)["skipped"]
        for s in slots:
            if s is not None:
                s["skipped"] = skipped
        fields: list[Any] = []
        for field in self._state_type._fields[:-1]:
            if field not in self._slot_names:
                fields.append(DISABLED)
            elif field == self._table_field:
                fields.append(self._leaf_table(index, slots))
            else:
                # A param may lack a field that others have (Muon's matrices keep no
                # exp_avg_sq): None, as for a frozen param.
                fields.append(_tree(group, [None if s is None else s.get(field) for s in slots]))
        return self._state_type(*fields, skipped)

    def _flat_state(self, index: int) -> State:
        """Group ``index``'s functional state over its one buffer (``flat=True``).

        Each param's entry in ``self.state`` holds views of it (its slice of each slot
        buffer, the table's single row, the shared ``skipped``). The state is rebuilt
        from those entries when one was replaced: first step, or ``load_state_dict``.
        """
        assert self._flat_groups is not None
        packed = self._flat_groups[index]
        assert packed is not None
        params = packed.members
        state, entries = self._flat_states.get(index, (None, []))
        if state is not None and all(
            self.state.get(p) is entry for p, entry in zip(params, entries, strict=True)
        ):
            return state
        state = self._packed_state(index, packed, params)
        views = {
            field: packed.views(getattr(state, field)[packed.key])
            for field in self._slot_names
            if field != self._table_field
        }
        entries = []
        for i, p in enumerate(params):
            entry = {field: view[i] for field, view in views.items()}
            if self._table_field is not None:
                entry[self._table_field] = getattr(state, self._table_field)[0]
            entry["skipped"] = state.skipped
            self.state[p] = entry
            entries.append(entry)
        self._flat_states[index] = (state, entries)
        return state

    def _packed_state(self, index: int, packed: FlatGroup, params: Sequence[Tensor]) -> State:
        """A fresh functional state, or one packed from the params' entries in ``self.state``."""
        fresh = self._functional.init({packed.key: packed.params})
        slots = [self.state.get(p) or None for p in params]
        if all(s is None for s in slots):
            return fresh
        self._check_flat_slots(index, params, slots)
        entries = cast("list[dict[str, Tensor]]", slots)  # none is None, as checked
        fields: list[Any] = []
        for field, tree in zip(fresh._fields[:-1], fresh[:-1], strict=True):
            if not enabled(tree):
                fields.append(DISABLED)
            elif field == self._table_field:
                fields.append(entries[0][field].to(tree.device).clone().unsqueeze(0))
            else:
                fields.append({packed.key: packed.pack([s[field] for s in entries])})
        skipped = entries[0]["skipped"].detach().clone().to(fresh.skipped.device)
        return self._state_type(*fields, skipped)

    def _check_flat_slots(
        self,
        index: int,
        params: Sequence[Tensor],
        slots: Sequence[Mapping[str, Tensor] | None],
    ) -> None:
        """A flat group steps its (trainable) ``params`` together: all or none have
        state, and the same per-leaf scalars (the leaf table: how often each was
        updated)."""
        if all(s is None for s in slots):
            return
        group_params = self.param_groups[index]["params"]

        def position(member: int) -> int:  # in the param group, frozen params included
            return next(i for i, p in enumerate(group_params) if p is params[member])

        if any(s is None for s in slots):
            missing = next(i for i, s in enumerate(slots) if s is None)
            raise ValueError(
                f"TorchOptimizer(flat=True): {self._label(index, position(missing))} has no "
                "state while "
                "others of its group do (e.g. a flat=False checkpoint where it never had a "
                "gradient); with flat=True a group's params step together: load it with "
                "flat=False, or put that param in a param group of its own"
            )
        field = self._table_field
        if field is None:
            return
        rows = [cast("Mapping[str, Tensor]", s)[field].cpu() for s in slots]
        for member, row in enumerate(rows):
            if not torch.equal(row, rows[0]):
                raise ValueError(
                    f"TorchOptimizer(flat=True): the params of param group {index} have "
                    f"different {field} ({self._label(index, position(member))} differs from the "
                    "first: they were updated different numbers of times); with flat=True "
                    "a group's params step together: load it with flat=False"
                )

    def _by_name(self, state_dict: StateDict) -> StateDict:
        """``state_dict`` with each saved group's params in this optimizer's order, by
        ``param_names`` where both have them (torch matches params by position)."""
        groups = list(state_dict.get("param_groups", []))
        for index, (group, saved) in enumerate(zip(self.param_groups, groups, strict=False)):
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

    def _leaf_table(self, index: int, slots: Sequence[dict[str, Tensor] | None]) -> Tensor:
        """Group ``index``'s leaf table (e.g. Adam's ``beta_powers``).

        Its rows follow the leaf order of the group's flattened tree, and each param's
        entry in ``self.state`` is a view of its row, so the in-place step updates it.
        The table is rebuilt from those entries when one is not such a view: new state,
        or state put back by ``load_state_dict``.
        """
        field = self._table_field
        order = flatten(_tree(self.param_groups[index], range(len(slots))))[0]
        rows = [slots[position] for position in order]
        table = self._tables.get(index)
        if (
            table is None
            or len(table) != len(rows)
            or not all(s is None or _is_row(s[field], table, i) for i, s in enumerate(rows))
        ):
            fresh = next(s for s in rows if s is not None)[field]
            table = torch.stack([fresh if s is None else s[field] for s in rows])
            for i, s in enumerate(rows):
                if s is not None:
                    s[field] = table[i]
            self._tables[index] = table
        return table

    def _fresh_slots(self, p: Tensor) -> dict[str, Tensor]:
        """One param's initial state, keyed by field name, plus ``skipped``."""
        state = self._functional.init([p])
        slots = {
            field: tree[0]
            for field, tree in zip(state._fields[:-1], state[:-1], strict=True)
            if enabled(tree) and tree[0] is not None
        }
        return {**slots, "skipped": state.skipped}

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
            p, label = groups[index]["params"][position], self._label(index, position)
            expected = self._fresh_slots(torch.empty_like(p, device="meta"))
            if set(saved) != set(expected):
                raise ValueError(
                    f"state_dict state of {label} has keys {sorted(saved)}, "
                    f"expected {sorted(expected)}"
                )
            for name, like in expected.items():
                value = saved[name]
                if (
                    not isinstance(value, Tensor)
                    or value.shape != like.shape
                    or value.dtype != like.dtype
                ):
                    got = (
                        f"{value.dtype} {tuple(value.shape)}"
                        if isinstance(value, Tensor)
                        else repr(value)
                    )
                    raise ValueError(
                        f"state_dict entry {name} of {label} should be {like.dtype} "
                        f"{tuple(like.shape)}, got {got}"
                    )
            slots[p] = saved
        return slots

    def _label(self, index: int, position: int) -> str:
        group = self.param_groups[index]
        if "param_names" in group:
            return f"param {group['param_names'][position]!r}"
        return f"param {position} of param group {index}"


def _check_mask_selects_a_buffer(optimizer: Optimizer) -> None:
    """With ``flat=True`` a group is one buffer, which a ``mask`` made for named leaves
    would silently leave undecayed: probe one step on a one-element buffer."""
    probe = [torch.ones(1)]
    hint = (
        "TorchOptimizer(flat=True) steps each param group as one buffer, which the "
        "functional optimizer's mask must select; drop the mask and choose decay per "
        "param group with weight_decay"
    )
    try:
        out, _ = optimizer.step(
            probe, [torch.zeros(1)], optimizer.init(probe), lr=1.0, weight_decay=0.5
        )
    except ValueError as error:
        raise ValueError(f"{hint} ({error})") from None
    if torch.equal(out[0], probe[0]):
        raise ValueError(f"{hint}: this mask leaves it out")


def _trainable(params: Sequence[Tensor]) -> list[Tensor]:
    return [p for p in params if p.requires_grad]


def _tree(group: dict[str, Any], values: Sequence[Any]) -> dict[str, Any] | list[Any]:
    """``values``, one per param of ``group``, as a pytree named like its params."""
    if "param_names" in group:
        return dict(zip(group["param_names"], values, strict=True))
    return list(values)


def _is_row(value: Tensor, table: Tensor, i: int) -> bool:
    """Whether ``value`` is a view of row ``i`` of ``table``."""
    return value._base is table and value.storage_offset() == i * value.numel()


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
