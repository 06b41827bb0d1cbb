"""Where a :class:`~functorch_reg.TorchOptimizer` param group keeps its optimizer state.

``torch.optim.Adam`` gathers a group's params, gradients and state before each step
(``Adam._init_group``); here that is :meth:`GroupState.gather`, over one of two storages
behind the :class:`GroupState` protocol:

* :class:`LeafGroup` keeps ``optimizer.state[p]`` per param, as ``torch.optim`` does, and
  assembles the functional state from those entries (the leaf table's rows are views);
* :class:`FlatGroup` (``TorchOptimizer(flat=True)``) keeps the group's params, gradients
  and state in one buffer each (:class:`~functorch_reg.adapter_flat.FlatBuffers`), and
  each param's entry holds views of them.

Either way ``optimizer.state[p]`` has ``torch.optim``'s per-param format, so a checkpoint
of one loads into the other. A state's shape is read only through
:func:`functorch_reg.optim.base.layout`, and states are built from an ``init`` template
with ``_replace``. Labels (``"param 'fc.weight'"``) are handed in by the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import Tensor

from .adapter_flat import FlatBuffers
from .optim.base import Optimizer, State, layout
from .tree import Params, flatten

__all__ = [
    "Entries",
    "FlatGroup",
    "Gathered",
    "GroupState",
    "LeafGroup",
    "check_flat_rule",
    "param_tree",
]

Entries = MutableMapping[Tensor, dict[str, Tensor]]
"""``torch.optim.Optimizer.state``: each param's state, by field name (plus ``skipped``)."""


class Gathered(NamedTuple):
    """One group's step: ``step_(params, grads, state, **hyperparameters)``."""

    step_: Callable[..., None]
    params: Params
    grads: Params
    state: State


class GroupState(Protocol):
    """The storage of one param group, as :class:`~functorch_reg.TorchOptimizer` uses it.

    ``members`` are the params that the storage steps (a flat group's trainable ones).
    """

    members: list[Tensor]

    def check(self) -> None:
        """Raise before any write unless the group can step as its params are now."""

    def refresh(self) -> None:
        """Make params and gradients that other code re-pointed (``model.to()``,
        ``p.grad = ...``) views of the storage again, keeping their values."""

    def gather(self, state: Entries) -> Gathered | None:
        """The group's step (``torch.optim``'s ``_init_group``), creating state where it
        is missing; ``None`` when nothing in the group steps."""

    def zero_grad(self, set_to_none: bool) -> None:
        """Reset the group's gradients."""

    def check_entry(self, position: int, entry: Mapping[str, Any]) -> None:
        """Raise unless ``entry``, a saved state of the param at ``position``, has this
        rule's keys, shapes and dtypes."""

    def check_saved(self, saved: Mapping[Tensor, Mapping[str, Tensor]]) -> None:
        """Raise unless the saved entries (by param) can be loaded into this storage."""


def param_tree(params: Sequence[Any], names: Sequence[str] | None) -> dict[str, Any] | list[Any]:
    """``params`` (or values, one per param) as a pytree: by ``names`` when the group
    has them (``named_parameters()``), else a list."""
    if names is not None:
        return dict(zip(names, params, strict=True))
    return list(params)


