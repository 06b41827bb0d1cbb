"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, UNIT, Scalar
from ..select import Where
from ..tree import Params
from ._fused import sgd_kernel
from .base import LeafTable, Optimizer, Prox, ProxMetric, RuleOutput, is_zero
from .decay import DecayScaling, decay_coefficient, decay_rate, decayed
from .regularization import regularization

__all__ = ["SGDState", "sgd"]

_INTERVALS = {"momentum": NON_NEGATIVE, "dampening": UNIT}


class SGDState(NamedTuple):
    """State of :func:`sgd`.

    Attributes:
        momentum_buffer: per-leaf momentum, a pytree like the params (same leaf names, shapes,
            dtypes and devices), or ``()`` when ``momentum`` is a
            literal 0.
        count: per-leaf number of updates applied, as one int64 tensor of shape
            ``[n_leaves]`` (entry ``i`` for the ``i``-th leaf of the flattened params),
            or ``()`` likewise; a leaf's first update starts its buffer as
            ``torch.optim.SGD`` does. :func:`~functorch_reg.state_dict` splits it into
            per-leaf entries.
        skipped: steps skipped for a non-finite gradient (``skip_nonfinite=True``), a
            0-d int64 tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.sgd(lr=0.1, momentum=0.9).init({"w": torch.ones(2, 3), "b": torch.zeros(3)})
        >>> state.momentum_buffer["w"].shape, state.count
        (torch.Size([2, 3]), tensor([0, 0]))
    """

    momentum_buffer: Params | tuple[()]
    # Shadows tuple.count, which type checkers flag; the name is kept: it is a
    # state_dict key (checkpoints) and says what the field holds.
    count: Tensor | tuple[()]  # type: ignore[assignment]
    skipped: Tensor

    @classmethod
    def leaf_table_field(cls) -> str:
        """The field that holds a row per leaf in one tensor (see
        :class:`~functorch_reg.optim.base.LeafTable`)."""
        return "count"


