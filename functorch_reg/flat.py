"""The flat layout: one contiguous buffer per group of leaves, the leaves as views.

A compiled optimizer step over a per-leaf tree runs one loop (one kernel on CUDA) per
leaf, so over hundreds of tensors it is bound by launches, not by memory bandwidth.
Packed into one 1-D buffer per group, the same update rule runs as one kernel per
group at the copy floor. The buffers are an ordinary pytree (a dict of 1-D tensors):
every optimizer, penalty and prox of this library accepts them unchanged::

    flat = fr.flat.pack(params, groups={"decay": fr.select.weights(),
                                        "no_decay": fr.select.biases()})
    opt = fr.adamw(lr=1e-3, weight_decay=1e-2, mask="decay")
    state = opt.init(flat.buffers)

    def objective(buffers, x, y):
        return loss_fn(functional_call(model, flat.unpack(buffers), (x,)), y)

    grads = torch.func.grad(objective)(flat.buffers, x, y)   # already flat
    opt.step_(flat.buffers, grads, state)                    # one kernel per group

Each leaf starts at an offset aligned to :data:`ALIGNMENT` bytes; the gaps between
leaves are zeros that stay zero (their gradient is zero, and every update rule and
prox maps a zero weight with a zero gradient to zero).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .select import Where, selected
from .tree import Params, address_span, flatten, is_dtensor, is_float, spec_names

__all__ = ["ALIGNMENT", "FlatParams", "LeafSlot", "leafwise", "pack"]

ALIGNMENT = 64
"""Bytes to which every leaf's start within its buffer is aligned (a cache line: enough
for the 16-byte vector loads Inductor emits and for matmul operands)."""


@dataclass(frozen=True)
class LeafSlot:
    """Where one leaf lives: its group, its first element in the group's buffer, its shape.

    Attributes:
        name: the leaf's dotted name (as :func:`functorch_reg.leaf_names` gives).
        group: the name of the buffer holding it.
        offset: the index of its first element in that 1-D buffer (in elements, not
            bytes; a multiple of ``ALIGNMENT`` bytes).
        shape: the leaf's shape; it occupies ``numel`` elements from ``offset``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> flat = fr.flat.pack({"b": torch.zeros(2), "w": torch.ones(2, 3)})
        >>> flat.slots["w"]
        LeafSlot(name='w', group='float32', offset=16, shape=torch.Size([2, 3]))
    """

    name: str
    group: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FlatParams:
    """Leaves of a parameter tree packed into one contiguous 1-D buffer per group.

    Made by :func:`pack`; methods ``unpack(buffers)`` (leaf views of buffers of this
    layout, also batched ``[K, n]`` ones), ``pack_like(tree)`` (new buffers from a tree
    of leaves, e.g. gradients) and ``leaves_of(group)``.

    Attributes:
        buffers: ``group name -> 1-D tensor`` of shape ``(n,)``, the group's leaves
            flattened in order, each start padded to ``ALIGNMENT`` bytes with zeros;
            one dtype and device per group. This is what the optimizers step.
        params: ``leaf name -> tensor``, each floating leaf a view of its original
            shape into ``buffers`` (an in-place step is visible through it), and each
            non-floating leaf the original tensor; pass it to
            ``torch.func.functional_call``.
        slots: ``leaf name -> LeafSlot``, the layout.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> flat = fr.flat.pack({"w": torch.ones(2, 3), "b": torch.zeros(2)})
        >>> flat
        FlatParams(float32: 2 leaves, 32 elements torch.float32)
        >>> flat.unpack(flat.pack_like({"w": torch.full((2, 3), 2.0), "b": torch.ones(2)}))["w"]
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """

    def __init__(
        self,
        buffers: dict[str, Tensor],
        slots: dict[str, LeafSlot],
        others: dict[str, Any],
        names: list[str],
    ) -> None:
        self.buffers = buffers
        self.slots = slots
        self._others = others
        self._names = names
        self._sizes = {group: buffer.shape[-1] for group, buffer in buffers.items()}
        self._pieces: dict[str, tuple[list[int], list[str | None]]] = {
            group: _pieces(slots, group, size) for group, size in self._sizes.items()
        }
        self.params = self.unpack(buffers)

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{group}: {len([s for s in self.slots.values() if s.group == group])} leaves, "
            f"{self._sizes[group]} elements {buffer.dtype}"
            for group, buffer in self.buffers.items()
        )
        return f"FlatParams({groups})"

    def unpack(self, buffers: Mapping[str, Tensor]) -> dict[str, Any]:
        """Leaf views of ``buffers`` laid out like :attr:`buffers`, by leaf name.

        Differentiable: the gradient of a function of the views with respect to the
        buffers is flat, and is formed by one concatenation per group. Buffers may
        carry leading batch dims (``[K, n]`` for an ensemble): each view then has them
        too (``[K, *shape]``). Non-floating leaves are returned as packed.
        """
        self._check_buffers(buffers, "unpack")
        views: dict[str, Any] = dict(self._others)
        for group, (sizes, names) in self._pieces.items():
            buffer = buffers[group]
            batch = buffer.shape[:-1]
            for name, piece in zip(names, torch.split(buffer, sizes, dim=-1), strict=True):
                if name is not None:
                    views[name] = piece.view((*batch, *self.slots[name].shape))
        return {name: views[name] for name in self._names}

    def pack_like(self, tree: Mapping[str, Any] | Params) -> dict[str, Tensor | None]:
        """New buffers holding the leaves of ``tree`` (e.g. gradients), laid out like
        :attr:`buffers`.

        ``tree`` is keyed by leaf name like :attr:`params`, or has the structure of
        the tree given to :func:`pack`. A group whose leaves are all ``None`` (frozen)
        gives ``None``; a group with some ``None`` leaves is an error, since a buffer
        cannot be partly frozen: put frozen leaves in a group of their own.
        """
        leaves = _named_leaves(tree, self._names, self.slots, "pack_like")
        out: dict[str, Tensor | None] = {}
        for group, (sizes, names) in self._pieces.items():
            members = [name for name in names if name is not None]
            present = [name for name in members if leaves[name] is not None]
            if not present:
                out[group] = None
                continue
            if len(present) != len(members):
                missing = next(name for name in members if leaves[name] is None)
                raise ValueError(
                    f"pack_like: leaf {missing!r} is None but other leaves of group "
                    f"{group!r} are not; a buffer cannot be partly frozen, so pack frozen "
                    "leaves into a group of their own"
                )
            reference = self.buffers[group]
            parts = []
            for size, name in zip(sizes, names, strict=True):
                if name is None:
                    parts.append(reference.new_zeros(size))
                    continue
                leaf = leaves[name]
                if leaf.dtype != reference.dtype or leaf.device != reference.device:
                    raise ValueError(
                        f"pack_like: leaf {name!r} is {leaf.dtype} on {leaf.device}, its "
                        f"group {group!r} is {reference.dtype} on {reference.device}"
                    )
                parts.append(leaf.reshape(-1))
            out[group] = torch.cat(parts)
        return out

    def leaves_of(self, group: str) -> list[str]:
        """Names of the leaves packed into ``group``, in buffer order."""
        return [name for name in self._pieces[group][1] if name is not None]

    def _check_buffers(self, buffers: Mapping[str, Tensor], caller: str) -> None:
        if not isinstance(buffers, Mapping) or set(buffers) != set(self._sizes):
            got = sorted(buffers) if isinstance(buffers, Mapping) else type(buffers).__name__
            raise ValueError(
                f"{caller}: expected buffers for the groups {sorted(self._sizes)}, got {got}"
            )
        for group, size in self._sizes.items():
            buffer = buffers[group]
            if not isinstance(buffer, Tensor) or buffer.ndim < 1 or buffer.shape[-1] != size:
                shape = tuple(buffer.shape) if isinstance(buffer, Tensor) else repr(buffer)
                raise ValueError(
                    f"{caller}: buffer {group!r} should end in a dim of {size} elements (the "
                    f"layout of these FlatParams), got {shape}; was it packed by another "
                    "FlatParams?"
                )


def pack(params: Params, groups: Mapping[str, Where] | None = None) -> FlatParams:
    """Copy the floating leaves of ``params`` into one contiguous buffer per group.

    Args:
        params: a pytree of tensors, e.g. ``{k: v.detach() for k, v in
            model.named_parameters()}``.
        groups: ``group name -> where=`` selection (see :mod:`functorch_reg.select`);
            every floating leaf must be selected by exactly one group. ``None`` makes
            one group per dtype (and device), named after it (``"float32"``;
            ``"float32@cuda:0"`` when the tree spans devices).

    Returns:
        A :class:`FlatParams`; the input tensors are not modified or aliased.

    Raises:
        ValueError: a leaf in no group or in two, a group mixing dtypes or devices, an
            empty group, tied or overlapping leaves, DTensor leaves.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)}
        >>> flat = fr.flat.pack(params, {"decay": fr.select.weights(),
        ...                              "no_decay": fr.select.biases()})
        >>> flat.buffers["decay"].shape  # 6 weights, padded to 64 bytes
        torch.Size([16])
        >>> flat.params["0.weight"].shape
        torch.Size([2, 3])
        >>> flat.params["0.weight"].data_ptr() == flat.buffers["decay"].data_ptr()
        True
    """
    leaves, spec = flatten(params)
    names = spec_names(spec)
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"pack: two leaves share the name {duplicate!r}")
    for name, leaf in zip(names, leaves, strict=True):
        if is_dtensor(leaf):
            raise ValueError(
                f"pack: leaf {name!r} is a DTensor; the flat layout is for plain tensors "
                "(sharded parameters keep the per-leaf layout)"
            )
    floats = [name for name, leaf in zip(names, leaves, strict=True) if is_float(leaf)]
    if not floats:
        raise ValueError("pack: params hold no floating-point tensor")
    by_name = dict(zip(names, leaves, strict=True))
    _check_no_aliasing({name: by_name[name] for name in floats})
    membership = _membership(params, names, floats, by_name, groups)

    buffers: dict[str, Tensor] = {}
    slots: dict[str, LeafSlot] = {}
    for group, members in membership.items():
        first = by_name[members[0]]
        for name in members[1:]:
            leaf = by_name[name]
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise ValueError(
                    f"pack: group {group!r} mixes {first.dtype} on {first.device} "
                    f"({members[0]!r}) with {leaf.dtype} on {leaf.device} ({name!r}); "
                    "give each dtype and device a group of its own"
                )
        align = max(1, ALIGNMENT // first.element_size())
        offset = 0
        for name in members:
            slots[name] = LeafSlot(name, group, offset, by_name[name].shape)
            offset += _round_up(by_name[name].numel(), align)
        buffer = torch.zeros(offset, dtype=first.dtype, device=first.device)
        for name in members:
            slot = slots[name]
            buffer[slot.offset : slot.offset + slot.numel].copy_(by_name[name].detach().reshape(-1))
        buffers[group] = buffer
    others = {name: leaf for name, leaf in zip(names, leaves, strict=True) if not is_float(leaf)}
    return FlatParams(buffers, slots, others, names)


def leafwise(
    flat: FlatParams, prox: Callable[..., Params], **kwargs: Any
) -> Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]]:
    """A prox that needs leaf structure (e.g. :func:`functorch_reg.prox.group_lasso`),
    lifted to the buffers of ``flat``.

    The returned ``prox(buffers, threshold) -> buffers`` takes ``{group name: buffer}``
    (the convention in which every optimizer calls its prox, see
    :class:`functorch_reg.optim.Prox`), applies ``prox(leaves, threshold, **kwargs)``
    once to the leaf views of all the given groups (so a ``where=`` in ``kwargs`` sees
    leaf names) and packs the result back, padding zeros included. Pass it as an
    optimizer's ``prox=``::

        opt = fr.sgd(lr=0.1, prox=fr.flat.leafwise(flat, fr.prox.group_lasso, dim=0),
                     prox_strength=lam, mask="decay")

    Results equal the per-leaf prox on the same leaves.

    Args:
        flat: the layout the buffers have (from :func:`pack`).
        prox: a prox of :mod:`functorch_reg.prox` (or any
            ``prox(leaves, threshold, **kwargs) -> leaves`` on a pytree keyed by leaf name).
        **kwargs: passed to ``prox`` on every call (e.g. ``dim=0``, ``where=``).

    Returns:
        ``prox(buffers, threshold) -> buffers``: ``buffers`` a dict of the group
        buffers (shapes ``(n,)`` as in ``flat.buffers``); ``threshold`` as the wrapped
        prox takes it (absolute, ``lr * strength`` per step), or a tensor shaped like
        the single buffer given (split into the leaves' per-coordinate thresholds).

    Raises:
        ValueError: a key names no group of ``flat``, or its buffer is not laid out
            like that group (another ``FlatParams``).
        TypeError: given a bare tensor rather than ``{group name: buffer}``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.tensor([[3.0, 4.0], [0.1, 0.1]]), "b": torch.tensor([1.0, -2.0])}
        >>> flat = fr.flat.pack(params)
        >>> prox = fr.flat.leafwise(flat, fr.prox.group_lasso, where=fr.select.weights())
        >>> flat.unpack(prox(flat.buffers, 1.0))["w"]  # the bias is left alone
        tensor([[2.1515, 2.8686],
                [0.0000, 0.0000]])
    """
    label = f"leafwise({getattr(prox, '__name__', prox)})"

    def prox_on_buffers(buffers: Mapping[str, Tensor], threshold: Any) -> dict[str, Tensor]:
        if not isinstance(buffers, Mapping):
            raise TypeError(
                f"{label}: expected {{group name: buffer}} (as optimizers call a prox), got "
                f"a {type(buffers).__name__}; call it as prox({{'group': buffer}}, threshold)"
            )
        views: dict[str, Tensor] = {}
        pieces: dict[str, tuple[Tensor, ...]] = {}
        # A per-coordinate threshold shaped like the (one) buffer (an optimizer's
        # prox_metric="preconditioned"), split into the leaves' thresholds.
        per_leaf = isinstance(threshold, Tensor) and threshold.ndim > 0 and len(buffers) == 1
        thresholds: dict[str, Tensor] = {}
        for group, buffer in buffers.items():
            if group not in flat._pieces:
                raise ValueError(
                    f"{label}: {group!r} is no group of {flat!r}; pass the buffers of the "
                    "FlatParams this prox was made for"
                )
            sizes, names = flat._pieces[group]
            if buffer.shape[-1] != flat._sizes[group]:
                raise ValueError(
                    f"{label}: buffer {group!r} has {buffer.shape[-1]} elements, its group "
                    f"in {flat!r} {flat._sizes[group]}; was it packed by another FlatParams?"
                )
            batch = buffer.shape[:-1]
            pieces[group] = torch.split(buffer, sizes, dim=-1)
            cuts = (
                torch.split(threshold.expand_as(buffer), sizes, dim=-1)
                if per_leaf
                else pieces[group]
            )
            for name, piece, cut in zip(names, pieces[group], cuts, strict=True):
                if name is not None:
                    views[name] = piece.view((*batch, *flat.slots[name].shape))
                    thresholds[name] = cut.reshape(views[name].shape)
        if per_leaf:
            result = {}
            for name, view in views.items():
                result.update(prox({name: view}, thresholds[name], **kwargs))
        else:
            result = prox(views, threshold, **kwargs)
        return {
            group: torch.cat(
                [
                    piece if name is None else result[name].reshape(*piece.shape)
                    for name, piece in zip(flat._pieces[group][1], group_pieces, strict=True)
                ],
                dim=-1,
            )
            for group, group_pieces in pieces.items()
        }

    prox_on_buffers.__name__ = f"leafwise_{getattr(prox, '__name__', 'prox')}"
    return prox_on_buffers


ELEMENTWISE_PROX = ("l1", "l2", "elastic_net")
"""Prox operators of :mod:`functorch_reg.prox` that act element by element: on a buffer
they equal the per-leaf prox (padding zeros stay zero), so they need no lifting."""


def mask_for(flat: FlatParams, where: Where, owner: str) -> Where:
    """An optimizer's ``mask`` written for the leaves, as a list of ``flat``'s groups.

    A mask that already names groups (globs on group names, a bool tree over the
    buffers) is kept. Otherwise the leaves it selects must fill whole groups: the
    result names those groups.

    Raises:
        ValueError: a group holds leaves the mask selects and leaves it does not,
            naming one of each and the group.
    """
    if where is None:
        return None
    globs = [where] if isinstance(where, str) else where
    if isinstance(globs, Sequence) and globs and all(isinstance(g, str) for g in globs):
        import fnmatch

        if all(fnmatch.filter(list(flat.buffers), g) for g in globs):
            return list(globs)
    elif not callable(where):
        try:
            selected(flat.buffers, where)
            return where
        except (TypeError, ValueError):
            pass
    chosen = dict(zip(flat._names, selected(flat.params, where), strict=True))
    groups: list[str] = []
    for group in flat.buffers:
        members = flat.leaves_of(group)
        inside = [name for name in members if chosen[name]]
        if inside and len(inside) != len(members):
            outside = next(name for name in members if not chosen[name])
            raise ValueError(
                f"{owner}: the optimizer's mask selects leaf {inside[0]!r} but not "
                f"{outside!r}, and both are packed into group {group!r}; a flat buffer is "
                "decayed whole: pack groups that follow the mask (e.g. flat={'decay': "
                "fr.select.weights(), 'no_decay': fr.select.biases()}), or use the "
                "per-leaf layout"
            )
        if inside:
            groups.append(group)
    return groups if groups else (lambda name, leaf: False)


def prox_for(flat: FlatParams, prox: Callable[..., Params]) -> Callable[..., Params]:
    """An optimizer's ``prox`` for ``flat``'s buffers: an element-wise prox of
    :mod:`functorch_reg.prox` (without ``where=``) as it is, any other lifted with
    :func:`leafwise`, so that structured prox (group lasso) and ``where=`` act on leaves."""
    import functools

    from . import prox as prox_module

    func, keywords = prox, {}
    if isinstance(prox, functools.partial) and not prox.args:
        func, keywords = prox.func, dict(prox.keywords)
    elementwise = any(func is getattr(prox_module, name) for name in ELEMENTWISE_PROX)
    if elementwise and "where" not in keywords:
        return prox
    if getattr(prox, "__name__", "").startswith("leafwise_"):
        return prox
    return leafwise(flat, prox)


def _membership(
    params: Params,
    names: list[str],
    floats: list[str],
    by_name: Mapping[str, Any],
    groups: Mapping[str, Where] | None,
) -> dict[str, list[str]]:
    """``group -> leaf names`` in flattening order; every floating leaf in exactly one."""
    if groups is None:
        devices = {by_name[name].device for name in floats}
        membership: dict[str, list[str]] = {}
        for name in floats:
            leaf = by_name[name]
            key = str(leaf.dtype).removeprefix("torch.")
            if len(devices) > 1:
                key += f"@{leaf.device}"
            membership.setdefault(key, []).append(name)
        return membership
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"pack: groups must be a non-empty dict name -> where, got {groups!r}")
    owner: dict[str, str] = {}
    membership = {}
    for group, where in groups.items():
        chosen = [name for name, flag in zip(names, selected(params, where), strict=True) if flag]
        if not chosen:
            raise ValueError(f"pack: group {group!r} selects no floating-point leaf")
        for name in chosen:
            if name in owner:
                raise ValueError(
                    f"pack: leaf {name!r} is in two groups, {owner[name]!r} and {group!r}"
                )
            owner[name] = group
        membership[group] = chosen
    missing = [name for name in floats if name not in owner]
    if missing:
        raise ValueError(
            f"pack: leaf {missing[0]!r} is in no group; every floating-point leaf needs one "
            f"(groups: {sorted(groups)})"
        )
    return membership


def _check_no_aliasing(leaves: Mapping[str, Tensor]) -> None:
    """Refuse tied leaves (one tensor twice) and views that overlap in memory: packed
    apart, they would silently untie."""
    spans: list[tuple[int, int, int, str]] = []
    for name, leaf in leaves.items():
        if leaf.numel() == 0 or leaf.device.type == "meta":
            continue  # meta tensors hold no memory (every one has data_ptr 0)
        start, end = address_span(leaf)
        spans.append((leaf.untyped_storage().data_ptr(), start, end, name))
    spans.sort()
    for (storage, _, end, name), (next_storage, next_start, _, next_name) in itertools.pairwise(
        spans
    ):
        if storage == next_storage and next_start < end:
            raise ValueError(
                f"pack: leaves {name!r} and {next_name!r} share memory (tied or overlapping "
                "views); pack one of them only and tie them in the model"
            )


def _named_leaves(
    tree: Any, names: Sequence[str], slots: Mapping[str, LeafSlot], caller: str
) -> dict[str, Any]:
    if (
        isinstance(tree, Mapping)
        and set(tree) >= set(slots)
        and all(isinstance(k, str) for k in tree)
    ):
        named = dict(tree)
    else:
        leaves, spec = flatten(tree)
        named = dict(zip(spec_names(spec), leaves, strict=True))
    for name, slot in slots.items():
        if name not in named:
            raise ValueError(f"{caller}: leaf {name!r} is missing")
        leaf = named[name]
        if leaf is not None and (not isinstance(leaf, Tensor) or leaf.shape != slot.shape):
            shape = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(
                f"{caller}: leaf {name!r} has shape {shape}, packed as {tuple(slot.shape)}"
            )
    return named


def _pieces(
    slots: Mapping[str, LeafSlot], group: str, size: int
) -> tuple[list[int], list[str | None]]:
    """Split sizes of a group's buffer, and the leaf of each piece (``None``: padding)."""
    sizes: list[int] = []
    names: list[str | None] = []
    position = 0
    for slot in sorted((s for s in slots.values() if s.group == group), key=lambda s: s.offset):
        if slot.offset > position:
            sizes.append(slot.offset - position)
            names.append(None)
        sizes.append(slot.numel)
        names.append(slot.name)
        position = slot.offset + slot.numel
    if size > position:
        sizes.append(size - position)
        names.append(None)
    return sizes, names


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
