"""Checkpoints of a functional optimizer state: :func:`state_dict` writes a state as
plain nested dicts of tensors keyed by field and leaf name, :func:`load_state_dict`
checks such a dict against a fresh ``optimizer.init(params)`` and rebuilds the state.

The format (``{field: {leaf_name: tensor}}``, a leaf table split into per-leaf rows,
``skipped`` as a 0-d tensor) round-trips through ``torch.save`` and
``torch.load(weights_only=True)``; a resumed run is bit-identical to an uninterrupted
one. It is not the format of a ``torch.optim`` optimizer's ``state_dict()``, and the two
do not load into each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..tree import Params, flatten, is_dtensor, leaf_names
from .base import DISABLED, Optimizer, State, enabled, leaf_table_field

__all__ = ["load_state_dict", "state_dict"]


def state_dict(state: State) -> dict[str, Any]:
    """The state as plain nested dicts of tensors, keyed by field and leaf name.

    A leaf-table field (one row per leaf in a single tensor, see
    :data:`~functorch_reg.optim.base.State`) is split into its rows, keyed by leaf name
    like the other per-leaf fields. The result round-trips through ``torch.save`` and
    ``torch.load(weights_only=True)``; restore it with :func:`load_state_dict`.

    Args:
        state: an optimizer state (a NamedTuple such as ``AdamState``) from
            ``optimizer.init(params)`` or a step. Disabled fields (e.g. ``max_exp_avg_sq``
            without ``amsgrad``) are left out.

    Returns:
        A ``dict`` from field name to a detached copy: a 0-d tensor for a scalar field
        (e.g. ``skipped``, an int64 count of steps), else a ``dict`` from leaf name to a
        tensor of that leaf's state shape and dtype.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> opt = fr.adam(lr=1e-3)
        >>> params = {"w": torch.ones(2, 3)}
        >>> sd = fr.state_dict(opt.init(params))
        >>> sorted(sd)
        ['beta_powers', 'exp_avg', 'exp_avg_sq', 'skipped']
        >>> exp_avg = sd["exp_avg"]  # keyed by leaf name
        >>> exp_avg["w"].shape
        torch.Size([2, 3])
        >>> state = fr.load_state_dict(opt, params, sd)
    """
    table_field = leaf_table_field(state)
    names = _float_leaf_names(state)
    out: dict[str, Any] = {}
    for field, tree in zip(state._fields, state, strict=True):
        if not enabled(tree):
            continue
        if field == table_field:
            out[field] = {
                name: row.detach().clone()
                for name, row in zip(names, tree, strict=True)
                if name is not None
            }
        elif isinstance(tree, Tensor):
            out[field] = tree.detach().clone()
        else:
            leaves, _ = flatten(tree)
            out[field] = {
                name: leaf.detach().clone()
                for name, leaf in zip(leaf_names(tree), leaves, strict=True)
                if leaf is not None
            }
    return out


def load_state_dict(optimizer: Optimizer, params: Params, state_dict: Mapping[str, Any]) -> State:
    """Rebuild a state for ``params`` from :func:`state_dict`'s output.

    Every tensor is checked against a fresh ``optimizer.init(params)`` (names, shapes,
    dtypes) before any is used; the tensors are copied onto the params' devices. For
    DTensor params, a plain (unsharded) checkpoint's tensors are sharded like their
    params (each rank keeps its own shard of its full copy, without communication).

    Args:
        optimizer: the :class:`Optimizer` the state is for, built with the same options
            (they decide which fields exist).
        params: the pytree of tensors the state is for (shapes, dtypes and devices of
            the state come from it).
        state_dict: a mapping as returned by :func:`state_dict` (e.g. read back with
            ``torch.load(path, weights_only=True)``).

    Returns:
        A state of ``optimizer``'s type, its tensors copies on the params' devices.

    Raises:
        ValueError: the fields differ from those of ``optimizer.init(params)``; a
            field's leaf names differ from the params'; an entry has another shape or
            dtype than ``optimizer.init(params)`` gives (the message names it).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> opt = fr.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(3)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(3)}, state)
        >>> restored = fr.load_state_dict(opt, params, fr.state_dict(state))
        >>> torch.equal(restored.momentum_buffer["w"], state.momentum_buffer["w"])
        True
    """
    template = optimizer.init(params)
    table_field = leaf_table_field(template)
    expected = {
        field for field, tree in zip(template._fields, template, strict=True) if enabled(tree)
    }
    if set(state_dict) != expected:
        raise ValueError(
            f"state_dict has fields {sorted(state_dict)}, but this optimizer's state has "
            f"{sorted(expected)}"
        )
    float_names = _float_leaf_names(template)
    fields: list[Any] = []
    for field, tree in zip(template._fields, template, strict=True):
        if not enabled(tree):
            fields.append(DISABLED)
            continue
        saved = state_dict[field]
        if field == table_field:
            rows = list(tree)
            restored = _restored_leaves(field, float_names, rows, saved)
            fields.append(torch.stack([restored.get(i, row) for i, row in enumerate(rows)]))
        elif isinstance(tree, Tensor):
            fields.append(_restored(f"{field}", tree, saved))
        else:
            leaves, spec = flatten(tree)
            restored = _restored_leaves(field, leaf_names(tree), leaves, saved)
            fields.append(spec.unflatten([restored.get(i) for i in range(len(leaves))]))
    return type(template)(*fields)


def _float_leaf_names(state: State) -> list[str | None]:
    """Per leaf of the params, its name, or ``None`` for a leaf without state.

    Read from the state's first per-leaf field; empty when no field is per leaf."""
    table_field = leaf_table_field(state)
    trees = [
        tree
        for field, tree in zip(state._fields[:-1], state[:-1], strict=True)
        if enabled(tree) and field != table_field
    ]
    if not trees:  # e.g. SGD without momentum keeps no per-leaf state
        return []
    leaves, _ = flatten(trees[0])
    return [
        None if leaf is None else name
        for name, leaf in zip(leaf_names(trees[0]), leaves, strict=True)
    ]


