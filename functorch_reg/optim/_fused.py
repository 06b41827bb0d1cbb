"""torch's fused optimizer kernels, for the option sets where they compute what the rules do.

``torch._fused_adam_``, ``torch._fused_adamw_`` and ``torch._fused_sgd_`` (the kernels
behind ``torch.optim``'s ``fused=True``, on CPU and CUDA) step a list of tensors in
one pass over memory. :func:`~functorch_reg.optim.base.build` calls them outside
``torch.compile`` for a group of leaves (one dtype and device) when every tensor is
contiguous and the group's options are ones the kernel implements; otherwise the
rule runs (over :mod:`._foreach` lists). The rule stays the definition: the kernels
compute the same formulas in another order of floating-point operations (within a
few units in the last place per step, as ``torch.optim``'s fused and for-loop
implementations differ; tested in ``tests/test_grouped.py``).

What each kernel needs and the state keeps:

* Adam's kernels take a step count ``t`` and form :math:`1 - \\beta^t`; the state keeps
  the running products of the betas instead (exact under a schedule of betas). The
  kernel runs when every leaf of the group has products equal to :math:`\\beta^t` for
  the current betas and one ``t`` (always, with constant betas and no frozen leaf).
* SGD's kernel takes ``is_first_step`` for the whole list; the state keeps a count per
  leaf, so leaves that started and leaves that did not are two calls.
* Hyperparameters are passed as Python floats: a 0-d tensor hyperparameter is read
  when it lives on the CPU (no device sync), else the rule runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import Scalar
from .base import FusedStep

__all__ = ["adam_kernel", "sgd_kernel"]

Run = Callable[[list[list[Tensor]], list[Tensor], Tensor | None], None]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _floats(h: Mapping[str, Scalar], names: Sequence[str]) -> dict[str, float] | None:
    """The hyperparameters as Python floats, or ``None`` if one is off the CPU."""
    values: dict[str, float] = {}
    for name in names:
        value = h[name]
        if isinstance(value, Tensor):
            if value.device.type != "cpu" or value.numel() != 1:
                return None
            value = value.item()
        values[name] = float(value)
    return values


def _kernel_runs_on(params: Sequence[Tensor]) -> bool:
    p = params[0]
    return p.device.type in ("cpu", "cuda") and p.dtype in _DTYPES


def _count(power: float, beta: float) -> int | None:
    """``t`` with ``beta ** t == power`` (to rounding), or ``None``."""
    if power == 1.0:
        return 0
    if not 0.0 < beta < 1.0 or not 0.0 < power < 1.0:
        return None
    return round(math.log(power) / math.log(beta))


def _powers_match(t: int, powers: Sequence[float], betas: Sequence[float]) -> bool:
    # A product of t factors is within t roundings of the power.
    tolerance = 1e-13 * max(t, 1)
    return all(
        abs(beta**t - power) <= tolerance * abs(power)
        for beta, power in zip(betas, powers, strict=True)
    )


def adam_kernel(*, decoupled: bool, amsgrad: bool, maximize: bool) -> FusedStep:
    """``torch._fused_adamw_`` (``decoupled``) or ``torch._fused_adam_`` as a :class:`FusedStep`
    for :func:`functorch_reg.adam` with ``decay_scaling="lr"``, no cautious decay and no
    ``decay_to``. State targets: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``."""
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def fused(
        params: list[Tensor], rows: list[Any] | None, h: Mapping[str, Scalar], decay: bool
    ) -> Run | None:
        values = _floats(h, ("lr", "beta1", "beta2", "eps", "weight_decay"))
        if rows is None or values is None or not _kernel_runs_on(params):
            return None
        betas = (values["beta1"], values["beta2"])
        distinct = {tuple(row) for row in rows}  # one row, unless some leaf was frozen
        counts = {_count(row[0], betas[0]) for row in distinct}
        if len(counts) != 1 or None in counts:
            return None
        (t,) = counts
        assert t is not None
        if not all(_powers_match(t, row, betas) for row in distinct):
            return None
        weight_decay = values["weight_decay"] if decay else 0.0

        def run(targets: list[list[Tensor]], grads: list[Tensor], found_inf: Tensor | None) -> None:
            p, exp_avg, exp_avg_sq, max_exp_avg_sq = targets
            step = torch.tensor(float(t + 1), dtype=torch.float32, device=p[0].device)
            kernel(
                p,
                grads,
                exp_avg,
                exp_avg_sq,
                max_exp_avg_sq,
                [step] * len(p),
                lr=values["lr"],
                beta1=betas[0],
                beta2=betas[1],
                weight_decay=weight_decay,
                eps=values["eps"],
                amsgrad=amsgrad,
                maximize=maximize,
                found_inf=_on(found_inf, p[0]),
            )

        return run

    return fused


def sgd_kernel(*, has_momentum: bool, nesterov: bool, maximize: bool) -> FusedStep:
    """``torch._fused_sgd_`` as a :class:`FusedStep` for :func:`functorch_reg.sgd` with
    coupled decay. State target: ``momentum_buffer`` (none without momentum)."""

    def fused(
        params: list[Tensor], rows: list[Any] | None, h: Mapping[str, Scalar], decay: bool
    ) -> Run | None:
        values = _floats(h, ("lr", "momentum", "dampening", "weight_decay"))
        if values is None or not _kernel_runs_on(params):
            return None
        if has_momentum:
            if rows is None:
                return None
            started = [count > 0 for count in rows]
        elif values["momentum"] != 0:
            return None  # the rule raises its error
        else:
            started = [True] * len(params)
        weight_decay = values["weight_decay"] if decay else 0.0

        def run(targets: list[list[Tensor]], grads: list[Tensor], found_inf: Tensor | None) -> None:
            p, buffers = targets
            for first in (True, False):
                picked = [j for j, s in enumerate(started) if s != first]
                if not picked:
                    continue
                torch._fused_sgd_(
                    [p[j] for j in picked],
                    [grads[j] for j in picked],
                    [buffers[j] for j in picked] if buffers else [],
                    weight_decay=weight_decay,
                    momentum=values["momentum"],
                    lr=values["lr"],
                    dampening=values["dampening"],
                    nesterov=nesterov,
                    maximize=maximize,
                    is_first_step=first,
                    found_inf=_on(found_inf, p[0]),
                )

        return run

    return fused


def _on(found_inf: Tensor | None, like: Tensor) -> Tensor | None:
    return None if found_inf is None else found_inf.to(like.device)
