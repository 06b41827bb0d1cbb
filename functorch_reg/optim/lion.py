"""Lion (evolved sign momentum), as ``lion_pytorch.Lion``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import UNIT_OPEN, Scalar
from ..select import Where
from ..tree import Params
from .base import Optimizer, Prox, is_zero
from .decay import DecayScaling, decay_coefficient, decayed
from .regularization import regularization

__all__ = ["LionState", "lion"]

_INTERVALS = {"beta1": UNIT_OPEN, "beta2": UNIT_OPEN}


class LionState(NamedTuple):
    """State of :func:`lion`.

    Attributes:
        exp_avg: per-leaf momentum :math:`m` (``lion_pytorch``'s ``exp_avg``), a pytree like the
            params (same leaf names, shapes, dtypes and devices).
        skipped: steps skipped for a non-finite gradient (``skip_nonfinite=True``), a
            0-d int64 tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.lion().init({"w": torch.ones(2, 3), "b": torch.zeros(3)})
        >>> state.exp_avg["w"].shape, state.skipped
        (torch.Size([2, 3]), tensor(0))
    """

    exp_avg: Params
    skipped: Tensor


def lion(
    lr: Scalar = 1e-4,
    betas: tuple[Scalar, Scalar] = (0.9, 0.99),
    weight_decay: Scalar = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    mask: Where = None,
    prox: Prox | None = None,
    prox_strength: Scalar = 0.0,
    skip_nonfinite: bool = False,
    *,
    decay_scaling: DecayScaling | None = None,
    decay_reference_lr: Scalar | None = None,
    cautious_decay: bool = False,
    decay_to: Params | None = None,
    clip_grad_norm: Scalar | None = None,
) -> Optimizer:
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"),
    matching ``lion_pytorch.Lion`` step for step.

    For each leaf, with gradient :math:`g_t` (negated when ``maximize``):

    .. math::
        w &\leftarrow w - c\,(w - w_\text{ref}) \quad \text{(decoupled decay, on mask)} \\
        u_t &= \operatorname{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t) \\
        w_t &= w - \eta u_t \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    The decay is always decoupled (there is no coupled form: a sign update ignores
    the gradient's scale). Its coefficient :math:`c` is :math:`\eta\lambda`
    (``lion_pytorch``'s default), or, with ``decoupled_weight_decay=True``
    (``lion_pytorch``'s option, = ``decay_scaling="schedule"``),
    :math:`(\eta / \eta_0)\lambda` with :math:`\eta_0` the constructed ``lr``: the decay
    then follows the schedule but not the peak lr, so a smaller lr needs no larger
    ``weight_decay`` (lion-pytorch issue #2). Since :math:`|u_t| \le 1`, constant
    :math:`\eta` and :math:`c = \eta\lambda` keep every weight within
    :math:`\max|w_T| \le 1/\lambda + (1 - \eta\lambda)^T (\max|w_0| - 1/\lambda)`.
    ``cautious_decay`` compares the signs of :math:`u_t` and :math:`w - w_\text{ref}`;
    ``decay_to``, ``mask``, ``prox`` and ``clip_grad_norm`` are as in
    :func:`functorch_reg.adam`.

    Args:
        lr: learning rate :math:`\eta` (the size of every coordinate's step).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``: the interpolation of
            the update and the momentum's decay.
        weight_decay: :math:`\lambda`, on the leaves chosen by ``mask``.
        decoupled_weight_decay: divide the decay by the initial lr, as
            ``lion_pytorch.Lion(decoupled_weight_decay=True)``.
        maximize: ascend the objective instead of descending it.
        mask: which leaves get decay and prox (a ``where=`` selection; default all).
        prox: a proximal operator, applied as ``prox(w, lr * prox_strength)``.
        prox_strength: :math:`\rho`, the strength of the proximal penalty.
        skip_nonfinite: leave params and state untouched on a non-finite gradient.
        decay_scaling: ``"lr"``, ``"schedule"`` or ``"none"`` (see
            :func:`functorch_reg.adam`); default ``"schedule"`` with
            ``decoupled_weight_decay`` and ``"lr"`` without.
        decay_reference_lr: :math:`\eta_0` for ``"schedule"`` (default: ``lr``).
        cautious_decay: decay only where the update and the weight agree in sign.
        decay_to: reference weights the decay pulls toward (by leaf name).
        clip_grad_norm: clip the gradients to this global norm first.

    Raises:
        ValueError: a beta outside ``[0, 1)``, a negative lr or decay, or
            ``decoupled_weight_decay`` with a ``decay_scaling`` other than
            ``"schedule"``.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(2)}
        >>> opt = fr.lion(lr=0.1)
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([2.0, -0.5])}, state)
        >>> params["w"]
        tensor([0.9000, 1.1000])
    """
    if decoupled_weight_decay and decay_scaling not in (None, "schedule"):
        raise ValueError(
            "lion: decoupled_weight_decay=True is decay_scaling='schedule' (the decay "
            f"divided by the initial lr); it cannot combine with {decay_scaling!r}"
        )
    scaling: DecayScaling = (
        decay_scaling
        if decay_scaling is not None
        else ("schedule" if decoupled_weight_decay else "lr")
    )
    # The keyword tail (decay, prox, mask, skip_nonfinite, clip), read by name.
    options = regularization("lion", locals(), decoupled=True, decay_scaling=scaling)

    def init_slots(p: Tensor) -> tuple[Tensor | None, ...]:
        return (torch.zeros_like(p),)

    def rule(
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        (exp_avg,) = slots
        assert exp_avg is not None
        if maximize:
            g = -g
        beta1, beta2 = h["beta1"], h["beta2"]
        update = torch.sign(exp_avg * beta1 + g * (1 - beta1))
        weight_decay = h["weight_decay"] if decay else 0.0
        if not is_zero(weight_decay):
            if scaling == "schedule":
                # lion_pytorch divides the decay by the initial lr first: kept to the bit.
                coefficient = h["lr"] * (weight_decay / h["decay_reference_lr"])
            else:
                coefficient = decay_coefficient(h, weight_decay, scaling)
            p = decayed(p, coefficient, update, reference=reference, cautious=cautious_decay)
        new_p = p - h["lr"] * update
        exp_avg = exp_avg * beta2 + g * (1 - beta2)
        return new_p, (exp_avg,)

    return options.finish(
        options.build(
            {"lr": lr, "betas": betas, "weight_decay": weight_decay},
            LionState,
            init_slots,
            rule,
            _INTERVALS,
        )
    )
