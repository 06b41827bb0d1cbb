r"""Small pure transforms every training loop needs: global-norm gradient clipping, an
exponential moving average of the weights, and gradient accumulation.

Each works on any pytree (per-leaf trees and flat buffers alike), inside
``torch.compile(fullgraph=True)`` and under ``vmap`` (hyperparameters as tensors with
a leading batch dim). ``None`` leaves (frozen gradients) stay ``None``.

Gradient accumulation over ``k`` micro-batches is a sum and one step::

    total = None
    for i, (x, y) in enumerate(micro_batches):
        grads = torch.func.grad(loss)(params, x, y)
        total = fr.accumulate(total, grads, scale=1 / k)  # the mean over micro-batches
        if (i + 1) % k == 0:
            params, state = opt.step(params, total, state)
            total = None

With the flat layout or ``step_``, :func:`accumulate_` adds into an existing gradient
buffer in place instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ._checks import NON_NEGATIVE, UNIT, Interval, Scalar, check_scalars
from ._memory import check_writable
from .tree import (
    Params,
    flatten,
    full_tensor,
    is_float,
    matching_leaves,
    reduce_partial,
    spec_names,
)

__all__ = [
    "EMA",
    "EMAState",
    "accumulate",
    "accumulate_",
    "clip_by_global_norm",
    "ema",
    "global_norm",
]

CLIP_EPS = 1e-6
"""Added to the total norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""

_FINITE = Interval(low=-math.inf)


def global_norm(grads: Params, norm_type: float = 2.0) -> Tensor:
    r"""The ``norm_type``-norm of all leaves of ``grads`` seen as one vector.

    Computed as ``torch.nn.utils.get_total_norm``: the norm of the per-leaf norms.
    DTensor leaves contribute their global norm (a collective: every rank calls this
    and gets the same plain tensor). ``None`` leaves are skipped; with none left the
    norm is ``tensor(0.)``.

    .. math:: \|g\|_p = \Bigl\|\bigl(\|g_1\|_p, \ldots, \|g_L\|_p\bigr)\Bigr\|_p

    Args:
        grads: a pytree of tensors of any shapes and floating dtypes (or ``None``).
        norm_type: :math:`p`, a positive float or ``math.inf``.

    Returns:
        A 0-d tensor, absolute (not per sample or per entry), in the promoted dtype of
        the leaves, on the first leaf's device.

    Raises:
        ValueError: ``norm_type`` is not positive.
        TypeError: ``norm_type`` is not a number, or a leaf is not a tensor or ``None``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "c": None})
        tensor(5.)
    """
    norm_type = _check_norm_type("global_norm", norm_type)
    present = [g for g in flatten(grads)[0] if g is not None]
    if not present:
        return torch.tensor(0.0)
    for leaf in present:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"global_norm: leaves must be tensors, got {type(leaf).__name__}")
    device = present[0].device
    norms = [
        full_tensor(reduce_partial(torch.linalg.vector_norm(g, norm_type))).to(device)
        for g in present
    ]
    dtype = functools.reduce(torch.promote_types, [norm.dtype for norm in norms])
    norm: Tensor = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), norm_type)
    return norm


def clip_by_global_norm(
    grads: Params, max_norm: Scalar, *, norm_type: float = 2.0
) -> tuple[Params, Tensor]:
    r"""Scale ``grads`` so that their global norm is at most ``max_norm``.

    .. math::
        g \leftarrow g \cdot \min\Bigl(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\Bigr)

    the same result as ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``
    (either ``foreach`` setting), without modifying ``grads``. The norm is
    :func:`global_norm` (DTensor leaves included); ``None`` leaves stay ``None``.

    Args:
        grads: a pytree of gradients.
        max_norm: the largest global norm let through (a float or a 0-d tensor, >= 0).
        norm_type: :math:`p`, a positive float or ``math.inf``.

    Returns:
        ``(clipped_grads, total_norm)``, the norm measured before clipping.

    Raises:
        ValueError: ``max_norm`` negative or not finite, ``norm_type`` not positive.

    Example:
        >>> clipped, norm = clip_by_global_norm({"w": torch.tensor([3.0, 4.0])}, 1.0)
        >>> norm, clipped["w"]
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    check_scalars("clip_by_global_norm", {"max_norm": max_norm}, {"max_norm": NON_NEGATIVE})
    total_norm = global_norm(grads, norm_type)
    leaves, spec = flatten(grads)
    if all(g is None for g in leaves):
        return grads, total_norm
    clip_coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
    clipped = [None if g is None else g * clip_coef.to(g.device) for g in leaves]
    return spec.unflatten(clipped), total_norm


class EMAState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
        params: the moving average, a pytree with the structure, shapes, dtypes and
            devices of the params.
        n_averaged: updates averaged so far, a 0-d int64 tensor (as
            ``AveragedModel.n_averaged``).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.ema(0.9).init({"w": torch.ones(2)})
        >>> state.params["w"], state.n_averaged
        (tensor([1., 1.]), tensor(0))
    """

    params: Params
    n_averaged: Tensor