def _restored_leaves(
    field: str, names: Sequence[str | None], likes: Sequence[Tensor | None], saved: Any
) -> dict[int, Tensor]:
    """One per-leaf field's saved tensors, checked, keyed by leaf index.

    Leaves whose name or template is ``None`` have no state and are not expected."""
    wanted = {
        name: (i, like)
        for i, (name, like) in enumerate(zip(names, likes, strict=True))
        if name is not None and like is not None
    }
    got = set(saved) if isinstance(saved, Mapping) else set()
    if got != set(wanted):
        missing = sorted(set(wanted) - got) or ["-"]
        extra = sorted(got - set(wanted)) or ["-"]
        raise ValueError(
            f"state_dict[{field!r}] does not match the params: missing {missing[0]!r}, "
            f"unexpected {extra[0]!r}"
        )
    return {
        i: _restored(f"{field}.{name}", like, saved[name]) for name, (i, like) in wanted.items()
    }


def _restored(name: str, like: Tensor, saved: Any) -> Tensor:
    if not isinstance(saved, Tensor) or saved.shape != like.shape or saved.dtype != like.dtype:
        got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, Tensor) else repr(saved)
        raise ValueError(
            f"state_dict entry {name} should be {like.dtype} {tuple(like.shape)}, got {got}"
        )
    if is_dtensor(like) and not is_dtensor(saved):
        # A plain (unsharded) checkpoint: every rank holds all of it, so each keeps its
        # own shard, without communication, sharded like the param.
        from torch.distributed.tensor import distribute_tensor

        sharded: Any = like
        local = saved.to(like.device, copy=True)
        return distribute_tensor(local, sharded.device_mesh, sharded.placements, src_data_rank=None)
    return saved.to(like.device, copy=True)
