"""Penalties: pure functions of a parameter pytree, at unit strength.

Compose them with a loss and differentiate with ``torch.func``::

    def objective(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return loss_fn(out, y) + lam * fr.penalties.l1(params, where=fr.select.weights())

    grads = torch.func.grad(objective)(params, x, y)

Every penalty sums over the leaves chosen by ``where=`` (see :mod:`functorch_reg.select`)
and returns a 0-d tensor in the promoted dtype of those leaves.

DTensor leaves (e.g. parameters sharded by ``torch.distributed.fsdp.fully_shard``)
give the value of the whole, unsharded parameters: norms, Gram matrices and sums
reduce across shards, whichever dim the leaves are sharded on. The result is then
a plain 0-d tensor, the same on every rank, to add to a loss; it is differentiable,
and its gradient reaches each rank's shards. Every rank must compute it, as it
ends in a collective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import UNIT, check_scalars
from .select import Where, selected, weights
from .tree import (
    Params,
    check_structure,
    flatten,
    full_tensor,
    leaf_names,
    reduce_partial,
    replicate_like,
    spec_names,
)

__all__ = ["elastic_net", "group_lasso", "l1", "l2", "l2_sp", "orthogonal"]


def l1(params: Params, *, where: Where = None) -> Tensor:
    r"""Lasso penalty :math:`\sum_i |w_i|` (Tibshirani, 1996).

    Its subgradient never gives exact zeros; :func:`functorch_reg.prox.l1` (soft
    thresholding) does, in an optimizer's ``prox=``.

    Args:
        params: a pytree of tensors, e.g. the ``params`` of ``fr.split_module(model)``.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included.

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength
        (multiply by :math:`\lambda` yourself).

    Raises:
        ValueError: ``where`` is a glob that matches no leaf, or no floating-point leaf
            is selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.penalties.l1({"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])})
        tensor(6.)
    """
    return _total("l1", params, where, lambda w: w.abs().sum())


def l2(params: Params, *, where: Where = None) -> Tensor:
    r"""Ridge penalty :math:`\sum_i w_i^2` (no 1/2, as Keras' ``l2``).

    Adding ``lam * l2(params)`` to the loss gives the same SGD trajectory as
    ``torch.optim.SGD(weight_decay=2 * lam)``.

    Args:
        params: a pytree of tensors, e.g. the ``params`` of ``fr.split_module(model)``.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included.

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength
        (multiply by :math:`\lambda` yourself).

    Raises:
        ValueError: ``where`` is a glob that matches no leaf, or no floating-point leaf
            is selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.penalties.l2({"w": torch.tensor([1.0, -2.0])})
        tensor(5.)
    """
    return _total("l2", params, where, lambda w: w.square().sum())


def elastic_net(params: Params, l1_ratio: float = 0.5, *, where: Where = None) -> Tensor:
    r"""scikit-learn's elastic net, with ``r = l1_ratio``:
    :math:`r \sum_i |w_i| + \frac{1 - r}{2} \sum_i w_i^2`.

    The penalty term of ``sklearn.linear_model.ElasticNet(alpha, l1_ratio)`` divided by
    ``alpha`` (Zou & Hastie, 2005, in scikit-learn's parametrization): ``l1_ratio=1`` is
    :func:`l1`, ``l1_ratio=0`` is half of :func:`l2`.

    Args:
        params: a pytree of tensors, e.g. the ``params`` of ``fr.split_module(model)``.
        l1_ratio: :math:`r`, in ``[0, 1]``.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves, biases included.

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength.

    Raises:
        ValueError: ``l1_ratio`` is outside ``[0, 1]``; ``where`` is a glob that
            matches no leaf, or no floating-point leaf is selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.penalties.elastic_net({"w": torch.tensor([1.0, -2.0])}, l1_ratio=0.5)
        tensor(2.7500)
    """
    check_scalars("elastic_net", {"l1_ratio": l1_ratio}, {"l1_ratio": UNIT})
    ridge = (1 - l1_ratio) / 2
    # One reduction per leaf: each weight is read once, eager and compiled.
    return _total(
        "elastic_net",
        params,
        where,
        lambda w: (l1_ratio * w.abs() + ridge * w.square()).sum(),
    )


def group_lasso(params: Params, dim: int | None = 0, *, where: Where = None) -> Tensor:
    r"""Group lasso :math:`\sum_g \sqrt{|g|}\, \|w_g\|_2` (Yuan & Lin, 2006).

    The groups of a leaf are its slices along ``dim``: with the default ``dim=0`` the
    rows of a ``Linear`` weight ``(out, in)``, i.e. the output units, and the filters of
    a ``Conv2d`` weight ``(out, in, kh, kw)``. ``|g|`` is the number of entries in a
    group, so that groups of different sizes are penalized alike (Yuan & Lin's
    :math:`\sqrt{p_g}` weight). ``dim=None`` makes each whole leaf one group. The
    matching proximal operator, which zeroes whole groups, is
    :func:`functorch_reg.prox.group_lasso`.

    A 1-D leaf (a bias, a norm scale) has groups of one entry along ``dim=0``, so its
    term is plain L1, :math:`\sum_i |b_i|`, and not a group penalty. With the default
    ``where=None`` every floating leaf is included, biases too: to penalize only the
    weight matrices, pass ``where=fr.select.weights()``; to make each bias one group,
    ``dim=None``. A 0-d leaf has no ``dim=0`` and is an error.

    Args:
        params: a pytree of tensors, e.g. ``dict(model.named_parameters())``.
        dim: the dim whose slices are the groups (negative counts from the end), or
            ``None`` for one group per leaf.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves.

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength
        (multiply by :math:`\lambda` yourself).

    Raises:
        ValueError: a selected leaf has no dim ``dim`` (e.g. a 0-d leaf with
            ``dim=0``); ``where`` is a glob that matches no leaf; no floating-point
            leaf is selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"weight": torch.tensor([[3.0, 4.0], [0.0, 0.0]]),
        ...           "bias": torch.tensor([1.0, -2.0])}
        >>> fr.penalties.group_lasso(params, where="weight")  # sqrt(2) * (5 + 0)
        tensor(7.0711)
        >>> fr.penalties.group_lasso(params)  # the bias adds |1| + |-2|, as L1
        tensor(10.0711)
    """
    return _total("group_lasso", params, where, functools.partial(_group_lasso_leaf, dim=dim))


def _group_lasso_leaf(w: Tensor, dim: int | None) -> Tensor:
    norms, group_size = group_norms(w, dim)
    return math.sqrt(group_size) * norms.sum()


def group_norms(w: Tensor, dim: int | None) -> tuple[Tensor, int]:
    """Euclidean norm of each slice of ``w`` along ``dim`` (kept as a broadcastable
    dim) and the number of entries per slice.

    Each slice is divided by its largest magnitude before its squares are summed, so
    the norm neither overflows (``3e20`` in float32) nor underflows (``3e-25``). An
    empty leaf has zero norms (and, with ``dim``, ``shape[dim]`` of them).

    For a DTensor ``w`` the norms are those of the whole slices, whichever dim ``w``
    is sharded on, and no longer partial (they may feed nonlinear ops).
    """
    if dim is not None and not -w.ndim <= dim < w.ndim:
        raise ValueError(
            f"group dim={dim} needs leaves with more than {dim if dim >= 0 else -dim - 1} dims, "
            f"got shape {tuple(w.shape)}; choose the leaves with where="
        )
    reduce_dims = (
        list(range(w.ndim)) if dim is None else [d for d in range(w.ndim) if d != dim % w.ndim]
    )
    group_size = math.prod([w.shape[d] for d in reduce_dims])
    if not reduce_dims:
        return w.abs(), 1
    if w.numel() == 0:
        return w.sum(dim=reduce_dims, keepdim=True), group_size
    # Groups that span shards (DTensor leaves) get partial results: reduce them here.
    # The scale is a constant for autograd: the norm's gradient is w / ||w|| either way.
    largest = reduce_partial(w.detach().abs().amax(dim=reduce_dims, keepdim=True))
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    norms = reduce_partial(torch.linalg.vector_norm(w / scale, dim=reduce_dims, keepdim=True))
    return norms * scale, group_size


def l2_sp(params: Params, reference: Params, *, where: Where = None) -> Tensor:
    r""":math:`\sum_i (w_i - w^{ref}_i)^2`: pull toward reference (e.g. pretrained) weights.

    ``reference`` must have the structure and shapes of ``params``, or, with
    ``where=``, hold at least the leaves ``where`` selects (matched by leaf name, as
    the optimizers' ``decay_to`` is): leaves that ``where`` excludes need no reference.

    The L2-SP regularizer of Li, Grandvalet & Davoine, "Explicit inductive bias for
    transfer learning with convolutional networks" (ICML 2018), without their 1/2 and
    without their separate L2 term on new layers (add :func:`l2` with ``where=`` for that).

    Args:
        params: a pytree of tensors, e.g. the ``params`` of ``fr.split_module(model)``.
        reference: a pytree of tensors with the same leaf names and shapes (e.g. a copy
            of the pretrained params, detached); dtypes are promoted with ``params``'.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default all floating leaves.

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength
        (multiply by :math:`\lambda` yourself).

    Raises:
        ValueError: a selected leaf has no reference, or one of another shape;
            ``where`` is a glob that matches no leaf, or no floating-point leaf is
            selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0])}
        >>> fr.penalties.l2_sp(params, {"w": torch.tensor([1.0, 0.0])}, where="w")
        tensor(4.)
    """
    if where is None:
        check_structure(params, reference, other_name="reference")
        companion = reference
    else:
        companion = _references_by_name(params, reference, where)
    return _total("l2_sp", params, where, lambda w, w_ref: (w - w_ref).square().sum(), companion)


def _references_by_name(params: Params, reference: Params, where: Where) -> list[Any]:
    """Per leaf of ``params``, its reference by name where ``where`` selects it."""
    leaves, spec = flatten(params)
    by_name = dict(zip(leaf_names(reference), flatten(reference)[0], strict=True))
    found: list[Any] = []
    for name, leaf, chosen in zip(spec_names(spec), leaves, selected(params, where), strict=True):
        if not chosen:
            found.append(None)
            continue
        ref = by_name.get(name)
        if not isinstance(ref, Tensor) or ref.shape != leaf.shape:
            got = f"shape {tuple(ref.shape)}" if isinstance(ref, Tensor) else "no such leaf"
            raise ValueError(
                f"l2_sp: reference leaf {name!r} (selected by where=) has {got}, the param "
                f"has shape {tuple(leaf.shape)}; pass a reference with that leaf"
            )
        found.append(ref)
    return found


def orthogonal(params: Params, *, where: Where = None) -> Tensor:
    r"""Soft orthogonality :math:`\sum_W \|W W^T - I\|_F^2` over matrices.

    Each leaf is viewed as a matrix ``(shape[0], -1)`` (a conv kernel's output
    channels by the rest), and the Gram matrix is taken on its smaller side. By
    default (``where=None``) it applies to every leaf with ``ndim >= 2``; selecting a
    leaf with fewer dims is an error.

    The soft orthogonality (SO) regularizer of Bansal, Chen & Wang, "Can We Gain More
    from Orthogonality Regularizations in Training Deep CNNs?" (NeurIPS 2018), also
    Brock et al. (ICLR 2017), summed over leaves.

    Args:
        params: a pytree of tensors, e.g. the ``params`` of ``fr.split_module(model)``.
        where: which leaves (a ``where=`` selection, see :mod:`functorch_reg.select`);
            default :func:`functorch_reg.select.weights` (leaves with ``ndim >= 2``).

    Returns:
        A 0-d tensor in the promoted dtype of the selected leaves, at unit strength.

    Raises:
        ValueError: a selected leaf has fewer than 2 dims; ``where`` is a glob that
            matches no leaf, or no floating-point leaf is selected.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.ones(2)}
        >>> fr.penalties.orthogonal(params)  # (2^2 - 1)^2, the bias is skipped
        tensor(9.)
    """
    return _total("orthogonal", params, weights() if where is None else where, _orthogonal_leaf)


def _orthogonal_leaf(w: Tensor) -> Tensor:
    if w.ndim < 2:
        raise ValueError(f"orthogonal needs matrices, got a leaf of shape {tuple(w.shape)}")
    matrix = w.reshape(w.shape[0], -1)
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    gram = matrix @ matrix.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - replicate_like(eye, gram)).square().sum()


def _total(
    penalty: str,
    params: Params,
    where: Where,
    per_leaf: Callable[..., Tensor],
    *companions: Params,
) -> Tensor:
    """Sum ``per_leaf(leaf, *companion_leaves)`` over the selected leaves."""
    leaves, spec = flatten(params)
    columns = zip(
        selected(params, where), leaves, *(flatten(tree)[0] for tree in companions), strict=False
    )
    terms = [per_leaf(*row) for is_selected, *row in columns if is_selected]
    if not terms:
        raise ValueError(
            f"{penalty}: no floating-point leaf selected among {spec_names(spec)}; "
            "penalties apply to floating-point tensors only"
        )
    dtype = functools.reduce(torch.promote_types, [term.dtype for term in terms])
    # DTensor terms may still be partial sums over the shards: reduce once, after summing.
    return full_tensor(torch.stack([term.to(dtype) for term in terms]).sum())