class EMA(NamedTuple):
    """An exponential moving average of the weights as pure functions.

    Attributes:
        init: ``init(params) -> EMAState``, the average starting as a copy.
        update: ``update(params, state, decay=None) -> EMAState``, pure; ``decay``
            overrides the constructed decay for this call (a float or a tensor).
        update_: ``update_(params, state, decay=None) -> None``, the same update
            written into ``state`` in place.
        hyperparams: the construction-time hyperparameters.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> average = fr.ema(0.9)
        >>> state = average.init({"w": torch.zeros(2)})
        >>> average.update_({"w": torch.ones(2)}, state)  # in place
        >>> state.params["w"], state.n_averaged
        (tensor([1., 1.]), tensor(1))
    """

    init: Callable[[Params], EMAState]
    update: Callable[..., EMAState]
    update_: Callable[..., None]
    hyperparams: Mapping[str, Any]


def ema(decay: Scalar = 0.999, *, warmup: bool = False) -> EMA:
    r"""An exponential moving average of the weights, as ``torch.optim.swa_utils``'
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``.

    With :math:`t` the number of updates averaged so far (``state.n_averaged``):

    .. math::
        \bar w \leftarrow \begin{cases}
            w & t = 0 \text{ (the first update copies, as AveragedModel)} \\
            \bar w + (1 - \beta_t)(w - \bar w) & t > 0
        \end{cases}, \qquad
        \beta_t = \begin{cases}
            \min\bigl(\beta, \frac{1 + t}{10 + t}\bigr) & \text{warmup} \\
            \beta & \text{otherwise}
        \end{cases}

    The warm-up is TensorFlow's ``ExponentialMovingAverage(decay, num_updates=t)``
    form (timm's ``ModelEmaV3`` warms up with a power law instead; optax's ``ema``
    debiases instead): early averages follow the weights more closely, so they are
    not dominated by the first weights. Without it the
    result equals ``AveragedModel`` update for update (``torch.lerp`` as its
    ``_foreach_lerp_``). Non-floating leaves are copied at ``init`` and left so.
    ``update_`` checks every average before the first write (as ``step_``: inference,
    expanded or tied averages are refused), so an error moves neither the average nor
    its count.

    Args:
        decay: :math:`\beta` in ``[0, 1]``, per update (call ``update`` once per
            optimizer step for the usual per-step decay), a float or a 0-d tensor.
        warmup: cap the decay by :math:`(1 + t) / (10 + t)`.

    Returns:
        An :class:`EMA` of pure functions ``init``, ``update`` and ``update_``.

    Raises:
        ValueError: ``decay`` (here or in ``update(decay=)``) is outside ``[0, 1]``;
            at ``init``, the params hold no floating tensor; at ``update``, the state's
            leaves differ from the params' in names, shapes, dtype or device.
        TypeError: ``update`` gets an unknown keyword or a state that is not an
            :class:`EMAState`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> average = fr.ema(0.5)
        >>> state = average.init({"w": torch.zeros(2)})
        >>> state = average.update({"w": torch.ones(2)}, state)  # the first update copies
        >>> state = average.update({"w": torch.full((2,), 3.0)}, state)
        >>> state.params["w"]
        tensor([2., 2.])
    """
    check_scalars("ema", {"decay": decay}, {"decay": UNIT})
    defaults = {"decay": decay}

    def init(params: Params) -> EMAState:
        leaves, spec = flatten(params)
        floats = [leaf for leaf in leaves if is_float(leaf)]
        if not floats:
            raise ValueError("ema.init: params hold no floating-point tensor")
        # Every tensor is copied: integer buffers too (num_batches_tracked), which then
        # stay as they were at init rather than following the model's.
        average = [leaf.detach().clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        count = torch.zeros((), dtype=torch.int64, device=floats[0].device)
        return EMAState(spec.unflatten(average), count)

    def weights(
        params: Params, state: EMAState, overrides: dict[str, Any]
    ) -> tuple[list[Any], optree.PyTreeSpec, list[Any], Tensor]:
        """The leaves, the average's leaves and the interpolation weight; checks everything."""
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise TypeError(
                f"ema.update() got unknown hyperparameter {unknown[0]!r}; it accepts decay"
            )
        beta = overrides.get("decay", decay)
        check_scalars("ema", {"decay": beta}, {"decay": UNIT})
        if not isinstance(state, EMAState):
            raise TypeError(f"ema: state must be an EMAState, got {type(state).__name__}")
        leaves, spec = flatten(params)
        averages = matching_leaves(leaves, spec, state.params, other_name="state.params")
        for name, p, average in zip(spec_names(spec), leaves, averages, strict=True):
            if is_float(p) and (
                not is_float(average) or average.dtype != p.dtype or average.device != p.device
            ):
                got = f"{average.dtype} on {average.device}" if is_float(average) else repr(average)
                raise ValueError(
                    f"ema: state.params leaf {name!r} is {got}, the param "
                    f"is {p.dtype} on {p.device}"
                )
        count = state.n_averaged
        beta = (
            beta.to(torch.float64)
            if isinstance(beta, Tensor)
            else torch.tensor(beta, dtype=torch.float64, device=count.device)
        )
        if warmup:
            t = count.to(torch.float64)
            beta = torch.minimum(beta, (1 + t) / (10 + t))
        # AveragedModel copies on its first update: weight 1 makes lerp return w exactly.
        weight = torch.where(count == 0, torch.ones_like(beta), 1 - beta)
        return leaves, spec, averages, weight

    def update(params: Params, state: EMAState, **overrides: Any) -> EMAState:
        leaves, spec, averages, weight = weights(params, state, overrides)
        new = [
            torch.lerp(average, p.detach(), weight.to(p.dtype)) if is_float(p) else average
            for p, average in zip(leaves, averages, strict=True)
        ]
        return EMAState(spec.unflatten(new), state.n_averaged + 1)

    def update_(params: Params, state: EMAState, **overrides: Any) -> None:
        with torch.no_grad():
            leaves, spec, averages, weight = weights(params, state, overrides)
            written = [i for i, p in enumerate(leaves) if is_float(p)]
            names = spec_names(spec)
            check_writable(
                "ema.update_",
                [averages[i] for i in written] + [state.n_averaged],
                lambda k: (
                    f"state.params {names[written[k]]!r}"
                    if k < len(written)
                    else "state.n_averaged"
                ),
                "update()",
            )
            # Checked before the first write: an error leaves average and count as they were.
            for p, average in zip(leaves, averages, strict=True):
                if is_float(p):
                    average.lerp_(p, weight.to(p.dtype))
            state.n_averaged.add_(1)

    return EMA(init, update, update_, defaults)


def accumulate(total: Params | None, grads: Params, *, scale: Scalar = 1.0) -> Params:
    """``total + scale * grads`` leaf by leaf: one micro-batch added to a gradient sum.

    ``total=None`` starts a sum. A ``None`` leaf of ``grads`` leaves its sum as it is;
    a ``None`` leaf of ``total`` takes ``scale * g``. With ``scale = 1 / k`` over ``k``
    micro-batches of equal size the sum is the full batch's mean gradient.

    Args:
        total: the running sum, a pytree like ``grads`` (same leaf names, shapes and
            dtypes), or ``None`` to start one.
        grads: one micro-batch's gradients, a pytree of tensors (or ``None`` leaves).
        scale: a finite float or 0-d tensor multiplying ``grads`` (relative; ``1 / k``
            for the mean of ``k`` micro-batches).

    Returns:
        A new pytree with ``grads``' structure; ``total`` is not modified.

    Raises:
        ValueError: ``scale`` is not finite; ``total``'s leaf names or shapes differ
            from ``grads``'; a leaf's dtype differs (a sum keeps its dtype).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> total = fr.accumulate(None, {"w": torch.tensor([2.0])}, scale=0.5)
        >>> fr.accumulate(total, {"w": torch.tensor([4.0])}, scale=0.5)
        {'w': tensor([3.])}
    """
    check_scalars("accumulate", {"scale": scale}, {"scale": _FINITE})
    grad_leaves, spec = flatten(grads)
    if total is None:
        totals: list[Any] = [None] * len(grad_leaves)
    else:
        totals = matching_leaves(
            grad_leaves, spec, total, reference_name="grads", other_name="total"
        )
    _check_dtypes("accumulate", spec, totals, grad_leaves)
    summed = [
        s if g is None else (g * scale if s is None else s + g * scale)
        for s, g in zip(totals, grad_leaves, strict=True)
    ]
    return spec.unflatten(summed)


def _check_dtypes(owner: str, spec: optree.PyTreeSpec, totals: list[Any], grads: list[Any]) -> None:
    """A sum keeps its dtype: ``accumulate`` and ``accumulate_`` refuse alike a grad of
    another dtype than its total (an fp64 grad would promote an fp32 total)."""
    for leaf, s, g in zip(spec_names(spec), totals, grads, strict=True):
        if g is not None and s is not None and s.dtype != g.dtype:
            raise ValueError(
                f"{owner}: total {leaf!r} is {s.dtype}, grads {g.dtype}; cast the grads "
                "(g.to(total.dtype)): a sum keeps its dtype"
            )


def accumulate_(total: Params, grads: Params, *, scale: Scalar = 1.0) -> None:
    """:func:`accumulate` written into ``total`` in place (e.g. a flat gradient buffer).

    Every leaf is checked before the first write, so an error changes nothing: a
    ``None`` leaf of ``total`` where ``grads`` has a tensor is an error, as are dtype
    (the same rule as :func:`accumulate`) or shape mismatches, an inference or expanded
    total, and two totals that share memory (tied, as ``step_`` refuses).

    Args:
        total: the running sum, a pytree of writable tensors like ``grads`` (same leaf
            names, shapes and dtypes).
        grads: one micro-batch's gradients (``None`` leaves are skipped).
        scale: a finite float or 0-d tensor multiplying ``grads``.

    Raises:
        ValueError: ``scale`` is not finite; ``total`` has another structure or shape,
            a ``None`` where ``grads`` has a tensor, another dtype, overlapping memory
            (``expand()``), or two leaves sharing memory; an inference-mode total.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> total = {"w": torch.zeros(2)}
        >>> fr.accumulate_(total, {"w": torch.tensor([2.0, 4.0])}, scale=0.5)
        >>> total["w"]
        tensor([1., 2.])
    """
    check_scalars("accumulate_", {"scale": scale}, {"scale": _FINITE})
    grad_leaves, spec = flatten(grads)
    totals = matching_leaves(grad_leaves, spec, total, reference_name="grads", other_name="total")
    names = spec_names(spec)
    for leaf, s, g in zip(names, totals, grad_leaves, strict=True):
        if g is not None and s is None:
            raise ValueError(f"accumulate_: total has no tensor at {leaf!r} to add into")
    _check_dtypes("accumulate_", spec, totals, grad_leaves)
    written = [i for i, g in enumerate(grad_leaves) if g is not None]
    check_writable(
        "accumulate_",
        [totals[i] for i in written],
        lambda k: f"total {names[written[k]]!r}",
        "accumulate()",
    )
    # Checked before the first write: an error leaves every total as it was.
    with torch.no_grad():
        for s, g in zip(totals, grad_leaves, strict=True):
            if g is not None:
                s.add_(g * scale)


def _check_norm_type(owner: str, norm_type: float) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"{owner}: norm_type must be a float, got {norm_type!r}")
    if not norm_type > 0:
        raise ValueError(f"{owner}: norm_type={norm_type!r} must be positive (or math.inf)")
    return float(norm_type)
