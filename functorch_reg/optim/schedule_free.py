r"""Schedule-Free AdamW, as ``schedulefree.AdamWScheduleFree``, and the switch of the
params between its training point :math:`y` and its evaluation point :math:`x`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, UNIT_OPEN, Scalar
from ..select import Where
from ..tree import Params, flatten, matching_leaves
from .base import LeafTable, Optimizer, Prox, State, is_zero, resolve
from .regularization import regularization

__all__ = [
    "ScheduleFreeState",
    "schedule_free_adamw",
    "schedule_free_eval",
    "schedule_free_eval_",
    "schedule_free_point",
    "schedule_free_sgd",
    "schedule_free_train",
    "schedule_free_train_",
]

_INTERVALS = {
    "lr": NON_NEGATIVE,
    "beta1": UNIT_OPEN,
    "beta2": UNIT_OPEN,
    "momentum": UNIT_OPEN,
    "eps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "r": NON_NEGATIVE,
    "weight_lr_power": NON_NEGATIVE,
    "prox_strength": NON_NEGATIVE,
}

# Columns of the leaf table.
_K, _LR_MAX, _WEIGHT_SUM, _TRAIN_MODE = range(4)


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free_adamw`.

    Attributes:
        z: per-leaf base sequence :math:`z` (the reference's ``state["z"]``), a pytree like the
            params (same leaf names, shapes, dtypes and devices).
        exp_avg_sq: per-leaf second moment :math:`v`, likewise (``()`` for
            :func:`schedule_free_sgd`).
        schedule: per-leaf float64 ``[n_leaves, 4]`` table: the step count :math:`k`,
            the largest scheduled lr so far, the sum of the averaging weights (the
            reference's group-level ``k``, ``lr_max`` and ``weight_sum``), and which
            point the params hold: ``1`` for :math:`y` (training), ``0`` for :math:`x`
            (evaluation, after :func:`schedule_free_eval`).
        skipped: steps skipped for a non-finite gradient (``skip_nonfinite=True``), a
            0-d int64 tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.schedule_free_adamw().init({"w": torch.ones(2, 3), "b": torch.zeros(3)})
        >>> state.z["w"].shape, state.schedule.shape
        (torch.Size([2, 3]), torch.Size([2, 4]))
    """

    z: Params
    exp_avg_sq: Params
    schedule: Tensor
    skipped: Tensor

    @classmethod
    def leaf_table_field(cls) -> str:
        """The field that holds a row per leaf in one tensor (see
        :class:`~functorch_reg.optim.base.LeafTable`)."""
        return "schedule"


