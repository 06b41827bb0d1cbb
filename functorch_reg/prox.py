r"""Proximal operators of the penalties, leaf by leaf.

Each operator solves, for every selected leaf ``v``,

.. math:: \operatorname{prox}(v, t) = \arg\min_x \tfrac12 \|x - v\|_2^2 + t \cdot P(x)

where ``P`` is the matching penalty of :mod:`functorch_reg.penalties` and
``t = threshold = step_size * lam``. All share one signature,
``prox.NAME(params, threshold, ..., where=None) -> params``; unselected leaves are
returned as they are. A proximal gradient step is
``prox.l1(params - lr * grads, lr * lam)``, and it gives exact zeros.

``threshold`` is a float or a 0-d tensor (a batched one under ``vmap``), or a tensor
that broadcasts to every selected leaf: a per-coordinate threshold :math:`t_i`, which
is the prox in the diagonal metric :math:`D = 1 / t` (scaled):

.. math:: \operatorname{prox}(v, t) = \arg\min_x \sum_i \frac{(x_i - v_i)^2}{2 t_i} + P(x).

An optimizer built with ``prox_metric="preconditioned"`` passes ``lr * lam / D`` this
way (Adam's :math:`D = \sqrt{\hat v} + \epsilon`), so that its fixed points solve
``loss + lam * P`` exactly. ``l1``, ``l2`` and ``elastic_net`` are separable, so the
per-coordinate form is their closed form entry by entry; ``group_lasso`` has no closed
form in a non-constant metric and solves a 1-D equation per group (see there).

A float or a CPU tensor is checked to be finite and non-negative; a tensor on an
accelerator is trusted (and so is any under ``torch.compile`` or ``vmap``), so that a
prox inside a training loop never waits on the device: a negative one would grow
``|v|``. The optimizers' ``prox_strength`` is checked like their other hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import NON_NEGATIVE, UNIT, Scalar, check_scalars
from .penalties import group_norms
from .select import Where, selected
from .tree import Params, flatten, spec_names

__all__ = ["elastic_net", "group_lasso", "l1", "l2", "soft_threshold"]


def soft_threshold(x: Tensor, threshold: Scalar) -> Tensor:
    r"""Soft-thresholding :math:`\operatorname{sign}(x) \max(|x| - t, 0)` on one tensor.

    The prox of :math:`t |x|` entry by entry (Donoho & Johnstone, 1994; Parikh & Boyd,
    *Proximal Algorithms*, 2014, sec. 6.5.2). Unlike :func:`l1` it takes one tensor,
    not a pytree, and does not check ``threshold`` (it is the building block).

    Args:
        x: a floating tensor of any shape.
        threshold: :math:`t \ge 0`, absolute: a float or a tensor that broadcasts to
            ``x``.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.prox.soft_threshold(torch.tensor([3.0, -0.5, -2.0]), 1.0)
        tensor([ 2., -0., -1.])
    """
    return x.sign() * (x.abs() - threshold).clamp_min(0)


def l1(params: Params, threshold: Scalar, *, where: Where = None) -> Params:
    r"""Soft-thresholding, the prox of :math:`t \sum_i |x_i|`: entries with
    :math:`|v_i| \le t` become exactly zero.

    :math:`x_i = \operatorname{sign}(v_i) \max(|v_i| - t_i, 0)` (Parikh & Boyd,
    *Proximal Algorithms*, 2014, sec. 6.5.2; the ISTA step of Beck & Teboulle, 2009).
    The matching penalty is :func:`functorch_reg.penalties.l1`.

    Args:
        params: a pytree of tensors (any shapes, floating dtypes), e.g. ``params - lr *
            grads`` after a gradient step.
        threshold: :math:`t = \text{lr} \cdot \lambda`, absolute, per step: a
            non-negative float, a 0-d tensor (batched under ``vmap``), or a floating
            tensor that broadcasts to every selected leaf (per-coordinate thresholds).
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included. Others are returned as is.

    Returns:
        A pytree with the structure, shapes and dtypes of ``params``.

    Raises:
        ValueError: ``threshold`` is negative or not finite (a float, or a CPU tensor),
            or a per-coordinate one does not broadcast to a selected leaf;
            ``where`` is a glob that matches no floating-point leaf.
        TypeError: a per-coordinate ``threshold`` is not floating point.

    Example:
        >>> import functorch_reg as fr
        >>> fr.prox.l1({"w": torch.tensor([3.0, -0.5, 1.0])}, 1.0)["w"]
        tensor([2., -0., 0.])
        >>> # a per-coordinate threshold (a diagonal metric)
        >>> fr.prox.l1({"w": torch.tensor([3.0, -0.5, 1.0])}, torch.tensor([2.0, 0.1, 0.5]))["w"]
        tensor([ 1.0000, -0.4000,  0.5000])
    """
    _check_threshold("l1", threshold)
    return _map_selected(params, where, lambda v: soft_threshold(v, threshold), threshold)


def l2(params: Params, threshold: Scalar, *, where: Where = None) -> Params:
    r"""Shrinkage :math:`v / (1 + 2t)`, the prox of :math:`t \sum_i x_i^2`.

    The factor is 2 because :func:`functorch_reg.penalties.l2` has no 1/2 (Parikh &
    Boyd, *Proximal Algorithms*, 2014, sec. 6.1.1, with :math:`\lambda = 2t`). It never
    gives zeros.

    Args:
        params: a pytree of tensors (any shapes, floating dtypes), e.g. ``params - lr *
            grads`` after a gradient step.
        threshold: :math:`t = \text{lr} \cdot \lambda`, absolute, per step: a
            non-negative float, a 0-d tensor (batched under ``vmap``), or a floating
            tensor that broadcasts to every selected leaf (per-coordinate thresholds).
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included. Others are returned as is.

    Returns:
        A pytree with the structure, shapes and dtypes of ``params``.

    Raises:
        ValueError: ``threshold`` is negative or not finite (a float, or a CPU tensor),
            or a per-coordinate one does not broadcast to a selected leaf;
            ``where`` is a glob that matches no floating-point leaf.
        TypeError: a per-coordinate ``threshold`` is not floating point.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.prox.l2({"w": torch.tensor([3.0, -1.5])}, 1.0)["w"]  # v / 3
        tensor([ 1.0000, -0.5000])
    """
    _check_threshold("l2", threshold)
    return _map_selected(params, where, lambda v: v / (1 + 2 * threshold), threshold)


def elastic_net(
    params: Params, threshold: Scalar, l1_ratio: float = 0.5, *, where: Where = None
) -> Params:
    r""":math:`\operatorname{soft}(v, t r) / (1 + t (1 - r))`, the prox of
    :math:`t \left(r \sum_i |x_i| + \frac{1 - r}{2} \sum_i x_i^2\right)`, ``r = l1_ratio``.

    The penalty is :func:`functorch_reg.penalties.elastic_net` (scikit-learn's
    parametrization; Zou & Hastie, 2005); the prox is soft-thresholding followed by
    shrinkage (Parikh & Boyd, *Proximal Algorithms*, 2014, sec. 6.5.3).
    ``l1_ratio=1`` is :func:`l1`.

    Args:
        params: a pytree of tensors (any shapes, floating dtypes), e.g. ``params - lr *
            grads`` after a gradient step.
        threshold: :math:`t = \text{lr} \cdot \lambda`, absolute, per step: a
            non-negative float, a 0-d tensor (batched under ``vmap``), or a floating
            tensor that broadcasts to every selected leaf (per-coordinate thresholds).
        l1_ratio: :math:`r`, a float in ``[0, 1]``.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included. Others are returned as is.

    Returns:
        A pytree with the structure, shapes and dtypes of ``params``.

    Raises:
        ValueError: ``threshold`` is negative or not finite (a float, or a CPU tensor),
            ``l1_ratio`` is outside ``[0, 1]``,
            or a per-coordinate one does not broadcast to a selected leaf;
            ``where`` is a glob that matches no floating-point leaf.
        TypeError: a per-coordinate ``threshold`` is not floating point.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.prox.elastic_net({"w": torch.tensor([3.0, 0.2])}, 1.0, l1_ratio=0.5)["w"]
        tensor([1.6667, 0.0000])
    """
    _check_threshold("elastic_net", threshold)
    check_scalars("prox.elastic_net", {"l1_ratio": l1_ratio}, {"l1_ratio": UNIT})
    return _map_selected(
        params,
        where,
        lambda v: soft_threshold(v, threshold * l1_ratio) / (1 + threshold * (1 - l1_ratio)),
        threshold,
    )


def group_lasso(
    params: Params, threshold: Scalar, dim: int | None = 0, *, where: Where = None
) -> Params:
    r"""Block soft-thresholding :math:`v_g \max(0, 1 - t \sqrt{|g|} / \|v_g\|_2)`, the prox
    of :math:`t \sum_g \sqrt{|g|}\, \|x_g\|_2`; groups are slices along ``dim`` as in
    :func:`functorch_reg.penalties.group_lasso`. Whole groups become exactly zero
    (Parikh & Boyd, *Proximal Algorithms*, 2014, sec. 6.5.4; Yuan & Lin, 2006).

    A 1-D leaf (a bias) has groups of one entry along ``dim=0``: its prox is plain
    soft-thresholding, :func:`l1`'s. With ``where=None`` biases are included; pass
    ``where=fr.select.weights()`` to leave them alone, or ``dim=None`` to make each
    leaf one group.

    With a per-coordinate threshold :math:`t_i` (a tensor shaped like the leaf, e.g.
    ``lr * lam / D`` from an optimizer's diagonal metric :math:`D`), the prox
    :math:`\arg\min_x \sum_i (x_i - v_i)^2 / (2 t_i) + \sqrt{|g|} \|x_g\|` has no closed
    form. With :math:`b_i = \sqrt{|g|}\, t_i`, a group is zero iff
    :math:`\|v_g / b_g\|_2 \le 1`; otherwise :math:`x_i = v_i r / (r + b_i)` where
    :math:`r = \|x_g\| > 0` solves :math:`\sum_i v_i^2 / (r + b_i)^2 = 1`. That 1-D
    equation is solved for all groups at once by a fixed number of Newton steps on
    :math:`1 / \sqrt{\sum_i v_i^2 / (r + b_i)^2} - 1`, which is increasing and concave in
    :math:`r` (as in Moré & Sorensen's trust-region secular equation), so from the
    lower bound :math:`r_0 = \max(0, \|v_g\| - \max_i b_i, \max_i (|v_i| - b_i))` the
    iterates rise monotonically to the root (one step when :math:`t` is constant on the
    group, where the result equals the closed form). No data-dependent control flow:
    it compiles and vmaps.

    Args:
        params: a pytree of tensors (any shapes, floating dtypes), e.g. ``params - lr *
            grads`` after a gradient step.
        threshold: :math:`t = \text{lr} \cdot \lambda`, absolute, per step: a
            non-negative float, a 0-d tensor (batched under ``vmap``), or a floating
            tensor that broadcasts to every selected leaf (per-coordinate thresholds).
        dim: the dim whose slices are the groups (negative counts from the end), or
            ``None`` for one group per leaf.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included. Others are returned as is.

    Returns:
        A pytree with the structure, shapes and dtypes of ``params``.

    Raises:
        ValueError: ``threshold`` is negative or not finite (a float, or a CPU tensor),
            or a per-coordinate one does not broadcast to a selected leaf;
            a selected leaf has no dim ``dim`` (e.g. a 0-d leaf with ``dim=0``);
            ``where`` is a glob that matches no floating-point leaf.
        TypeError: a per-coordinate ``threshold`` is not floating point.

    Example:
        >>> import functorch_reg as fr
        >>> v = {"w": torch.tensor([[3.0, 4.0], [0.1, 0.1]], dtype=torch.float64)}
        >>> fr.prox.group_lasso(v, 1.0)["w"]  # groups: the rows (slices along dim 0)
        tensor([[2.1515, 2.8686],
                [0.0000, 0.0000]], dtype=torch.float64)
        >>> t = torch.tensor([[1.0, 0.1], [1.0, 1.0]], dtype=torch.float64)
        >>> fr.prox.group_lasso(v, t)["w"]  # per-coordinate thresholds
        tensor([[2.2826, 3.8781],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    _check_threshold("group_lasso", threshold)
    if isinstance(threshold, Tensor) and threshold.ndim > 0:
        return _map_selected(
            params, where, lambda v: _group_prox_in_metric(v, threshold, dim), threshold
        )
    return _map_selected(params, where, lambda v: _block_soft_threshold(v, threshold, dim))


_NEWTON_STEPS = 12
"""Newton steps of the diagonal-metric group prox. From the lower bound the error
squares each step near the root: on random float64 groups with thresholds spread over
twelve decades (and some zero), 6 steps reach a relative KKT residual of 1e-13 and 8
reach rounding; 12 leave a margin (tests/test_prox_metric.py checks below 1e-10)."""


def _group_prox_in_metric(v: Tensor, threshold: Tensor, dim: int | None) -> Tensor:
    """:func:`group_lasso`'s prox with a per-coordinate threshold (see there)."""
    reduce_dims = (
        list(range(v.ndim)) if dim is None else [d for d in range(v.ndim) if d != dim % v.ndim]
    )
    if v.numel() == 0:
        return v
    group_size = math.prod([v.shape[d] for d in reduce_dims])
    b = (math.sqrt(group_size) * threshold).to(v.dtype).expand_as(v)

    def group_sum(x: Tensor) -> Tensor:
        return x.sum(dim=reduce_dims, keepdim=True) if reduce_dims else x

    def group_max(x: Tensor) -> Tensor:
        return x.amax(dim=reduce_dims, keepdim=True) if reduce_dims else x

    # Zero iff ||v / b|| <= 1 (a coordinate with b = 0 and v != 0 makes the group live).
    positive = b > 0
    ratio = torch.where(positive, v / torch.where(positive, b, 1), 0)
    free = group_sum(((v != 0) & ~positive).to(v.dtype)) > 0
    live = free | (group_sum(ratio.square()) > 1)
    # The equation is homogeneous: divide by the largest |v| of the group (no overflow),
    # and give dead groups a stand-in (v = 1, b = 0, root sqrt(n)) so that no step
    # divides by zero and autograd sees no NaN.
    scale = group_max(v.abs())
    scale = torch.where(live & (scale > 0), scale, 1)
    u = torch.where(live, v / scale, 1)
    c = torch.where(live, b / scale, 0)
    u2 = u.square()
    norm = group_sum(u2).sqrt()
    r = torch.maximum(norm - group_max(c), group_max(u.abs() - c)).clamp_min(0)
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(_NEWTON_STEPS):
        shifted = (r + c).clamp_min(tiny)
        f = group_sum(u2 / shifted.square())
        slope = group_sum(u2 / shifted.pow(3))
        # G(r) = f^(-1/2) - 1, G'(r) = f^(-3/2) * slope: r <- r - G / G'.
        # Clamped: at a group on the threshold, rounding can put the root just below 0.
        r = (r + (f - f.sqrt()) / slope.clamp_min(tiny)).clamp_min(0)
    x = u * r / (r + c).clamp_min(tiny) * scale
    return torch.where(live, x, torch.zeros_like(x))


def _block_soft_threshold(v: Tensor, threshold: Scalar, dim: int | None) -> Tensor:
    norms, group_size = group_norms(v, dim)
    cut = threshold * math.sqrt(group_size)
    tiny = torch.finfo(v.dtype).tiny
    # Compared rather than left to ``1 - cut / norm``, which rounds to 1e-16, not 0,
    # when the norm equals the threshold.
    scale = torch.where(norms > cut, 1 - cut / norms.clamp_min(tiny), 0)
    return v * scale.to(v.dtype)


def _check_threshold(name: str, threshold: Scalar) -> None:
    # A CPU tensor is read for free; reading one on an accelerator would wait for it.
    on_cpu = isinstance(threshold, Tensor) and threshold.device.type == "cpu"
    if isinstance(threshold, Tensor) and threshold.ndim > 0:
        _check_threshold_tensor(name, threshold, read=on_cpu)
        return
    check_scalars(
        f"prox.{name}", {"threshold": threshold}, {"threshold": NON_NEGATIVE}, read_tensors=on_cpu
    )


def _check_threshold_tensor(name: str, threshold: Tensor, *, read: bool) -> None:
    """A per-coordinate threshold: floating, and (where it can be read) finite and >= 0."""
    if not threshold.is_floating_point():
        raise TypeError(
            f"prox.{name}: threshold must be a floating-point tensor, got {threshold.dtype}"
        )
    readable = (
        read
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(threshold)
    )
    if readable:
        values = threshold.detach()
        if not bool((torch.isfinite(values) & (values >= 0)).all()):
            raise ValueError(
                f"prox.{name}: the per-coordinate threshold holds a negative or non-finite "
                "entry; thresholds are step_size * strength / D, finite and >= 0"
            )


def _map_selected(
    params: Params,
    where: Where,
    fn: Callable[[Tensor], Tensor],
    threshold: Scalar = 0.0,
) -> Params:
    leaves, spec = flatten(params)
    chosen = selected(params, where)
    if isinstance(threshold, Tensor) and threshold.ndim > 0:
        for leaf_name, leaf, is_selected in zip(spec_names(spec), leaves, chosen, strict=True):
            if is_selected and not _broadcasts(threshold.shape, leaf.shape):
                raise ValueError(
                    f"prox: the per-coordinate threshold has shape {tuple(threshold.shape)}, "
                    f"which does not broadcast to leaf {leaf_name!r} of shape "
                    f"{tuple(leaf.shape)}; pass one threshold per leaf (e.g. prox({{name: "
                    "leaf}}, threshold)) or a scalar (0-d) one"
                )
    return spec.unflatten(
        [
            fn(leaf) if is_selected else leaf
            for leaf, is_selected in zip(leaves, chosen, strict=True)
        ]
    )


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (without growing it)."""
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target), strict=False))
