"""Pytree helpers: leaves named by dotted key paths, structure checks, stacking.

Every helper flattens with ``none_is_leaf=True``, so a ``None`` leaf (a frozen
gradient, an absent optimizer buffer) keeps its place and its name.

Leaves may be DTensors (e.g. parameters sharded by ``fully_shard``): the helpers at
the end keep the library's reductions over them global, and return plain tensors
untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard, cast

import optree
import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

PyTree: TypeAlias = Any
"""Any optree pytree; the main case is ``dict(model.named_parameters())``."""

Params: TypeAlias = Any
"""A pytree of tensors."""

__all__ = [
    "Params",
    "PyTree",
    "address_span",
    "check_structure",
    "flatten",
    "full_tensor",
    "is_dtensor",
    "is_float",
    "leaf_names",
    "matching_leaves",
    "reduce_partial",
    "replicate_like",
    "spec_names",
    "stack",
    "unstack",
]


def flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves and structure of ``tree``, ``None`` counted as a leaf."""
    return optree.tree_flatten(tree, none_is_leaf=True)


def leaf_names(tree: PyTree) -> list[str]:
    """Dotted key paths of the leaves, in flattening order (dict keys sorted, as optree does).

    These are the names ``where=`` globs and predicates see, and the keys of
    ``fr.state_dict``; for ``fr.split_module(model)`` params they are the names of
    ``model.named_parameters()``.

    Args:
        tree: any pytree (dicts, lists, tuples, NamedTuples; ``None`` counts as a leaf).

    Returns:
        A list of ``str``, one per leaf; list and tuple positions are written as
        integers.

    Example:
        >>> import functorch_reg as fr
        >>> fr.leaf_names({"encoder": {"weight": 1, "bias": 2}, "head": [3]})
        ['encoder.bias', 'encoder.weight', 'head.0']
    """
    return spec_names(optree.tree_structure(tree, none_is_leaf=True))


def spec_names(spec: optree.PyTreeSpec) -> list[str]:
    """Dotted names of the leaves of a structure."""
    return [".".join(str(key) for key in path) for path in spec.paths()]


def is_float(leaf: Any) -> bool:
    """Whether ``leaf`` is a floating-point tensor (the only leaves we touch)."""
    return isinstance(leaf, Tensor) and leaf.is_floating_point()


def check_structure(
    reference: PyTree,
    other: PyTree,
    *,
    reference_name: str = "params",
    other_name: str = "grads",
    check_shapes: bool = True,
) -> list[Any]:
    """Raise ``ValueError`` naming the first leaf where ``other`` differs from ``reference``.

    Trees differ when their structures differ or, with ``check_shapes``, when two
    tensor leaves at the same place have different shapes. ``None`` leaves of
    ``other`` match any leaf of ``reference``.

    Returns:
        The leaves of ``other``, in the flattening order of ``reference``.
    """
    ref_leaves, ref_spec = flatten(reference)
    return matching_leaves(
        ref_leaves,
        ref_spec,
        other,
        reference_name=reference_name,
        other_name=other_name,
        check_shapes=check_shapes,
    )


def matching_leaves(
    ref_leaves: Sequence[Any],
    ref_spec: optree.PyTreeSpec,
    other: PyTree,
    *,
    reference_name: str = "params",
    other_name: str = "grads",
    check_shapes: bool = True,
) -> list[Any]:
    """:func:`check_structure` against an already flattened reference."""
    leaves, spec = flatten(other)
    if not _same_structure(spec, ref_spec):
        raise ValueError(
            f"{other_name} do not match {reference_name}: "
            + _first_difference(spec_names(ref_spec), spec_names(spec), reference_name, other_name)
        )
    if check_shapes and any(map(_shapes_differ, leaves, ref_leaves)):
        for name, ref, leaf in zip(spec_names(spec), ref_leaves, leaves, strict=True):
            if isinstance(ref, Tensor) and isinstance(leaf, Tensor) and leaf.shape != ref.shape:
                raise ValueError(
                    f"{other_name} do not match {reference_name}: leaf {name!r} has shape "
                    f"{tuple(leaf.shape)} in {other_name} but {tuple(ref.shape)} in "
                    f"{reference_name}"
                )
    return leaves


def _shapes_differ(leaf: Any, ref: Any) -> bool:
    return isinstance(ref, Tensor) and isinstance(leaf, Tensor) and leaf.shape != ref.shape


def _same_structure(spec: optree.PyTreeSpec, ref_spec: optree.PyTreeSpec) -> bool:
    if torch.compiler.is_compiling():
        # PyTreeSpec equality is not traceable before torch 2.13; the leaf paths are.
        return spec.paths() == ref_spec.paths()
    return spec == ref_spec