def schedule_free_adamw(
    lr: Scalar = 0.0025,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    warmup_steps: Scalar = 0.0,
    r: Scalar = 0.0,
    weight_lr_power: Scalar = 2.0,
    mask: Where = None,
    prox: Prox | None = None,
    prox_strength: Scalar = 0.0,
    skip_nonfinite: bool = False,
    *,
    decay_at: Literal["y", "z"] = "y",
    decay_scaling: Literal["lr"] = "lr",
    cautious_decay: bool = False,
    decay_to: Params | None = None,
    clip_grad_norm: Scalar | None = None,
) -> Optimizer:
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled"), matching
    ``schedulefree.AdamWScheduleFree`` step for step (its train and eval points).

    The params hold the training point :math:`y`; the state holds the base sequence
    :math:`z` (starting at the params) and the second moment. Per leaf, at step
    :math:`t = k + 1`:

    .. math::
        \eta_t &= \eta \min(1, t / T_\text{warmup}), \quad
            \eta_\text{max} = \max_{s \le t} \eta_s, \quad
            c_t = \frac{t^r \eta_\text{max}^{p}}{\sum_{s \le t} s^r \eta_{\text{max},s}^{p}} \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
            d_t = \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda (w_d - w_\text{ref}) \\
        y_t &= (1 - c_t)\, y_{t-1} + c_t z_{t-1} + \eta_t (\beta_1 (1 - c_t) - 1)\, d_t \\
        z_t &= z_{t-1} - \eta_t d_t

    with :math:`p` = ``weight_lr_power``, and the evaluation point :math:`x_t = (1 -
    1/\beta_1)\,... ` recovered as ``x = y + (1 - 1/beta1) (z - y)`` by
    :func:`schedule_free_eval`. The decay :math:`\lambda` is evaluated at :math:`w_d =
    y` (``decay_at="y"``, the reference's choice) or at :math:`w_d = z`, scaled by
    :math:`\eta_t` like the gradient; ``cautious_decay`` keeps it only where the signs
    of the normalized gradient and :math:`w_d - w_\text{ref}` agree. ``decay_scaling``
    other than ``"lr"`` does not apply (the decay moves both sequences through
    :math:`d_t`), and is not accepted.

    Call :func:`schedule_free_eval` before evaluating or saving the model, and
    :func:`schedule_free_train` before the next step: a step refuses params that hold
    :math:`x` (outside ``torch.compile`` and ``vmap``), and
    :func:`schedule_free_point` says which point they hold.

    Args:
        lr: learning rate :math:`\eta` (after warmup).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``; :math:`\beta_1` is the
            interpolation between :math:`z` and the average.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda`, on the leaves chosen by ``mask``.
        warmup_steps: :math:`T_\text{warmup}`, steps of linear warmup of the lr.
        r: power of the polynomial weighting of the average.
        weight_lr_power: :math:`p`, power of the lr in the averaging weights.
        mask: which leaves get decay and prox (a ``where=`` selection; default all).
        prox: a proximal operator, applied to :math:`y` as ``prox(y, lr * prox_strength)``.
        prox_strength: :math:`\rho`, the strength of the proximal penalty.
        skip_nonfinite: leave params and state untouched on a non-finite gradient.
        decay_at: ``"y"`` (reference) or ``"z"``, the point the decay is evaluated at.
        decay_scaling: ``"lr"`` only (others are refused, see above); accepted so that
            code written for the other rules states its choice.
        cautious_decay: decay only where the step and the weight agree in sign.
        decay_to: reference weights the decay pulls toward (by leaf name).
        clip_grad_norm: clip the gradients to this global norm first.

    Raises:
        ValueError: a hyperparameter out of range, an unknown ``decay_at``, a
            ``decay_scaling`` other than ``"lr"``; at a step,
            params that hold the evaluation point.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(2)}
        >>> opt = fr.schedule_free_adamw(lr=0.1, warmup_steps=2)
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> eval_params, eval_state = fr.schedule_free_eval(opt, params, state)
        >>> fr.schedule_free_point(eval_state)
        'x'
    """
    return _schedule_free("schedule_free_adamw", locals())


def schedule_free_sgd(
    lr: Scalar = 1.0,
    momentum: Scalar = 0.9,
    weight_decay: Scalar = 0.0,
    warmup_steps: Scalar = 0.0,
    r: Scalar = 0.0,
    weight_lr_power: Scalar = 2.0,
    mask: Where = None,
    prox: Prox | None = None,
    prox_strength: Scalar = 0.0,
    skip_nonfinite: bool = False,
    *,
    decay_at: Literal["y", "z"] = "y",
    decay_scaling: Literal["lr"] = "lr",
    cautious_decay: bool = False,
    decay_to: Params | None = None,
    clip_grad_norm: Scalar | None = None,
) -> Optimizer:
    r"""Schedule-Free SGD, matching ``schedulefree.SGDScheduleFree`` step for step.

    :func:`schedule_free_adamw` with the raw gradient as the direction,
    :math:`d_t = g_t + \lambda (w_d - w_\text{ref})`, and ``momentum`` in the place of
    :math:`\beta_1` (in the step and in :func:`schedule_free_eval` /
    :func:`schedule_free_train`). Its state's ``exp_avg_sq`` is ``()``. Arguments are
    those of :func:`schedule_free_adamw` and of the reference (``lr=1.0`` by default).
    The method is Defazio et al., "The Road Less Scheduled" (NeurIPS 2024).

    Args:
        lr: :math:`\gamma`, the step size per step (absolute), finite and >= 0.
        momentum: the interpolation :math:`\beta_1` in ``[0, 1)``.
        weight_decay: :math:`\lambda`, coupled into the direction at ``decay_at``.

    The other arguments are :func:`schedule_free_adamw`'s.

    Raises:
        ValueError: a hyperparameter out of range (``lr``, ``weight_decay`` negative,
            ``momentum`` outside ``[0, 1)``, ...), an unknown ``decay_at``, a
            ``decay_scaling`` other than ``"lr"``; at a step, params that hold the
            evaluation point.

    Example:
        >>> import functorch_reg as fr
        >>> opt = fr.schedule_free_sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, opt.init(params))
        >>> params["w"]
        tensor([0.9000, 0.9000])
    """
    return _schedule_free("schedule_free_sgd", locals())


def _schedule_free(name: str, arguments: Mapping[str, Any]) -> Optimizer:
    """The Schedule-Free rule of the public factory ``name``, from its ``arguments``
    (its ``locals()``): the gradient normalized as Adam's when they hold ``betas``, the
    raw gradient (SGD) otherwise."""
    adaptive = "betas" in arguments
    own = ("lr", "betas", "eps") if adaptive else ("lr", "momentum")
    names = (*own, "weight_decay", "warmup_steps", "r", "weight_lr_power")
    hyperparams = {key: arguments[key] for key in names}
    decay_at, cautious_decay = arguments["decay_at"], arguments["cautious_decay"]
    if arguments["decay_scaling"] != "lr":
        raise ValueError(
            f"{name}: decay_scaling={arguments['decay_scaling']!r} does not apply: the decay "
            "enters the step direction, which both sequences follow with the scheduled lr "
            "(so it scales with the lr already); only 'lr' is accepted"
        )
    if decay_at not in ("y", "z"):
        raise ValueError(f"{name}: decay_at must be 'y' or 'z', got {decay_at!r}")
    options = regularization(name, arguments, decoupled=True)

    def init_slots(p: Tensor) -> tuple[Tensor | None, ...]:
        return p.detach().clone(), torch.zeros_like(p) if adaptive else None

    def rule(
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        z, exp_avg_sq = slots
        assert z is not None and row is not None
        lr_t, ckp1, bias_correction2 = row.unbind()
        if exp_avg_sq is not None:
            beta1, beta2 = h["beta1"], h["beta2"]
            exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * (g * g)
            denom = (exp_avg_sq / bias_correction2.to(p.dtype)).sqrt() + h["eps"]
            direction = g / denom
        else:
            beta1, direction = h["momentum"], g
        weight_decay = h["weight_decay"] if decay else 0.0
        if not is_zero(weight_decay):
            point = p if decay_at == "y" else z
            offset = point if reference is None else point - reference
            if cautious_decay:
                agree = torch.sign(direction) * torch.sign(offset) >= 0
                offset = torch.where(agree, offset, torch.zeros_like(offset))
            direction = direction + weight_decay * offset
        y = torch.lerp(p, z, ckp1.to(p.dtype))
        y = y + direction * (lr_t * (beta1 * (1 - ckp1) - 1)).to(p.dtype)
        z = z - direction * lr_t.to(p.dtype)
        return y, (z, exp_avg_sq)

    optimizer = options.build(
        hyperparams,
        ScheduleFreeState,
        init_slots,
        rule,
        _INTERVALS,
        table=LeafTable(_init_schedule, functools.partial(_advance_schedule, adaptive)),
    )
    return options.finish(_refusing_eval_point(name, optimizer))


def _init_schedule(device: torch.device) -> Tensor:
    """A leaf's row before its first step: ``k = 0``, no lr yet, no weight, at ``y``."""
    return torch.tensor([0.0, -1.0, 0.0, 1.0], dtype=torch.float64, device=device)


def _advance_schedule(
    adaptive: bool, table: Tensor, h: Mapping[str, Scalar]
) -> tuple[Tensor, Tensor]:
    """The ``schedule`` table after one step, and per leaf the rule's ``(lr_t, c_t,
    1 - beta2^t)`` (``1`` for the SGD form)."""
    k, lr_max, weight_sum, mode = table.unbind(1)
    t = k + 1
    warmup = h["warmup_steps"]
    # The division by a zero warmup is discarded by where (k < 0 never holds).
    sched = torch.where(k < warmup, t / warmup, torch.ones_like(t))
    lr_t = h["lr"] * sched
    lr_max = torch.maximum(lr_t, lr_max)
    weight = t ** h["r"] * lr_max ** h["weight_lr_power"]
    weight_sum = weight_sum + weight
    ckp1 = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight))
    bias_correction2 = 1 - h["beta2"] ** t if adaptive else torch.ones_like(t)
    derived = torch.stack([lr_t, ckp1, bias_correction2], dim=1)
    return torch.stack([t, lr_max, weight_sum, mode], dim=1), derived


def _refusing_eval_point(name: str, optimizer: Optimizer) -> Optimizer:
    """``optimizer`` whose steps refuse a state recording that the params hold ``x``."""

    def check(state: State) -> None:
        if isinstance(state, ScheduleFreeState) and schedule_free_point(state) == "x":
            raise ValueError(
                f"{name}.step: the params hold the evaluation point x (after "
                "schedule_free_eval); switch them back with fr.schedule_free_train(opt, "
                "params, state) before stepping"
            )

    def step(params: Params, grads: Params, state: State, **overrides: Any) -> Any:
        check(state)
        return optimizer.step(params, grads, state, **overrides)

    def step_(params: Params, grads: Params, state: State, **overrides: Any) -> None:
        check(state)
        optimizer.step_(params, grads, state, **overrides)

    step.__doc__, step_.__doc__ = optimizer.step.__doc__, optimizer.step_.__doc__
    inner_for_flat = optimizer.for_flat

    def for_flat(flat: Any) -> Optimizer:  # the flat layout's optimizer keeps the guard
        assert inner_for_flat is not None
        return _refusing_eval_point(name, inner_for_flat(flat))

    return optimizer._replace(
        step=step, step_=step_, for_flat=None if inner_for_flat is None else for_flat
    )


def schedule_free_point(state: ScheduleFreeState) -> Literal["y", "x", "unknown"]:
    """Which point the params of ``state`` hold: ``"y"`` (training, after ``init`` or
    :func:`schedule_free_train`) or ``"x"`` (evaluation, after :func:`schedule_free_eval`).

    ``"unknown"`` inside ``torch.compile`` or ``vmap`` and on the meta device, where
    the state's values are not read.

    Args:
        state: a :class:`ScheduleFreeState`.

    Returns:
        ``"y"``, ``"x"`` or ``"unknown"``.

    Example:
        >>> import functorch_reg as fr
        >>> opt = fr.schedule_free_adamw()
        >>> fr.schedule_free_point(opt.init({"w": torch.ones(2)}))
        'y'
    """
    table = state.schedule
    if (
        torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(table)
        or table.is_meta
    ):
        return "unknown"
    train = table[:, _TRAIN_MODE].detach()
    return "y" if bool((train != 0).all()) else "x"


def schedule_free_eval(
    optimizer: Optimizer, params: Params, state: ScheduleFreeState, **overrides: Any
) -> tuple[Params, ScheduleFreeState]:
    r"""The params at the evaluation point :math:`x = y + (1 - 1/\beta_1)(z - y)`, and a
    state that records it (``schedulefree``'s ``optimizer.eval()``); pure.

    Params already at :math:`x` are returned as they are, as the reference does.
    ``overrides`` are the step's per-call hyperparameters (``betas`` is read).

    Args:
        optimizer: the :func:`schedule_free_adamw` or :func:`schedule_free_sgd` the
            state belongs to (its ``betas`` / ``momentum`` give :math:`\beta_1`).
        params: the pytree of tensors the state is for.
        state: a :class:`ScheduleFreeState` of ``optimizer``.
        **overrides: per-call hyperparameters, as the step takes them.

    Returns:
        ``(params, state)``: new params of the same structure, shapes and dtypes, and a
        state recording the point; the inputs are not modified.

    Raises:
        TypeError: ``state`` is not a :class:`ScheduleFreeState`; an unknown keyword in
            ``overrides``.
        ValueError: the params' leaf names or shapes differ from the state's; an
            override out of range; beta1 = 0 (there is no evaluation point).

    Example:
        >>> import functorch_reg as fr
        >>> opt = fr.schedule_free_adamw(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state)
        >>> x, state = fr.schedule_free_eval(opt, params, state)
        >>> y, state = fr.schedule_free_train(opt, x, state)
        >>> torch.allclose(y["w"], params["w"])
        True
    """
    return _switch(optimizer, params, state, overrides, to_eval=True)


def schedule_free_train(
    optimizer: Optimizer, params: Params, state: ScheduleFreeState, **overrides: Any
) -> tuple[Params, ScheduleFreeState]:
    r"""The params back at the training point :math:`y = x + (1 - \beta_1)(z - x)`, and a
    state that records it (``schedulefree``'s ``optimizer.train()``); pure.

    Params already at :math:`y` are returned as they are.

    Args, returns and errors as :func:`schedule_free_eval`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> opt = fr.schedule_free_sgd(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, opt.init(params))
        >>> x, state = fr.schedule_free_eval(opt, params, state)
        >>> fr.schedule_free_point(state)
        'x'
        >>> params, state = fr.schedule_free_train(opt, x, state)
        >>> fr.schedule_free_point(state)
        'y'
    """
    return _switch(optimizer, params, state, overrides, to_eval=False)


def _switch(
    optimizer: Optimizer,
    params: Params,
    state: ScheduleFreeState,
    overrides: Mapping[str, Any],
    *,
    to_eval: bool,
) -> tuple[Params, ScheduleFreeState]:
    name = "schedule_free_eval" if to_eval else "schedule_free_train"
    if not isinstance(state, ScheduleFreeState):
        raise TypeError(f"{name}: state must be a ScheduleFreeState, got {type(state).__name__}")
    hyperparams = {k: v for k, v in optimizer.hyperparams.items() if k != "clip_grad_norm"}
    h = resolve(name, hyperparams, dict(overrides), _INTERVALS)
    point = schedule_free_point(state)
    if point == ("x" if to_eval else "y"):
        return params, state
    leaves, spec = flatten(params)
    z_leaves = matching_leaves(leaves, spec, state.z, other_name="state.z")
    beta1 = h["beta1"] if "beta1" in h else h["momentum"]
    if to_eval and is_zero(beta1):
        raise ValueError(f"{name}: beta1 = 0 has no evaluation point (x = y - (z - y) / beta1)")
    weight = (1 - 1 / beta1) if to_eval else (1 - beta1)
    new_leaves = [
        p
        if z is None
        else torch.lerp(p, z, weight.to(p.dtype) if isinstance(weight, Tensor) else weight)
        for p, z in zip(leaves, z_leaves, strict=True)
    ]
    schedule = state.schedule.clone()
    schedule[:, _TRAIN_MODE] = 0.0 if to_eval else 1.0
    return spec.unflatten(new_leaves), state._replace(schedule=schedule)


def schedule_free_eval_(optimizer: torch.optim.Optimizer) -> None:
    r"""``schedulefree``'s ``optimizer.eval()`` for a :class:`~functorch_reg.TorchOptimizer`
    over :func:`schedule_free_adamw`: each param with state moves to :math:`x` in place
    (with its group's ``betas``), and its state records it. A no-op where already at x.

    Args:
        optimizer: a :class:`~functorch_reg.TorchOptimizer` over
            :func:`schedule_free_adamw` or :func:`schedule_free_sgd`.

    Raises:
        TypeError: ``optimizer`` is not such a ``TorchOptimizer`` (e.g. a
            ``torch.optim.SGD``).
        ValueError: a group's :math:`\beta_1` is 0 (there is no evaluation point).

    Example:
        >>> import functorch_reg as fr
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = fr.TorchOptimizer(model.parameters(), fr.schedule_free_adamw(lr=0.1))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> fr.schedule_free_eval_(opt)  # evaluate, save
        >>> fr.schedule_free_train_(opt)  # before the next step
    """
    _switch_(optimizer, to_eval=True)


def schedule_free_train_(optimizer: torch.optim.Optimizer) -> None:
    r"""``schedulefree``'s ``optimizer.train()`` for a :class:`~functorch_reg.TorchOptimizer`:
    the inverse of :func:`schedule_free_eval_`.

    Args:
        optimizer: a :class:`~functorch_reg.TorchOptimizer` over
            :func:`schedule_free_adamw` or :func:`schedule_free_sgd`.

    Raises:
        TypeError: ``optimizer`` is not such a ``TorchOptimizer``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = fr.TorchOptimizer(model.parameters(), fr.schedule_free_sgd(lr=0.1))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> before = model.weight.detach().clone()
        >>> fr.schedule_free_eval_(opt)
        >>> fr.schedule_free_train_(opt)
        >>> torch.allclose(model.weight, before)
        True
    """
    _switch_(optimizer, to_eval=False)


def _switch_(optimizer: torch.optim.Optimizer, *, to_eval: bool) -> None:
    name = "schedule_free_eval_" if to_eval else "schedule_free_train_"
    functional = getattr(optimizer, "functional", None)
    if functional is None or not isinstance(functional.init([torch.zeros(1)]), ScheduleFreeState):
        raise TypeError(
            f"{name} takes a fr.TorchOptimizer over fr.schedule_free_adamw(...); for the "
            "functional API use fr.schedule_free_eval(opt, params, state)"
        )
    with torch.no_grad():
        for group in optimizer.param_groups:
            beta1 = group["betas"][0] if "betas" in group else group["momentum"]
            beta1 = float(beta1) if isinstance(beta1, Tensor) else beta1
            if to_eval and beta1 == 0:
                raise ValueError(f"{name}: beta1 = 0 has no evaluation point")
            weight = (1 - 1 / beta1) if to_eval else (1 - beta1)
            entries = [(p, optimizer.state.get(p)) for p in group["params"]]
            # Decided before any write: with flat=True a group's params share one row.
            moving = [
                (p, entry)
                for p, entry in entries
                if entry and bool(entry["schedule"][_TRAIN_MODE] == 0) != to_eval
            ]
            for p, entry in moving:
                p.lerp_(entry["z"], weight)
            for _, entry in moving:
                entry["schedule"][_TRAIN_MODE] = 0.0 if to_eval else 1.0
