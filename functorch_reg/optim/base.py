"""The machinery shared by the update rules: an ``Optimizer`` of pure functions,
hyperparameter resolution, and the lift of a per-array rule to pytrees."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .._checks import Interval, Scalar, check_scalars
from ..select import Where, selected
from ..tree import Params, flatten, full_tensor, is_float, leaf_names, matching_leaves

__all__ = ["Optimizer", "Prox", "State", "load_state_dict", "state_dict"]

State = Any
"""An optimizer state: a NamedTuple whose fields are pytrees of tensors."""


class Prox(Protocol):
    """A proximal operator, e.g. :func:`functorch_reg.prox.l1`."""

    def __call__(self, params: Params, threshold: Scalar) -> Params: ...


class Optimizer(NamedTuple):
    """An update rule as pure functions.

    Attributes:
        init: ``init(params) -> state``.
        step: ``step(params, grads, state, **hyperparams) -> (params, state)``, pure:
            neither argument is modified. Keyword arguments override the
            construction-time hyperparameters for this call (floats or tensors).
        step_: ``step_(params, grads, state, **hyperparams) -> None``, the same update
            written into ``params`` and ``state`` in place.
        hyperparams: the construction-time hyperparameters.
    """

    init: Callable[[Params], State]
    step: Callable[..., tuple[Params, State]]
    step_: Callable[..., None]
    hyperparams: Mapping[str, Any]


class LeafRule(Protocol):
    """The per-array math of an update rule.

    ``slots`` are this leaf's state tensors in the state's field order (``None`` for a
    disabled field); ``decay`` says whether ``mask`` selects the leaf.
    """

    def __call__(
        self,
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        h: Mapping[str, Scalar],
        decay: bool,
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]: ...


DISABLED: tuple[()] = ()
"""The value of a state field that the configuration does not use (e.g. no momentum).