def _init_count(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _advance_count(count: Tensor, h: Mapping[str, Scalar]) -> tuple[Tensor, Tensor]:
    return count + 1, count > 0


_COUNT = LeafTable(_init_count, _advance_count)
"""The ``count`` table: per leaf, the updates applied, and for the rule whether the
momentum buffer has started (torch.optim.SGD's first step sets ``buf = g``)."""


def sgd(
    lr: Scalar,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
    decoupled: bool = False,
    mask: Where = None,
    prox: Prox | None = None,
    prox_strength: Scalar = 0.0,
    skip_nonfinite: bool = False,
    *,
    decay_scaling: DecayScaling = "lr",
    decay_reference_lr: Scalar | None = None,
    decay_timescale: Scalar | None = None,
    cautious_decay: bool = False,
    decay_to: Params | None = None,
    clip_grad_norm: Scalar | None = None,
    fused: bool = False,
    prox_metric: ProxMetric = "euclidean",
) -> Optimizer:
    r"""SGD with momentum, matching ``torch.optim.SGD`` step for step.

    For each leaf, with gradient :math:`g_t` (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda w_{t-1}  \quad \text{(coupled decay, on mask)} \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t \quad (b_1 = g_1) \\
        d_t &= g_t + \mu b_t \text{ if nesterov else } b_t \\
        w_t &= w_{t-1} - \eta d_t \\
        w_t &\leftarrow \operatorname{prox}(w_t, \eta \rho) \quad \text{(prox, on mask)}

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``,
    :math:`\lambda` = ``weight_decay``, :math:`\rho` = ``prox_strength``. With
    ``decoupled=True`` the decay is applied as :math:`w \leftarrow (1 - \eta\lambda) w`
    before the step instead (or a variant chosen by ``decay_scaling``,
    ``cautious_decay`` and ``decay_to``: see :func:`functorch_reg.adam`). Coupled
    ``weight_decay = 2 * lam`` follows the same trajectory as adding
    ``lam * penalties.l2(params)`` to the loss. With ``clip_grad_norm`` the gradients
    are first clipped to that global norm, as ``torch.nn.utils.clip_grad_norm_``.

    With momentum, the Euclidean prox (``prox_metric="euclidean"``, the default) has
    fixed points that solve ``loss + (1 - mu) / (1 - tau) * rho * P`` (at ``mu = 0.9``,
    a tenth of the strength asked for): in steady state the buffer is
    :math:`(1 - \tau) g / (1 - \mu)`. ``prox_metric="preconditioned"`` takes the prox in
    the metric of that steady-state step, :math:`D = (1 - \mu) / (1 - \tau)`, i.e. the
    threshold ``lr * rho * (1 - tau) / (1 - mu)`` (Nesterov's step has the same steady
    state), so that the fixed points solve ``loss + rho * P``. Without momentum both
    metrics are the same.

    Every scalar hyperparameter is a float or a 0-d tensor and can be overridden per
    call: ``opt.step(params, grads, state, lr=lr_t)``. A literal ``0`` switches a term
    off; pass a tensor (``torch.tensor(0.9)``) to sweep or schedule ``momentum``.

    Args:
        lr: learning rate :math:`\eta`.
        momentum: momentum factor :math:`\mu`.
        dampening: dampening :math:`\tau` of the momentum.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 decay :math:`\lambda`, on the leaves chosen by ``mask``.
        maximize: ascend the objective instead of descending it.
        decoupled: apply ``weight_decay`` to the weights rather than the gradient.
        mask: which leaves get decay and prox (a ``where=`` selection; default all).
        prox: a proximal operator such as :func:`functorch_reg.prox.l1`, applied as
            ``prox({leaf_name: w}, lr * prox_strength)`` after the step, once on all
            the leaves that ``mask`` selects (so a ``where=`` inside it sees leaf
            names; see :class:`functorch_reg.optim.base.Prox`).
        prox_strength: :math:`\rho`, the strength of the proximal penalty.
        skip_nonfinite: leave params and state untouched on a step whose gradients
            hold a NaN or an infinity, and count it in ``state.skipped``.
        decay_scaling: ``"lr"``, ``"schedule"``, ``"corrected"`` or ``"none"``
            (decoupled only), as in :func:`functorch_reg.adam`.
        decay_reference_lr: :math:`\eta_0` for ``"schedule"``, ``"corrected"`` and
            ``decay_timescale`` (default: ``lr`` as constructed).
        decay_timescale: the decoupled decay as a timescale in steps instead of
            ``weight_decay``, as in :func:`functorch_reg.adam`.
        cautious_decay: decoupled decay only where the step direction and the weight
            agree in sign, as in :func:`functorch_reg.adam`.
        decay_to: decoupled decay toward these weights (matched by leaf name)
            rather than toward zero.
        clip_grad_norm: clip the gradients to this global norm before the step.
        fused: outside ``torch.compile``, step each group of leaves (one dtype and
            device, contiguous) with torch's fused kernel ``torch._fused_sgd_``, as
            ``torch.optim``'s ``fused=True``, within a few units in the last place
            of the default path. Groups with a prox or tensor hyperparameters off
            the CPU take the default path.
        prox_metric: ``"euclidean"`` (default) or ``"preconditioned"``, see above
            (needs ``dampening < 1``).

    Raises:
        ValueError: a hyperparameter out of range or not finite (``lr``,
            ``momentum``, ``weight_decay`` negative, ...); ``nesterov`` without
            momentum or with dampening; ``fused=True`` with ``decoupled=True``; an
            unknown ``prox_metric``, or ``"preconditioned"`` with ``dampening >= 1``;
            at a step, ``grads`` or ``mask`` that do not fit the params (naming the
            leaf).
        TypeError: a hyperparameter that is neither a float nor a tensor; an unknown
            keyword at a step.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(3)}
        >>> opt = fr.sgd(lr=0.1, momentum=0.9)
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(3)}, state)
        >>> params["w"]
        tensor([0.9000, 0.9000, 0.9000])
    """
    has_momentum = not is_zero(momentum)
    if fused and decoupled:
        raise ValueError(
            "sgd: fused=True runs torch's fused kernel, which implements coupled decay "
            "only; drop fused=True or decoupled=True"
        )
    # The keyword tail (decay, prox, mask, skip_nonfinite, clip), read by name.
    options = regularization("sgd", locals(), check_factor=True)
    in_metric = options.in_metric and has_momentum
    _check_momentum(nesterov, momentum, dampening, in_metric)

    def init_slots(p: Tensor) -> tuple[Tensor | None]:
        return (torch.zeros_like(p) if has_momentum else None,)

    def rule(
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> RuleOutput:
        (buf,) = slots
        if maximize:
            g = -g
        weight_decay = decay_rate(h, decay_scaling) if decay else 0.0
        if not is_zero(weight_decay) and not decoupled:
            g = g + weight_decay * p
        if has_momentum:
            if buf is None or row is None:
                raise ValueError("sgd: momentum override needs a state made with momentum != 0")
            # buf starts at zero, so the first step gives buf = g as in torch.optim.SGD.
            started = row.to(g.dtype)
            buf = h["momentum"] * buf + (1 - h["dampening"] * started) * g
            g = g + h["momentum"] * buf if nesterov else buf
        elif not is_zero(h["momentum"]):
            raise ValueError("sgd: momentum override needs a state made with momentum != 0")
        if not is_zero(weight_decay) and decoupled:
            coefficient = decay_coefficient(h, weight_decay, decay_scaling)
            p = decayed(p, coefficient, g, reference=reference, cautious=cautious_decay)
        if in_metric:
            # The steady state of the buffer is (1 - tau) g / (1 - mu).
            return p - h["lr"] * g, (buf,), (1 - h["momentum"]) / (1 - h["dampening"])
        return p - h["lr"] * g, (buf,)

    return options.finish(
        options.build(
            {"lr": lr, "momentum": momentum, "dampening": dampening},
            SGDState,
            init_slots,
            rule,
            _INTERVALS,
            table=_COUNT if has_momentum else None,
            fused=sgd_kernel(has_momentum=has_momentum, nesterov=nesterov, maximize=maximize)
            if fused
            else None,
        )
    )


def _check_momentum(nesterov: bool, momentum: Scalar, dampening: Scalar, in_metric: bool) -> None:
    """The momentum options of :func:`sgd` that do not fit together."""
    if nesterov and (is_zero(momentum) or not is_zero(dampening)):
        raise ValueError("sgd: nesterov needs momentum > 0 and dampening == 0")
    if in_metric and not isinstance(dampening, Tensor) and dampening >= 1:
        raise ValueError(
            "sgd: prox_metric='preconditioned' needs dampening < 1 (with dampening=1 the "
            "momentum buffer never takes a gradient after the first step)"
        )