# Buffers of torch.nn's normalization layers, which model.state_dict() lists with the
# parameters.
_BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _first_difference(
    ref_names: Sequence[str], names: Sequence[str], reference_name: str, other_name: str
) -> str:
    known, known_ref = set(names), set(ref_names)
    missing = [name for name in ref_names if name not in known]
    if missing:
        message = f"leaf {missing[0]!r} of {reference_name} is missing from {other_name}"
        if missing[0].rsplit(".", 1)[-1] in _BUFFER_NAMES:
            message += (
                f" ({missing[0]!r} looks like a module buffer, e.g. from model.state_dict(); "
                "buffers are not parameters: pass {k: v.detach() for k, v in "
                "model.named_parameters()})"
            )
        return message
    extra = [name for name in names if name not in known_ref]
    if extra:
        return f"{other_name} has a leaf {extra[0]!r} that {reference_name} lacks"
    return "same leaf names, different containers (e.g. a list where a tuple was expected)"


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack same-structured pytrees leaf by leaf along a new leading dim.

    Works for parameters and optimizer states alike; ``None`` leaves stay ``None``.
    This is the layout of an ensemble (:func:`functorch_reg.init_ensemble`) and of
    ``torch.func.stack_module_state``: member ``i`` is ``leaf[i]``.

    Args:
        trees: a non-empty sequence of ``n`` pytrees with the same structure and leaf
            shapes. Leaf dtypes are promoted as ``torch.stack`` does.

    Returns:
        One pytree of that structure whose tensor leaves have shape ``(n, *shape)``.

    Raises:
        ValueError: ``trees`` is empty; a member's structure or a leaf's shape differs
            from member 0's (the message names the leaf).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> members = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
        >>> fr.stack(members)["w"].shape
        torch.Size([2, 3])
    """
    if not trees:
        raise ValueError("stack() needs at least one pytree")
    for index, tree in enumerate(trees[1:], start=1):
        check_structure(trees[0], tree, reference_name="member 0", other_name=f"member {index}")
    return optree.tree_map(_stack_leaves, *trees, none_is_leaf=True)


def _stack_leaves(*leaves: Tensor | None) -> Tensor | None:
    # check_structure made the leaves None (or not) together.
    return None if leaves[0] is None else torch.stack(cast("tuple[Tensor, ...]", leaves))


def unstack(stacked: PyTree) -> list[PyTree]:
    """Split a stacked pytree into its members (the inverse of :func:`stack`).

    Args:
        stacked: a pytree whose tensor leaves all have shape ``(n, ...)`` with the same
            leading ``n``; ``None`` leaves are allowed.

    Returns:
        A list of ``n`` pytrees; member ``i``'s leaves are views ``leaf[i]``.

    Raises:
        ValueError: the tensor leaves do not share one leading dim (or there is no
            tensor leaf with a dim).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.unstack({"w": torch.tensor([[0.0, 1.0], [2.0, 3.0]])})
        [{'w': tensor([0., 1.])}, {'w': tensor([2., 3.])}]
    """
    leaves, spec = flatten(stacked)
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"unstack() needs every tensor leaf to share one leading dim, got sizes {sorted(sizes)}"
        )
    (size,) = sizes
    return [
        optree.tree_unflatten(spec, [None if leaf is None else leaf[i] for leaf in leaves])
        for i in range(size)
    ]


def is_dtensor(leaf: Any) -> TypeGuard[DTensor]:
    """Whether ``leaf`` is a ``torch.distributed.tensor.DTensor``.

    Without importing ``torch.distributed.tensor`` (about a second): no DTensor exists
    until that module has been imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(leaf, module.DTensor)


def full_tensor(x: Tensor) -> Tensor:
    """``x`` itself, or for a DTensor its global value as a plain tensor.

    On a DTensor this is a collective (an all-reduce for a partial result such as
    the sum of a sharded tensor), so every rank must call it, and every rank gets
    the same value.
    """
    return x.full_tensor() if is_dtensor(x) else x


def reduce_partial(x: Tensor) -> Tensor:
    """For a DTensor, ``x`` with any pending (partial) reduction across ranks carried
    out, the partial placements becoming ``Replicate()``; ``x`` itself otherwise.

    A partial placement commutes only with ops that match its reduction (a sum with a
    partial sum), and DTensor (2.13) lets some others through without reducing first:
    the ``sum`` of partial norms gives the norm of the ranks' sums, silently.
    """
    if not is_dtensor(x) or not any(placement.is_partial() for placement in x.placements):
        return x
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in x.placements]
    return x.redistribute(x.device_mesh, placements)


def replicate_like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` as a DTensor replicated over ``reference``'s mesh when ``reference``
    is a DTensor, else ``value`` itself.

    ``value`` must be the same on every rank (a constant such as an identity
    matrix): it is wrapped without communication, and DTensor ops refuse to mix
    plain tensors other than 0-d ones with DTensors.
    """
    if not is_dtensor(reference):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = reference.device_mesh
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


def address_span(tensor: Tensor) -> tuple[int, int]:
    """The bytes from ``tensor``'s first element to just past its last (strides included):
    two tensors can share memory only where their spans meet."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    extent = sum(
        int(size - 1) * int(stride)
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + (extent + 1) * tensor.element_size()
