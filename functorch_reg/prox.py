r"""Proximal operators of the penalties, leaf by leaf.

Each operator solves, for every selected leaf ``v``,

.. math:: \operatorname{prox}(v, t) = \arg\min_x \tfrac12 \|x - v\|_2^2 + t \cdot P(x)

where ``P`` is the matching penalty of :mod:`functorch_reg.penalties` and
``t = threshold = step_size * lam``. All share one signature,
``prox.NAME(params, threshold, ..., where=None) -> params``; unselected leaves are
returned as they are. A proximal gradient step is
``prox.l1(params - lr * grads, lr * lam)``, and it gives exact zeros.

``threshold`` is a float or a 0-d tensor (a batched one under ``vmap``). A float or a
CPU tensor is checked to be finite and non-negative; a tensor on an accelerator is
trusted (and so is any under ``torch.compile`` or ``vmap``), so that a prox inside a
training loop never waits on the device: a negative one would grow ``|v|``. The
optimizers' ``prox_strength`` is checked like their other hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import NON_NEGATIVE, UNIT, Scalar, check_scalars
from .penalties import group_norms
from .select import Where, selected
from .tree import Params, flatten

__all__ = ["elastic_net", "group_lasso", "l1", "l2", "soft_threshold"]


def soft_threshold(x: Tensor, threshold: Scalar) -> Tensor:
    r""":math:`\operatorname{sign}(x) \max(|x| - t, 0)` on one tensor."""
    return x.sign() * (x.abs() - threshold).clamp_min(0)


def l1(params: Params, threshold: Scalar, *, where: Where = None) -> Params:
    r"""Soft-thresholding, the prox of :math:`t \sum_i |x_i|`: entries with
    :math:`|v_i| \le t` become exactly zero."""
    _check_threshold("l1", threshold)
    return _map_selected(params, where, lambda v: soft_threshold(v, threshold))


def l2(params: Params, threshold: Scalar, *, where: Where = None) -> Params:
    r"""Shrinkage :math:`v / (1 + 2t)`, the prox of :math:`t \sum_i x_i^2`."""
    _check_threshold("l2", threshold)
    return _map_selected(params, where, lambda v: v / (1 + 2 * threshold))


def elastic_net(
    params: Params, threshold: Scalar, l1_ratio: float = 0.5, *, where: Where = None
) -> Params:
    r""":math:`\operatorname{soft}(v, t r) / (1 + t (1 - r))`, the prox of
    :math:`t \left(r \sum_i |x_i| + \frac{1 - r}{2} \sum_i x_i^2\right)`, ``r = l1_ratio``."""
    _check_threshold("elastic_net", threshold)
    check_scalars("prox.elastic_net", {"l1_ratio": l1_ratio}, {"l1_ratio": UNIT})
    return _map_selected(
        params,
        where,
        lambda v: soft_threshold(v, threshold * l1_ratio) / (1 + threshold * (1 - l1_ratio)),
    )


def group_lasso(
    params: Params, threshold: Scalar, dim: int | None = 0, *, where: Where = None
) -> Params:
    r"""Block soft-thresholding :math:`v_g \max(0, 1 - t \sqrt{|g|} / \|v_g\|_2)`, the prox
    of :math:`t \sum_g \sqrt{|g|}\, \|x_g\|_2`; groups are slices along ``dim`` as in
    :func:`functorch_reg.penalties.group_lasso`. Whole groups become exactly zero."""
    _check_threshold("group_lasso", threshold)
    return _map_selected(params, where, lambda v: _block_soft_threshold(v, threshold, dim))


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
    check_scalars(
        f"prox.{name}", {"threshold": threshold}, {"threshold": NON_NEGATIVE}, read_tensors=on_cpu
    )


def _map_selected(params: Params, where: Where, fn: Callable[[Tensor], Tensor]) -> Params:
    leaves, spec = flatten(params)
    chosen = selected(params, where)
    return spec.unflatten(
        [
            fn(leaf) if is_selected else leaf
            for leaf, is_selected in zip(leaves, chosen, strict=True)
        ]
    )
