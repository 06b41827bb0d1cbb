"""Schedules: functions of a step tensor that return a hyperparameter tensor.

They compute on the step's device in float64 and return a 0-d tensor of the default
dtype (float32), so a compiled step that receives ``lr=schedule(step)`` compiles once
however the value changes::

    schedule = fr.schedules.cosine(1e-3, total_steps=1000, warmup_steps=100)
    step = torch.zeros((), dtype=torch.int64)
    for batch in loader:
        params, state = compiled_step(params, grads, state, lr=schedule(step))
        step += 1

Each matches the ``torch.optim.lr_scheduler`` it is named after when that scheduler is
stepped once per optimizer step.

Why not float64: dynamo traces a 0-d float64 CPU tensor like a Python float, which
costs a second trace on the first call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, check_positive_int, check_scalars

Schedule: TypeAlias = Callable[[Tensor], Tensor]
"""A function ``schedule(step) -> value``: ``step`` an integer tensor counting optimizer
steps from 0 (0-d, or any shape for a batch of steps, on any device), ``value`` a tensor of
its shape in the default dtype (float32) on ``step``'s device (per step, absolute: e.g. the
learning rate of that step)."""

__all__ = ["Schedule", "constant", "cosine", "linear_warmup", "step_decay"]


def constant(value: float) -> Schedule:
    """``value`` at every step (``torch.optim.lr_scheduler.ConstantLR`` with ``factor=1``).

    Args:
        value: the hyperparameter, absolute (e.g. a learning rate), finite and >= 0.

    Returns:
        A :data:`Schedule`.

    Raises:
        ValueError: ``value`` is negative or not finite.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.schedules.constant(0.1)(torch.tensor(7))
        tensor(0.1000)
    """
    check_scalars("constant", {"value": value}, {"value": NON_NEGATIVE})

    def schedule(step: Tensor) -> Tensor:
        return torch.full_like(step, value, dtype=torch.get_default_dtype())

    return schedule


def linear_warmup(peak: float, warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    r"""Linear ramp from ``start_factor * peak`` at step 0 to ``peak`` at ``warmup_steps``,
    then constant (``torch.optim.lr_scheduler.LinearLR`` with ``end_factor=1``).

    :math:`\text{peak} \cdot (f + (1 - f) \min(s / W, 1))` at step :math:`s`, with
    :math:`f` = ``start_factor`` and :math:`W` = ``warmup_steps``.

    Args:
        peak: the value after warmup, absolute, finite and >= 0.
        warmup_steps: :math:`W`, the number of optimizer steps of the ramp, a positive int.
        start_factor: :math:`f`, the value at step 0 relative to ``peak``, >= 0.

    Returns:
        A :data:`Schedule`.

    Raises:
        ValueError: ``peak`` or ``start_factor`` is negative or not finite;
            ``warmup_steps`` is not a positive int.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.schedules.linear_warmup(1.0, warmup_steps=4)(torch.arange(6))
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000, 1.0000])
    """
    check_scalars(
        "linear_warmup",
        {"peak": peak, "start_factor": start_factor},
        {"peak": NON_NEGATIVE, "start_factor": NON_NEGATIVE},
    )
    _check_steps("linear_warmup", warmup_steps=warmup_steps)

    def schedule(step: Tensor) -> Tensor:
        progress = (step.to(torch.float64) / warmup_steps).clamp(max=1.0)
        return _as_default_dtype(peak * (start_factor + (1 - start_factor) * progress))

    return schedule


def cosine(peak: float, total_steps: int, final: float = 0.0, warmup_steps: int = 0) -> Schedule:
    r"""Optional linear warmup from 0 over ``warmup_steps``, then cosine decay from
    ``peak`` to ``final`` at ``total_steps`` (``CosineAnnealingLR`` with ``T_max =
    total_steps - warmup_steps`` and ``eta_min = final``), constant afterwards.

    After warmup, :math:`\text{final} + (\text{peak} - \text{final})(1 + \cos(\pi p))/2`
    with :math:`p = \min((s - W) / (T - W), 1)` at step :math:`s` (Loshchilov & Hutter,
    "SGDR", ICLR 2017, without restarts); during warmup :math:`\text{peak} \cdot s / W`.

    Args:
        peak: the value at the end of warmup, absolute, finite and >= 0.
        total_steps: :math:`T`, the optimizer step at which ``final`` is reached, a
            positive int.
        final: the value from step ``total_steps`` on, absolute, >= 0.
        warmup_steps: :math:`W`, the steps of the linear ramp from 0, in ``[0, T)``.

    Returns:
        A :data:`Schedule`.

    Raises:
        ValueError: ``peak`` or ``final`` is negative or not finite; ``total_steps`` is
            not a positive int; ``warmup_steps`` is not in ``[0, total_steps)``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.schedules.cosine(1.0, total_steps=5, warmup_steps=1)(torch.arange(6))
        tensor([0.0000, 1.0000, 0.8536, 0.5000, 0.1464, 0.0000])
    """
    check_scalars(
        "cosine", {"peak": peak, "final": final}, {"peak": NON_NEGATIVE, "final": NON_NEGATIVE}
    )
    _check_steps("cosine", total_steps=total_steps)
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"cosine: need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}"
        )

    def schedule(step: Tensor) -> Tensor:
        step = step.to(torch.float64)
        progress = ((step - warmup_steps) / (total_steps - warmup_steps)).clamp(0.0, 1.0)
        decayed = final + (peak - final) * (1 + torch.cos(math.pi * progress)) / 2
        if warmup_steps:
            decayed = torch.where(step < warmup_steps, peak * step / warmup_steps, decayed)
        return _as_default_dtype(decayed)

    return schedule


def step_decay(initial: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``initial * gamma ** (step // step_size)`` (``torch.optim.lr_scheduler.StepLR``).

    Args:
        initial: the value at step 0, absolute, finite and >= 0.
        step_size: the number of optimizer steps between decays, a positive int.
        gamma: the factor applied every ``step_size`` steps (relative), finite and >= 0.

    Returns:
        A :data:`Schedule`.

    Raises:
        ValueError: ``initial`` or ``gamma`` is negative or not finite; ``step_size``
            is not a positive int.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.schedules.step_decay(1.0, step_size=2, gamma=0.5)(torch.arange(6))
        tensor([1.0000, 1.0000, 0.5000, 0.5000, 0.2500, 0.2500])
    """
    check_scalars(
        "step_decay",
        {"initial": initial, "gamma": gamma},
        {"initial": NON_NEGATIVE, "gamma": NON_NEGATIVE},
    )
    _check_steps("step_decay", step_size=step_size)

    def schedule(step: Tensor) -> Tensor:
        decays = torch.div(step, step_size, rounding_mode="floor").to(torch.float64)
        return _as_default_dtype(initial * gamma**decays)

    return schedule


def _as_default_dtype(value: Tensor) -> Tensor:
    return value.to(torch.get_default_dtype())


def _check_steps(owner: str, **counts: int) -> None:
    for name, count in counts.items():
        check_positive_int(owner, name, count)