class _Group:
    """What both storages share: the rule, the group's params and labels, the layout."""

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        names: Sequence[str] | None,
        labels: Sequence[str],
        label: str,
    ) -> None:
        self.optimizer = optimizer
        self.label = label
        self._params = list(params)
        self._names = None if names is None else list(names)
        self._labels = list(labels)
        self._template = optimizer.init([torch.empty((), device="meta")])
        self._layout = layout(self._template)

    def check(self) -> None:
        for position, p in enumerate(self._params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "TorchOptimizer does not support sparse gradients; "
                    f"{self._labels[position]} has one"
                )

    def fresh_entry(self, p: Tensor) -> dict[str, Tensor]:
        """One param's initial state, keyed by field name, plus the step-skip counter."""
        state = self.optimizer.init([p])
        fields = layout(state)
        entry = {}
        for field in (*fields.slots, *([fields.table] if fields.table else [])):
            value = getattr(state, field)[0]
            if value is not None:
                entry[field] = value
        entry[fields.counter] = getattr(state, fields.counter)
        return entry

    def check_entry(self, position: int, entry: Mapping[str, Any]) -> None:
        label = self._labels[position]
        expected = self.fresh_entry(torch.empty_like(self._params[position], device="meta"))
        if set(entry) != set(expected):
            raise ValueError(
                f"state_dict state of {label} has keys {sorted(entry)}, expected {sorted(expected)}"
            )
        for name, like in expected.items():
            value = entry[name]
            if (
                not isinstance(value, Tensor)
                or value.shape != like.shape
                or value.dtype != like.dtype
            ):
                got = (
                    f"{value.dtype} {tuple(value.shape)}"
                    if isinstance(value, Tensor)
                    else repr(value)
                )
                raise ValueError(
                    f"state_dict entry {name} of {label} should be {like.dtype} "
                    f"{tuple(like.shape)}, got {got}"
                )


class LeafGroup(_Group):
    """Per-param state, as ``torch.optim`` keeps it: ``state[p]`` holds ``p``'s slots
    (``exp_avg``, ...), its row of the leaf table and the group's shared ``skipped``.

    The leaf table (Adam's ``beta_powers``, SGD's ``count``) is one tensor with a row per
    leaf of the group's flattened tree, so that a step updates all rows in one kernel.
    Invariant: while each entry's table value is a view of its row of ``self._table``
    (:func:`_is_row`), the in-place step updates the entries through the table. New
    state, and state that ``load_state_dict`` put back, break it; :meth:`gather` then
    stacks a new table from the entries' values and makes them views of it again.
    A param without a gradient and without state gets ``None`` slots, which the
    functional step leaves alone, so frozen params cost no memory.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        names: Sequence[str] | None,
        labels: Sequence[str],
        label: str,
    ) -> None:
        super().__init__(optimizer, params, names, labels, label)
        self.members = self._params
        # Row order of the leaf table: the flattening order of the group's tree.
        self._order: list[int] = flatten(param_tree(range(len(self._params)), self._names))[0]
        self._table: Tensor | None = None

    def refresh(self) -> None:
        """Nothing to re-point: each param is its own storage."""

    def gather(self, state: Entries) -> Gathered | None:
        params = self._params
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return None
        for p, g in zip(params, grads, strict=True):
            if g is not None and not state.get(p):
                state[p] = self.fresh_entry(p)
        entries = [state.get(p) or None for p in params]
        fields = self._layout
        skipped = next(e for e in entries if e is not None)[fields.counter]
        for e in entries:
            if e is not None:
                e[fields.counter] = skipped
        # A param may lack a field that others have (Muon's matrices keep no
        # exp_avg_sq): None, as for a frozen param.
        values: dict[str, Any] = {
            field: param_tree([None if e is None else e.get(field) for e in entries], self._names)
            for field in fields.slots
        }
        if fields.table is not None:
            values[fields.table] = self._leaf_table(entries, fields.table)
        values[fields.counter] = skipped
        return Gathered(
            self.optimizer.step_,
            param_tree(params, self._names),
            param_tree(grads, self._names),
            self._template._replace(**values),
        )

    def _leaf_table(self, entries: Sequence[dict[str, Tensor] | None], field: str) -> Tensor:
        """The group's leaf table, stacked anew unless every entry holds its row."""
        rows = [entries[position] for position in self._order]
        table = self._table
        if (
            table is None
            or len(table) != len(rows)
            or not all(e is None or _is_row(e[field], table, i) for i, e in enumerate(rows))
        ):
            fresh = next(e for e in rows if e is not None)[field]
            table = torch.stack([fresh if e is None else e[field] for e in rows])
            for i, e in enumerate(rows):
                if e is not None:
                    e[field] = table[i]
            self._table = table
        return table

    def zero_grad(self, set_to_none: bool) -> None:
        """As ``torch.optim.Optimizer.zero_grad`` (without ``foreach``)."""
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
                continue
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()

    def check_saved(self, saved: Mapping[Tensor, Mapping[str, Tensor]]) -> None:
        """Any params may have state: nothing more to check than each entry."""