An empty tuple rather than ``None``, so that ``vmap`` accepts the whole state."""


def enabled(field: Any) -> bool:
    """Whether a state field is in use (not :data:`DISABLED`)."""
    return not (isinstance(field, tuple) and len(field) == 0)


class _Update(NamedTuple):
    """Params leaves and state columns (params first) before and after one step."""

    spec: Any
    columns: list[list[Any]]
    new_columns: list[list[Any]]
    skipped: Tensor


def is_zero(value: Scalar) -> bool:
    """A literal ``0`` switches a term off statically; a tensor is always applied."""
    return not isinstance(value, Tensor) and value == 0


def build(
    name: str,
    *,
    state_type: type,
    init_slots: Callable[[Tensor], tuple[Tensor | None, ...]],
    rule: LeafRule,
    hyperparams: Mapping[str, Any],
    intervals: Mapping[str, Interval],
    mask: Where,
    prox: Prox | None,
    skip_nonfinite: bool,
) -> Optimizer:
    """Lift ``rule`` to an :class:`Optimizer` over pytrees.

    ``state_type`` is a NamedTuple whose last field is ``skipped`` and whose other
    fields are pytrees shaped like the params, or :data:`DISABLED` when ``init_slots``
    gives ``None`` for them.
    """
    defaults = dict(hyperparams)
    resolve(name, defaults, {}, intervals)

    def init(params: Params) -> State:
        leaves, spec = flatten(params)
        if not any(is_float(leaf) for leaf in leaves):
            raise ValueError(f"{name}.init: params hold no floating-point tensor")
        per_leaf = [init_slots(leaf) if is_float(leaf) else None for leaf in leaves]
        fields = []
        for index in range(len(state_type._fields) - 1):
            column = [None if slots is None else slots[index] for slots in per_leaf]
            fields.append(DISABLED if all(x is None for x in column) else spec.unflatten(column))
        device = next(leaf.device for leaf in leaves if is_float(leaf))
        return state_type(*fields, torch.zeros((), dtype=torch.int64, device=device))

    def update(params: Params, grads: Params, state: State, overrides: dict) -> _Update:
        """The new leaves and state columns; nothing is modified."""
        h = resolve(name, defaults, overrides, intervals)
        leaves, spec = flatten(params)
        grad_leaves = matching_leaves(leaves, spec, grads)
        if not isinstance(state, state_type):
            raise TypeError(
                f"{name}: state must be a {state_type.__name__}, got {type(state).__name__}"
            )
        columns = []
        for field, tree in zip(state._fields[:-1], state[:-1], strict=True):
            if not enabled(tree):
                columns.append([None] * len(leaves))
            else:
                columns.append(
                    matching_leaves(
                        leaves, spec, tree, other_name=f"state.{field}", check_shapes=False
                    )
                )
        decays = selected(params, mask)
        prox_threshold = (
            None if prox is None or is_zero(h["prox_strength"]) else h["lr"] * h["prox_strength"]
        )
        present = [g for g in grad_leaves if g is not None]
        finite = _all_finite(present) if skip_nonfinite and present else None

        new_leaves = list(leaves)
        new_columns = [list(column) for column in columns]
        for i, (p, g, decay) in enumerate(zip(leaves, grad_leaves, decays, strict=True)):
            if g is None or not is_float(p):
                continue
            slots = tuple(column[i] for column in columns)
            new_p, new_slots = rule(p, g, slots, h, decay)
            if decay and prox_threshold is not None:
                new_p = prox(new_p, prox_threshold)
            if finite is not None:
                new_p = torch.where(finite, new_p, p)
                new_slots = tuple(
                    None if new is None else torch.where(finite, new, old)
                    for new, old in zip(new_slots, slots, strict=True)
                )
            new_leaves[i] = new_p
            for column, new in zip(new_columns, new_slots, strict=True):
                column[i] = new
        skipped = state.skipped if finite is None else state.skipped + (~finite).long()
        return _Update(spec, [leaves, *columns], [new_leaves, *new_columns], skipped)

    def step(params: Params, grads: Params, state: State, **overrides: Any) -> tuple[Params, State]:
        new = update(params, grads, state, overrides)
        new_leaves, *new_columns = new.new_columns
        fields = [
            new.spec.unflatten(column) if enabled(tree) else DISABLED
            for tree, column in zip(state[:-1], new_columns, strict=True)
        ]
        return new.spec.unflatten(new_leaves), state_type(*fields, new.skipped)

    def step_(params: Params, grads: Params, state: State, **overrides: Any) -> None:
        with torch.no_grad():
            new = update(params, grads, state, overrides)
            # Everything is computed before the first write, so an error leaves no trace.
            for column, new_column in zip(new.columns, new.new_columns, strict=True):
                for old, new_value in zip(column, new_column, strict=True):
                    if new_value is not old:
                        old.copy_(new_value)
            state.skipped.copy_(new.skipped)

    step.__doc__ = step_.__doc__ = f"One {name} step; see ``functorch_reg.{name}``."
    return Optimizer(init, step, step_, defaults)


def resolve(
    name: str,
    defaults: Mapping[str, Any],
    overrides: Mapping[str, Any],
    intervals: Mapping[str, Interval],
) -> dict[str, Scalar]:
    """Merge per-call overrides into the defaults and validate every scalar.

    ``betas`` is split into ``beta1`` and ``beta2``.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(
            f"{name}.step() got unknown hyperparameter {unknown[0]!r}; "
            f"it accepts {', '.join(sorted(defaults))}"
        )
    merged = {**defaults, **overrides}
    if "betas" in merged:
        betas = merged.pop("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        merged["beta1"], merged["beta2"] = betas
    check_scalars(name, merged, intervals)
    return merged


def _all_finite(grads: list[Tensor]) -> Tensor:
    # A DTensor's check covers its local shard only; made global (and plain, to mix
    # with the state's plain scalars), it makes every rank skip the same steps.
    return torch.stack([full_tensor(torch.isfinite(g).all()) for g in grads]).all()


def state_dict(state: State) -> dict[str, Any]:
    """The state as plain nested dicts of tensors, keyed by field and leaf name.

    The result round-trips through ``torch.save`` and ``torch.load(weights_only=True)``;
    restore it with :func:`load_state_dict`.
    """
    out: dict[str, Any] = {}
    for field, tree in zip(state._fields, state, strict=True):
        if not enabled(tree):
            continue
        if isinstance(tree, Tensor):
            out[field] = tree.detach().clone()
            continue
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
    dtypes) before any is used; the tensors are copied onto the params' devices.
    """
    template = optimizer.init(params)
    expected = {
        field for field, tree in zip(template._fields, template, strict=True) if enabled(tree)
    }
    if set(state_dict) != expected:
        raise ValueError(
            f"state_dict has fields {sorted(state_dict)}, but this optimizer's state has "
            f"{sorted(expected)}"
        )
    fields = []
    for field, tree in zip(template._fields, template, strict=True):
        if not enabled(tree):
            fields.append(DISABLED)
            continue
        saved = state_dict[field]
        if isinstance(tree, Tensor):
            fields.append(_restored(f"{field}", tree, saved))
            continue
        leaves, spec = flatten(tree)
        names = leaf_names(tree)
        wanted = {name for name, leaf in zip(names, leaves, strict=True) if leaf is not None}
        if set(saved) != wanted:
            missing = sorted(wanted - set(saved)) or ["-"]
            extra = sorted(set(saved) - wanted) or ["-"]
            raise ValueError(
                f"state_dict[{field!r}] does not match the params: missing {missing[0]!r}, "
                f"unexpected {extra[0]!r}"
            )
        fields.append(
            spec.unflatten(
                [
                    None if leaf is None else _restored(f"{field}.{name}", leaf, saved[name])
                    for name, leaf in zip(names, leaves, strict=True)
                ]
            )
        )
    return type(template)(*fields)


def _restored(name: str, like: Tensor, saved: Any) -> Tensor:
    if not isinstance(saved, Tensor) or saved.shape != like.shape or saved.dtype != like.dtype:
        got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, Tensor) else repr(saved)
        raise ValueError(
            f"state_dict entry {name} should be {like.dtype} {tuple(like.shape)}, got {got}"
        )
    return saved.to(like.device, copy=True)
