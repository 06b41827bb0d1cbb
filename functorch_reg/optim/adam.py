"""Adam and AdamW, as ``torch.optim.Adam`` and ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, UNIT_OPEN, Scalar
from ..select import Where
from ..tree import Params
from ._fused import adam_kernel
from .base import LeafTable, Optimizer, Prox, ProxMetric, RuleOutput, is_zero
from .decay import DecayScaling, decay_coefficient, decay_rate, decayed
from .regularization import regularization

__all__ = ["AdamState", "adam", "adamw"]

_INTERVALS = {"beta1": UNIT_OPEN, "beta2": UNIT_OPEN, "eps": NON_NEGATIVE}


class AdamState(NamedTuple):
    """State of :func:`adam` and :func:`adamw`.

    Attributes:
        exp_avg: per-leaf first moment :math:`m`, a pytree like the params (same leaf names, shapes,
            dtypes and devices).
        exp_avg_sq: per-leaf second moment :math:`v`, likewise.
        max_exp_avg_sq: per-leaf running max of :math:`v` (``amsgrad``), else ``()``.
        beta_powers: per-leaf products of the betas over the leaf's updates, as one
            float64 tensor of shape ``[n_leaves, 2]`` (row ``i`` for the ``i``-th leaf
            of the flattened params): :math:`(\\prod_s \\beta_{1,s}, \\prod_s
            \\beta_{2,s})`, i.e. :math:`(\\beta_1^t, \\beta_2^t)` for constant betas.
            One tensor rather than one per leaf, so a step updates them all with one
            kernel. A plain tensor on the params' device even for DTensor params: it
            is the same on every rank. :func:`~functorch_reg.state_dict` splits it into
            per-leaf rows.
        skipped: steps skipped for a non-finite gradient (``skip_nonfinite=True``), a
            0-d int64 tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.adam().init({"w": torch.ones(2, 3), "b": torch.zeros(3)})
        >>> state.exp_avg["w"].shape, state.beta_powers.shape
        (torch.Size([2, 3]), torch.Size([2, 2]))
    """

    exp_avg: Params
    exp_avg_sq: Params
    max_exp_avg_sq: Params | tuple[()]
    beta_powers: Tensor
    skipped: Tensor

    @classmethod
    def leaf_table_field(cls) -> str:
        """The field that holds a row per leaf in one tensor (see
        :class:`~functorch_reg.optim.base.LeafTable`)."""
        return "beta_powers"


def _init_beta_powers(device: torch.device) -> Tensor:
    return torch.ones(2, dtype=torch.float64, device=device)


def _advance_beta_powers(beta_powers: Tensor, h: Mapping[str, Scalar]) -> tuple[Tensor, Tensor]:
    beta_powers = torch.stack(
        [beta_powers[:, 0] * h["beta1"], beta_powers[:, 1] * h["beta2"]], dim=1
    )
    # Kept in float64 like torch.optim's Python-float bias corrections, and made for
    # all leaves at once, so each leaf's loop loads two numbers rather than
    # recomputing a float64 division and square root in every vector iteration.
    corrections = torch.stack(
        [h["lr"] / (1 - beta_powers[:, 0]), (1 - beta_powers[:, 1]).sqrt()], dim=1
    )
    return beta_powers, corrections


_BETA_POWERS = LeafTable(_init_beta_powers, _advance_beta_powers)
"""The ``beta_powers`` table: per leaf, the products of the betas, and for the rule the
step size ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``."""


def adam(
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
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
    r"""Adam, matching ``torch.optim.Adam`` (and ``AdamW`` when ``decoupled``) step for step.

    For each leaf, with gradient :math:`g_t` (negated when ``maximize``) and the
    leaf's update count :math:`t`:

    .. math::
        g_t &\leftarrow g_t + \lambda w_{t-1} \quad \text{(coupled decay, on mask)} \\
        w_{t-1} &\leftarrow (1 - \eta\lambda)\, w_{t-1} \quad \text{(decoupled decay instead)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \quad
            (\hat v_t = \max(\hat v_{t-1}, v_t) \text{ with amsgrad}) \\
        w_t &= w_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon} \\
        w_t &\leftarrow \operatorname{prox}(w_t, \eta \rho) \quad \text{(prox, on mask)}

    The prox step has two metrics (``prox_metric``). ``"euclidean"`` (default) applies
    ``prox(w, lr * rho)`` after the preconditioned step: a heuristic, whose fixed points
    solve a reweighted problem, not ``loss + rho * P``. ``"preconditioned"`` takes the
    prox in the step's own metric :math:`D = \sqrt{\hat v_t} + \epsilon`, i.e.
    :math:`\arg\min_x \langle \hat m_t, x \rangle + \frac{1}{2\eta}\|x - w\|_D^2 +
    \rho P(x)`, which for a separable penalty is the per-coordinate threshold
    :math:`\eta \rho / D_i` (``prox(w, lr * rho / D)``; ``fr.prox.group_lasso`` solves
    its groups' 1-D problems). Its fixed points (:math:`\hat m = \nabla L`) are
    exactly the solutions of ``loss + rho * P``: Adam trained this way reaches
    scikit-learn's ``Lasso`` solution, exact zeros included. The prox must accept a
    threshold tensor shaped like the leaf, as every ``fr.prox`` operator does.

    Coupled decay (the default here, as ``torch.optim.Adam``) is an L2 penalty seen
    through the preconditioner; decoupled decay (``adamw``) shrinks the weights
    directly. Decoupled decay has three options (coupled decay takes none of them):

    * ``decay_scaling``: the shrink factor :math:`c` in
      :math:`w \leftarrow w - c\,(w - w_\text{ref})`: ``"lr"`` gives
      :math:`c = \eta\lambda` (``torch.optim.AdamW``), ``"schedule"`` gives
      :math:`c = (\eta / \eta_0)\lambda` with :math:`\eta_0` = ``decay_reference_lr``
      (default: the constructed ``lr``), the AdamW paper's form, where the decay
      follows the schedule but not the peak lr; ``"corrected"`` gives
      :math:`c = (\eta^2 / \eta_0)\lambda` (AdamC, Defazio et al. 2025, arXiv
      2506.02285), equal to ``"lr"`` at :math:`\eta = \eta_0` and weaker as the
      schedule decays; ``"none"`` gives :math:`c = \lambda`.
    * ``decay_timescale``: the decay as its timescale :math:`\tau` in steps instead of
      ``weight_decay``: :math:`\lambda = 1 / (\eta_0 \tau)` (``"lr"``,
      ``"corrected"``) or :math:`1 / \tau` (``"schedule"``, ``"none"``), so a step at
      the peak lr shrinks by :math:`1/\tau` whatever that lr (Wang & Aitchison, arXiv
      2405.13698); see :func:`functorch_reg.convert_timescale` and
      :mod:`functorch_reg.optim.decay`.
    * ``cautious_decay`` (Chen et al., 2025, "Cautious Weight Decay", arXiv
      2510.12402): decay a
      coordinate only where :math:`\operatorname{sign}(u) \operatorname{sign}(w -
      w_\text{ref}) \ge 0`, with :math:`u = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`
      the step direction (:math:`w \leftarrow w - \eta u`) computed before the decay,
      from the gradient after ``maximize``. Ties decay: a zero update or a weight at
      its reference counts as agreeing. With ``decay_scaling="lr"`` this is the
      paper's :math:`w - \eta(u + \lambda \mathbb{1}[u \odot w \ge 0] \odot w)`;
      the tests compare it with a hand-written transcription of that rule (float64),
      not with another library (optax's proposed ``contrib.add_cautious_weight_decay``
      was never merged; heavyball's ``cautious_weight_decay`` also tests its update
      before the lr and steps by ``lr * weight_decay``). Beyond the paper, the mask
      here composes with the other scalings and with ``decay_to``, where it compares
      the signs of :math:`u` and :math:`w - w_\text{ref}` (the direction the decay
      would move).
    * ``decay_to``: a pytree of reference weights :math:`w_\text{ref}` (e.g. the
      pretrained ones), matched to the params by leaf name, needed on every leaf
      ``mask`` selects: the decoupled twin of :func:`functorch_reg.penalties.l2_sp`.

    The bias corrections use the running products of the betas kept in the
    state, which equal :math:`\beta^t` for constant betas and stay exact when a
    schedule changes them.

    Every scalar hyperparameter is a float or a 0-d tensor and can be overridden per
    call (``betas`` as a pair): ``opt.step(params, grads, state, lr=lr_t)``.

    Args:
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda`, on the leaves chosen by ``mask``.
        amsgrad: use the running maximum of :math:`v_t`.
        maximize: ascend the objective instead of descending it.
        decoupled: decoupled (AdamW) decay instead of coupled (L2) decay.
        mask: which leaves get decay and prox (a ``where=`` selection; default all).
        prox: a proximal operator such as :func:`functorch_reg.prox.l1`, applied as
            ``prox({leaf_name: w}, lr * prox_strength)`` after the step, once on all
            the leaves that ``mask`` selects (so a ``where=`` inside it sees leaf
            names; see :class:`functorch_reg.optim.base.Prox`).
        prox_strength: :math:`\rho`, the strength of the proximal penalty.
        skip_nonfinite: leave params and state untouched on a step whose gradients
            hold a NaN or an infinity, and count it in ``state.skipped``.
        decay_scaling: ``"lr"`` (default), ``"schedule"``, ``"corrected"`` or
            ``"none"``, see above.
        decay_reference_lr: :math:`\eta_0` for ``"schedule"``, ``"corrected"`` and
            ``decay_timescale``; overridable per call.
        decay_timescale: :math:`\tau` in steps (>= 1), instead of ``weight_decay``;
            overridable per call (and sweepable).
        cautious_decay: apply the decoupled decay only where it agrees with the step.
        decay_to: reference weights the decoupled decay pulls toward, copied at
            construction (the live params may be passed).
        clip_grad_norm: clip the gradients to this global norm first, as
            ``torch.nn.utils.clip_grad_norm_`` (see
            :func:`functorch_reg.clip_by_global_norm`); overridable per call.
        fused: outside ``torch.compile``, step each group of leaves (one dtype and
            device, contiguous) with torch's fused kernel (``torch._fused_adam_``,
            ``_fused_adamw_`` when decoupled), as ``torch.optim``'s ``fused=True``:
            one pass over memory rather than one per operation, within a few units
            in the last place of the default path (which equals the per-leaf rule
            bit for bit). Groups with a prox, tensor hyperparameters off the CPU
            or betas changed by a schedule take the default path.
        prox_metric: ``"euclidean"`` (default) or ``"preconditioned"``, see above.

    Raises:
        ValueError: a hyperparameter out of range or not finite (``lr``, ``eps``,
            ``weight_decay`` negative; a beta outside ``[0, 1)``); ``decay_timescale``
            or ``decay_to`` without ``decoupled=True``; an unknown ``prox_metric``; at
            a step, ``grads`` or ``mask`` that do not fit the params (naming the leaf).
        TypeError: a hyperparameter that is neither a float nor a tensor; an unknown
            keyword at a step.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(2)}
        >>> opt = fr.adam(lr=0.1)
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> params["w"]
        tensor([0.9000, 1.1000])
    """

    name = "adamw" if decoupled else "adam"
    # The keyword tail (decay, prox, mask, skip_nonfinite, clip), read by name.
    options = regularization(name, locals(), check_factor=True)
    if fused:
        _check_fused(name, decay_scaling, cautious_decay, decay_to)
    in_metric = options.in_metric

    def init_slots(p: Tensor) -> tuple[Tensor | None, ...]:
        max_exp_avg_sq = torch.zeros_like(p) if amsgrad else None
        return torch.zeros_like(p), torch.zeros_like(p), max_exp_avg_sq

    def rule(
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> RuleOutput:
        exp_avg, exp_avg_sq, max_exp_avg_sq = slots
        assert exp_avg is not None and exp_avg_sq is not None and row is not None
        beta1, beta2 = h["beta1"], h["beta2"]
        if maximize:
            g = -g
        weight_decay = decay_rate(h, decay_scaling) if decay else 0.0
        if not is_zero(weight_decay) and not decoupled:
            g = g + weight_decay * p
        exp_avg = exp_avg + (g - exp_avg) * (1 - beta1)
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * (g * g)
        if max_exp_avg_sq is not None:
            max_exp_avg_sq = torch.maximum(max_exp_avg_sq, exp_avg_sq)
        second = exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq
        step_size, bias_correction2_sqrt = row.unbind()
        denom = second.sqrt() / bias_correction2_sqrt + h["eps"]
        direction = exp_avg / denom
        if not is_zero(weight_decay) and decoupled:
            coefficient = decay_coefficient(h, weight_decay, decay_scaling)
            p = decayed(p, coefficient, direction, reference=reference, cautious=cautious_decay)
        new_p = p - step_size * direction
        if in_metric:
            return new_p, (exp_avg, exp_avg_sq, max_exp_avg_sq), denom
        return new_p, (exp_avg, exp_avg_sq, max_exp_avg_sq)

    return options.finish(
        options.build(
            {"lr": lr, "betas": betas, "eps": eps},
            AdamState,
            init_slots,
            rule,
            _INTERVALS,
            table=_BETA_POWERS,
            fused=adam_kernel(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
            if fused
            else None,
        )
    )


def _check_fused(
    name: str, decay_scaling: str, cautious_decay: bool, decay_to: Params | None
) -> None:
    """Refuse the decay options that torch's fused Adam kernel does not implement."""
    if cautious_decay or decay_to is not None or decay_scaling != "lr":
        raise ValueError(
            f"{name}: fused=True runs torch's fused kernel, which implements "
            "decay_scaling='lr' without cautious_decay or decay_to; drop fused=True"
        )


def adamw(
    lr: Scalar = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
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
    r"""AdamW: Adam with decoupled weight decay, matching ``torch.optim.AdamW`` step for step.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019). For each
    leaf chosen by ``mask``, the weights shrink before the Adam step, outside the
    preconditioner:

    .. math::
        w_{t-1} &\leftarrow w_{t-1} - c\,(w_{t-1} - w_\text{ref}),
            \quad c = \eta\lambda \text{ by default}, \; w_\text{ref} = 0 \\
        w_t &= w_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`m_t, v_t` Adam's moments of the raw gradient (see :func:`adam`). Unlike
    ``fr.adam``'s coupled decay this is no penalty in the loss: with Adam the two differ.
    It is ``fr.adam(..., decoupled=True)`` with ``weight_decay=1e-2`` by default (the
    default of ``torch.optim.AdamW``); :func:`adam` documents the decay options
    (``decay_scaling``, ``decay_timescale``, ``cautious_decay``, ``decay_to``) and
    ``prox_metric`` in full. Every scalar is a float or a 0-d tensor, overridable per
    call.

    Args:
        lr: learning rate :math:`\eta` (absolute, per step).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda`, the decoupled decay on the leaves ``mask``
            chooses; default ``1e-2`` (``0`` when ``decay_timescale`` is given).
        amsgrad: use the running maximum of :math:`v_t`.
        maximize: ascend the objective instead of descending it.
        mask: which leaves get decay and prox (a ``where=`` selection; default all,
            biases included: pass ``fr.select.weights()`` for the usual rule).
        prox: a proximal operator such as :func:`functorch_reg.prox.l1`, applied after
            the step as ``prox({leaf_name: w}, lr * prox_strength)``.
        prox_strength: :math:`\rho`, the strength of the proximal penalty.
        skip_nonfinite: skip a step whose gradients hold a NaN or an infinity, and
            count it in ``state.skipped``.
        decay_scaling: ``"lr"`` (default), ``"schedule"``, ``"corrected"`` or ``"none"``.
        decay_reference_lr: :math:`\eta_0` for the scalings and ``decay_timescale``.
        decay_timescale: the decay as a timescale :math:`\tau` in steps (>= 1).
        cautious_decay: decay only where the decay agrees with the step's sign
            (arXiv 2510.12402).
        decay_to: reference weights :math:`w_\text{ref}` the decay pulls toward.
        clip_grad_norm: clip the gradients to this global norm first.
        prox_metric: ``"euclidean"`` (default) or ``"preconditioned"``.

    Returns:
        An :class:`~functorch_reg.optim.base.Optimizer` (``init``, ``step``, ``step_``);
        its state holds ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) per leaf,
        in the leaf's dtype and device.

    Raises:
        ValueError: a hyperparameter is out of range or not finite, ``mask`` or
            ``decay_to`` does not fit the params, or both ``weight_decay`` and
            ``decay_timescale`` are given (the same errors as :func:`adam`).
        TypeError: a hyperparameter has the wrong type.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(2)}
        >>> opt = fr.adamw(lr=0.1, weight_decay=0.5)
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> params["w"]  # 1 - 0.1 * 0.5 = 0.95, then the Adam step of +-0.1
        tensor([0.8500, 1.0500])
    """
    if weight_decay is None:
        weight_decay = 0.0 if decay_timescale is not None else 1e-2
    return adam(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled=True,
        mask=mask,
        prox=prox,
        prox_strength=prox_strength,
        skip_nonfinite=skip_nonfinite,
        decay_scaling=decay_scaling,
        decay_reference_lr=decay_reference_lr,
        decay_timescale=decay_timescale,
        cautious_decay=cautious_decay,
        decay_to=decay_to,
        clip_grad_norm=clip_grad_norm,
        fused=fused,
        prox_metric=prox_metric,
    )