class FlatGroup(_Group):
    """A param group in one buffer each for params, gradients and every state slot.

    Its trainable params (``members``) are packed into :attr:`packed`
    (``requires_grad=False`` params are left out, never updated, and get no state); each
    member's entry in ``state`` holds views of the slot buffers, the table's single row
    and the shared ``skipped``, so a group's params step together and share one row.
    The functional state over the buffers is cached and rebuilt when an entry was
    replaced (first step, ``load_state_dict``). With a ``for_flat`` rule, the group steps
    with ``optimizer.for_flat(layout)`` (a mask for leaves translated to the buffer).

    Raises:
        ValueError: the trainable params mix dtypes or devices, one is a DTensor, or
            the rule's ``mask`` selects part of the buffer.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        names: Sequence[str] | None,
        labels: Sequence[str],
        label: str,
    ) -> None:
        super().__init__(optimizer, params, names, labels, label)
        kept = [i for i, p in enumerate(self._params) if p.requires_grad]
        self.members = [self._params[i] for i in kept]
        member_names = None if names is None else [names[i] for i in kept]
        self.packed = FlatBuffers(self.members, label, member_names) if self.members else None
        """The group's buffers; ``None`` when it has no trainable params."""
        self._step_ = optimizer.step_
        if self.packed is not None and optimizer.for_flat is not None:
            try:
                self._step_ = optimizer.for_flat(self.packed.layout).step_
            except ValueError as error:
                raise ValueError(
                    f"TorchOptimizer(flat=True), {label}: {error}; or split the param "
                    "group by the mask"
                ) from None
        self._cached: tuple[State, list[dict[str, Tensor]]] | None = None

    @property
    def params(self) -> Tensor:
        """The params buffer (1-D)."""
        return self._buffers().params

    @property
    def grads(self) -> Tensor:
        """The gradient buffer, of which each member's ``.grad`` is a view."""
        return self._buffers().grads

    def _buffers(self) -> FlatBuffers:
        if self.packed is None:
            raise ValueError(f"TorchOptimizer(flat=True): {self.label} has no trainable params")
        return self.packed

    def check(self) -> None:
        super().check()
        if [id(p) for p in self._params if p.requires_grad] == [id(p) for p in self.members]:
            return
        packed = {id(p) for p in self.members}
        position = next(
            i for i, p in enumerate(self._params) if p.requires_grad != (id(p) in packed)
        )
        raise ValueError(
            f"TorchOptimizer(flat=True): {self._labels[position]} changed requires_grad "
            "since the optimizer was built; a flat group's buffer holds the params that "
            "were trainable then: build a new optimizer after freezing or unfreezing, or "
            "use flat=False"
        )

    def refresh(self) -> None:
        if self.packed is not None:
            self.packed.refresh(self.members)

    def gather(self, state: Entries) -> Gathered | None:
        if self.packed is None:
            return None
        self.refresh()
        packed = self.packed
        return Gathered(
            self._step_,
            {packed.key: packed.params},
            {packed.key: packed.grads},
            self._state(state),
        )

    def _state(self, state: Entries) -> State:
        """The functional state over the buffers, whose views the members' entries hold."""
        packed = self._buffers()
        if self._cached is not None:
            cached, entries = self._cached
            if all(state.get(p) is e for p, e in zip(self.members, entries, strict=True)):
                return cached
        functional = self._packed_state(state)
        fields = self._layout
        views = {
            field: packed.views(getattr(functional, field)[packed.key]) for field in fields.slots
        }
        entries = []
        for i, p in enumerate(self.members):
            entry = {field: view[i] for field, view in views.items()}
            if fields.table is not None:
                entry[fields.table] = getattr(functional, fields.table)[0]
            entry[fields.counter] = getattr(functional, fields.counter)
            state[p] = entry
            entries.append(entry)
        self._cached = (functional, entries)
        return functional

    def _packed_state(self, state: Entries) -> State:
        """A fresh functional state, or one packed from the members' entries in ``state``."""
        packed = self._buffers()
        fresh = self.optimizer.init({packed.key: packed.params})
        slots = [state.get(p) or None for p in self.members]
        if all(s is None for s in slots):
            return fresh
        self._check_entries(slots)
        entries = cast("list[dict[str, Tensor]]", slots)  # none is None, as checked
        fields = layout(fresh)
        values: dict[str, Any] = {
            field: {packed.key: packed.pack([e[field] for e in entries])} for field in fields.slots
        }
        if fields.table is not None:
            device = getattr(fresh, fields.table).device
            values[fields.table] = entries[0][fields.table].to(device).clone().unsqueeze(0)
        counter = getattr(fresh, fields.counter)
        values[fields.counter] = entries[0][fields.counter].detach().clone().to(counter.device)
        return fresh._replace(**values)

    def _check_entries(self, slots: Sequence[Mapping[str, Tensor] | None]) -> None:
        """The members step together: all or none have state, and the same leaf-table
        row (how often each was updated)."""
        if all(s is None for s in slots):
            return

        def label(member: int) -> str:  # by position in the group, frozen params included
            return self._labels[
                next(i for i, p in enumerate(self._params) if p is self.members[member])
            ]

        if any(s is None for s in slots):
            missing = next(i for i, s in enumerate(slots) if s is None)
            raise ValueError(
                f"TorchOptimizer(flat=True): {label(missing)} has no state while others of "
                "its group do (e.g. a flat=False checkpoint where it never had a gradient); "
                "with flat=True a group's params step together: load it with flat=False, "
                "or put that param in a param group of its own"
            )
        field = self._layout.table
        if field is None:
            return
        rows = [cast("Mapping[str, Tensor]", s)[field].cpu() for s in slots]
        for member, row in enumerate(rows):
            if not torch.equal(row, rows[0]):
                raise ValueError(
                    f"TorchOptimizer(flat=True): the params of {self.label} have different "
                    f"{field} ({label(member)} differs from the first: they were updated "
                    "different numbers of times); with flat=True a group's params step "
                    "together: load it with flat=False"
                )

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero the gradient buffer, whatever ``set_to_none`` says, so that the
        gradients stay views of it."""
        if self.packed is not None:
            self.refresh()
            self.packed.grads.zero_()

    def check_saved(self, saved: Mapping[Tensor, Mapping[str, Tensor]]) -> None:
        """Raise unless all or none of the members have saved state, with one table row."""
        self._check_entries([saved.get(p) for p in self.members])


def check_flat_rule(optimizer: Optimizer) -> None:
    """With ``flat=True`` a group is one buffer, which a ``mask`` made for named leaves
    would silently leave undecayed. A rule with ``for_flat`` translates its mask per
    group (:class:`FlatGroup`); for one without (Muon, a hand-built ``Optimizer``),
    probe one step on a one-element buffer."""
    if optimizer.for_flat is not None:
        return
    probe = [torch.ones(1)]
    hint = (
        "TorchOptimizer(flat=True) steps each param group as one buffer, which the "
        "functional optimizer's mask must select; drop the mask and choose decay per "
        "param group with weight_decay"
    )
    try:
        out, _ = optimizer.step(
            probe, [torch.zeros(1)], optimizer.init(probe), lr=1.0, weight_decay=0.5
        )
    except ValueError as error:
        raise ValueError(f"{hint} ({error})") from None
    if torch.equal(out[0], probe[0]):
        raise ValueError(f"{hint}: this mask leaves it out")


def _is_row(value: Tensor, table: Tensor, i: int) -> bool:
    """Whether ``value`` is a view of row ``i`` of ``table``."""
    return value._base is table and value.storage_offset() == i * value.numel()
