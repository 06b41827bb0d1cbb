"""The machinery shared by the update rules: an ``Optimizer`` of pure functions,
hyperparameter resolution, and the lift of a per-array rule to pytrees.

Checkpoints of a state (:func:`state_dict`, :func:`load_state_dict`) live in
:mod:`functorch_reg.optim.checkpoint`; they are re-exported here."""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast

import torch
from torch import Tensor

from .._checks import Interval, Scalar, as_scalar, check_scalars
from .._memory import check_writable
from ..select import Where, selected
from ..tree import (
    Params,
    flatten,
    full_tensor,
    is_dtensor,
    is_float,
    matching_leaves,
    spec_names,
)
from ._foreach import NotElementwiseError, Rows, TensorList, layout_of, remeasure_temporaries
from .decay import References

# state_dict and load_state_dict come from .checkpoint, through __getattr__ below.
__all__ = ["Optimizer", "Prox", "State", "load_state_dict", "state_dict"]  # noqa: F822

# Tensor attributes read over many leaves at C speed with map() (the eager step's checks).
_DTYPE, _DEVICE, _SHAPE, _NBYTES, _REQUIRES_GRAD = (
    operator.attrgetter(a) for a in ("dtype", "device", "shape", "nbytes", "requires_grad")
)
_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})
_REAL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

State = Any
"""An optimizer state: a NamedTuple whose fields are pytrees of tensors, ``skipped`` last.

A state type may keep one *leaf-table* field, named by its classmethod
``leaf_table_field()`` (e.g. ``AdamState.leaf_table_field() == "beta_powers"``): that
field holds a scalar (or a small row) per leaf as a single ``[n_leaves, *row]``
tensor, one row per leaf of the flattened params in order, rather than as a pytree
of tiny tensors. Read it with :func:`leaf_table_field`, and a state's whole shape
with :func:`layout`."""


def leaf_table_field(state: Any) -> str | None:
    """The leaf-table field of a state (or state type), as its type's
    ``leaf_table_field()`` classmethod names it; ``None`` when the type has none.

    >>> import functorch_reg as fr
    >>> leaf_table_field(fr.AdamState), leaf_table_field(fr.optim.LionState)
    ('beta_powers', None)
    """
    describe = getattr(state if isinstance(state, type) else type(state), "leaf_table_field", None)
    return None if describe is None else cast(str, describe())


class Prox(Protocol):
    """A proximal operator, e.g. :func:`functorch_reg.prox.l1`.

    An optimizer calls it once per step as ``prox({leaf_name: leaf}, threshold)``: a
    dict of the leaves that its ``mask`` selects and that this step updates, keyed by
    their dotted names (``"0.weight"``; a flat buffer's group name), and the result
    must hold the same keys. So a ``where=`` inside the prox sees leaf names, as it
    does on a params tree (``functools.partial(fr.prox.l1, where="0.*")``), and
    :func:`functorch_reg.hypergrad.implicit` calls the same prox the same way.

    With ``prox_metric="preconditioned"`` the threshold is ``lr * prox_strength / D``, a
    tensor shaped like the leaf (the rule's metric :math:`D`), and the prox is called
    once per leaf, ``prox({leaf_name: leaf}, threshold)``; every ``fr.prox`` operator
    takes such a per-coordinate threshold.
    """

    def __call__(self, params: Params, threshold: Scalar) -> Params: ...


ProxMetric = Literal["euclidean", "preconditioned"]
"""The metric of an optimizer's prox step (see :func:`functorch_reg.adam`)."""


def check_prox_metric(name: str, prox_metric: str, prox: Prox | None) -> bool:
    """Whether the prox is taken in the rule's metric; raises on a bad ``prox_metric``."""
    if prox_metric not in ("euclidean", "preconditioned"):
        raise ValueError(
            f"{name}: prox_metric must be 'euclidean' or 'preconditioned', got {prox_metric!r}"
        )
    if prox_metric == "preconditioned" and prox is None:
        raise ValueError(
            f"{name}: prox_metric='preconditioned' sets the metric of the prox step; pass "
            "prox= (e.g. fr.prox.l1) and prox_strength="
        )
    return prox_metric == "preconditioned"


class Optimizer(NamedTuple):
    """An update rule as pure functions.

    Attributes:
        init: ``init(params) -> state``.
        step: ``step(params, grads, state, **hyperparams) -> (params, state)``, pure:
            neither argument is modified. Keyword arguments override the
            construction-time hyperparameters for this call (floats or tensors).
        step_: ``step_(params, grads, state, **hyperparams) -> None``, the same update
            written into ``params`` and ``state`` in place. Everything is checked
            before the first write (hyperparameters, trees, each grad's and state
            tensor's dtype and device against its param's, and, outside
            ``torch.compile`` and ``vmap``, that no target is an inference or
            expanded tensor and no two targets share memory), so an error changes
            nothing. Neither step changes a param's dtype; ``step`` refuses
            ``nn.Parameter`` leaves that require grad while grad mode is on (detach
            them), and both refuse complex leaves (pass ``torch.view_as_real``).
        hyperparams: the construction-time hyperparameters.
        validate: ``validate(params=None, **hyperparams) -> None`` raises as ``step``
            would for these per-call overrides, and touches nothing (e.g. to check
            several param groups before updating any). Without ``params`` it checks the
            scalars; with ``params`` (a tree like ``step``'s) it also checks the trees,
            ``mask``, ``prox`` and ``decay_to`` against them, by stepping copies on the
            meta device: no memory, no device work. Always set by this library's
            factories; :func:`check_optimizer` also serves an ``Optimizer`` built by hand
            without one.
        for_flat: ``for_flat(flat) -> Optimizer``, the same rule for the buffers of
            ``flat = fr.flat.pack(...)``: a ``mask`` written for leaves becomes the list
            of groups it fills (a group it selects only partly is refused), and a prox
            that needs leaves (a structured one, or one with ``where=``) is lifted with
            :func:`functorch_reg.flat.leafwise`. ``fr.sweep(flat=...)`` and
            ``fr.train_step(flat=...)`` call it, so flat results equal per-leaf ones.

    The shape is optax's ``GradientTransformation`` (``init``/``update``) with the
    update applied; ``step`` is the ``torch.optim`` rule named by the factory
    (:func:`~functorch_reg.sgd`, :func:`~functorch_reg.adam`, ...).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> opt = fr.sgd(lr=0.5)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> new, state = opt.step(params, {"w": torch.ones(2)}, state, lr=0.25)  # override
        >>> new["w"], params["w"]  # step is pure
        (tensor([0.7500, 0.7500]), tensor([1., 1.]))
        >>> opt.step_(params, {"w": torch.ones(2)}, state)  # in place
        >>> params["w"]
        tensor([0.5000, 0.5000])
    """

    init: Callable[[Params], State]
    step: Callable[..., tuple[Params, State]]
    step_: Callable[..., None]
    hyperparams: Mapping[str, Any]
    validate: Callable[..., None] | None = None
    for_flat: Callable[[Any], Optimizer] | None = None


RuleOutput = (
    tuple[Tensor, tuple[Tensor | None, ...]] | tuple[Tensor, tuple[Tensor | None, ...], Scalar]
)
"""A rule's ``(new_param, new_slots)``, or ``(new_param, new_slots, metric)``."""


class LeafRule(Protocol):
    """The per-array math of an update rule.

    ``slots`` are this leaf's state tensors in the order of the state's per-leaf fields
    (``None`` for a disabled field); ``row`` is this leaf's row of the values that
    :attr:`LeafTable.advance` derives (``None`` without a table); ``decay`` says whether
    ``mask`` selects the leaf; ``reference`` is the leaf's ``decay_to`` reference
    (``None`` without one).

    A rule may return a third value, its metric :math:`D` (a tensor shaped like the
    leaf, or a scalar): the prox is then taken in that metric, with the threshold
    ``lr * prox_strength / D`` (``prox_metric="preconditioned"``).
    """

    def __call__(
        self,
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> RuleOutput: ...


class LeafTable(NamedTuple):
    """How the state's leaf-table field (see :data:`State`) starts and advances.

    Scalars that each leaf keeps for itself (Adam's beta products, SGD's update count)
    live in one ``[n_leaves, *row]`` tensor, so a step advances all of them with one
    kernel. As a 0-d tensor per leaf, each leaf cost two extra tiny kernels (compute,
    then copy back), which made a compiled step over many tensors bound by kernel
    launches on CUDA.

    Attributes:
        init_row: ``init_row(device) -> row``, the row of a leaf not yet updated.
        advance: ``advance(table, h) -> (new_table, derived)``: the table after one
            update of every leaf, and per-leaf values for the rule, indexed by leaf
            (``derived[i]`` is the rule's ``row``). Rows of leaves that are not updated
            this step are restored by the caller.
    """

    init_row: Callable[[torch.device], Tensor]
    advance: Callable[[Tensor, Mapping[str, Scalar]], tuple[Tensor, Tensor]]


DISABLED: tuple[()] = ()
"""The value of a state field that the configuration does not use (e.g. no momentum).

An empty tuple rather than ``None``, so that ``vmap`` accepts the whole state."""


def enabled(field: Any) -> bool:
    """Whether a state field is in use (not :data:`DISABLED`)."""
    return not (isinstance(field, tuple) and len(field) == 0)


class StateLayout(NamedTuple):
    """What a functional state holds, read from the state itself (see :func:`layout`).

    ``slots`` are the per-leaf fields in use, each a pytree shaped like the params (the
    leaf-table field excluded); ``table`` is the leaf-table field in use (one row per
    leaf in a single tensor) or ``None``; ``counter`` is the 0-d step-skip counter.
    Fields that a state type declares but its configuration does not use appear in
    neither: build a state from another with ``template._replace(**fields)``.
    """

    slots: tuple[str, ...]
    table: str | None
    counter: str = "skipped"


def layout(state: State) -> StateLayout:
    """The :class:`StateLayout` of ``state``: the only way code outside ``optim/``
    should read which fields a state uses.

    >>> import torch, functorch_reg as fr
    >>> layout(fr.adam().init({"w": torch.zeros(2)}))
    StateLayout(slots=('exp_avg', 'exp_avg_sq'), table='beta_powers', counter='skipped')
    """
    table = leaf_table_field(state)
    fields = state._fields[:-1]
    in_use = [f for f in fields if enabled(getattr(state, f))]
    return StateLayout(tuple(f for f in in_use if f != table), table if table in in_use else None)


class _Update(NamedTuple):
    """Params leaves and state columns (params first) before and after one step.

    ``pending`` are fused kernels that write their new values in place (``step_``
    only), run after the checks; ``written`` names the (column, leaves) they write.
    """

    spec: Any
    columns: list[list[Any]]
    new_columns: list[list[Any]]
    table: Tensor | None
    new_table: Tensor | None
    skipped: Tensor
    written: Sequence[tuple[int, Sequence[int]]] = ()
    pending: Sequence[Callable[[], None]] = ()


class FusedStep(Protocol):
    """A kernel that steps a group of leaves in place, for the options it implements.

    ``fused(params, rows, h, decay)`` sees a group's params (one dtype and device),
    their rows of the state's leaf table before this step (Python values, or ``None``
    when the table is not on the CPU), the hyperparameters and whether the group is
    decayed. It returns ``None`` where the kernel does not compute what the rule
    computes (then the rule runs), else ``run(targets, grads, found_inf)``, which
    writes the step into ``targets`` (the params, then one list per state field, or
    an empty list for a disabled field) and leaves everything as it was where
    ``found_inf`` (a float32 0-d tensor) is 1. Called outside ``torch.compile`` only.
    """

    def __call__(
        self, params: list[Tensor], rows: list[Any] | None, h: Mapping[str, Scalar], decay: bool
    ) -> Callable[[list[list[Tensor]], list[Tensor], Tensor | None], None] | None: ...


def is_zero(value: Scalar) -> bool:
    """A literal ``0`` switches a term off statically; a tensor is always applied."""
    return not isinstance(value, Tensor) and value == 0


def build(
    name: str,
    *,
    state_type: type[Any],
    init_slots: Callable[[Tensor], tuple[Tensor | None, ...]],
    rule: LeafRule,
    hyperparams: Mapping[str, Any],
    intervals: Mapping[str, Interval],
    mask: Where,
    prox: Prox | None,
    skip_nonfinite: bool,
    table: LeafTable | None = None,
    references: References | None = None,
    check: Callable[[Mapping[str, Scalar]], None] | None = None,
    fused: FusedStep | None = None,
    donates: bool = False,
) -> Optimizer:
    """Lift ``rule`` to an :class:`Optimizer` over pytrees.

    ``state_type`` is a NamedTuple whose last field is ``skipped``. Its leaf-table field
    (if its ``leaf_table_field()`` names one) is driven by ``table``, and is :data:`DISABLED`
    when ``table`` is ``None``. Its other fields are pytrees shaped like the params, one
    per slot of ``init_slots``, or :data:`DISABLED` when ``init_slots`` gives ``None``
    for them. ``references`` gives each leaf's decay reference (see :mod:`.decay`), checked
    at every step before anything changes. ``check(h)`` raises for a combination of
    resolved hyperparameters that no interval expresses (e.g. a decay factor <= 0).
    ``fused`` (see :class:`FusedStep`) steps the groups of leaves whose options it
    implements outside ``torch.compile``; the prox, when one is set, then runs through
    ``rule`` instead.

    ``donates=True`` promises that ``rule`` never reads ``p`` or a slot again after
    calling one of the fused methods ``mul``, ``add``, ``lerp``, ``addcmul`` or
    ``addcdiv`` on it (``m = m.lerp(g, w)``, never ``m.lerp(g, w) + m``). ``step_`` may
    then run the rule on a group of leaves after every check has passed, with those
    methods writing straight into the params and state (no new tensors, no copy
    back): for a group whose rule already ran elementwise with the same leaves and
    kinds of hyperparameters, without ``skip_nonfinite`` and without a prox on it.
    """
    lift = _Lift(
        name,
        state_type=state_type,
        init_slots=init_slots,
        rule=rule,
        hyperparams=hyperparams,
        intervals=intervals,
        mask=mask,
        prox=prox,
        skip_nonfinite=skip_nonfinite,
        table=table,
        references=references,
        check=check,
        fused=fused,
        donates=donates,
    )

    def step(params: Params, grads: Params, state: State, **overrides: Any) -> tuple[Params, State]:
        return lift.step(params, grads, state, **overrides)

    def step_(params: Params, grads: Params, state: State, **overrides: Any) -> None:
        lift.step_(params, grads, state, **overrides)

    step.__doc__ = step_.__doc__ = f"One {name} step; see ``functorch_reg.{name}``."
    return Optimizer(lift.init, step, step_, lift.defaults, lift.validate, lift.for_flat)


class _Gathered(NamedTuple):
    """One step's inputs, flattened and matched leaf by leaf to the params.

    ``columns`` holds, per slot field of the state, one entry per leaf (``None`` for a
    disabled field or a leaf without state); ``updated`` says which leaves step (a
    floating-point leaf with a gradient)."""

    leaves: list[Any]
    spec: Any
    grads: list[Any]
    columns: list[list[Tensor | None]]
    decays: Sequence[bool]
    refs: Sequence[Tensor | None]
    updated: list[bool]


class _Lift:
    """What :func:`build` makes of its arguments: the functions of an :class:`Optimizer`,
    and the named steps of one update (gather, advance the table, apply the rule, prox,
    finish), each run in that order by :meth:`update`."""

    def __init__(
        self,
        name: str,
        *,
        state_type: type[Any],
        init_slots: Callable[[Tensor], tuple[Tensor | None, ...]],
        rule: LeafRule,
        hyperparams: Mapping[str, Any],
        intervals: Mapping[str, Interval],
        mask: Where,
        prox: Prox | None,
        skip_nonfinite: bool,
        table: LeafTable | None,
        references: References | None,
        check: Callable[[Mapping[str, Scalar]], None] | None,
        fused: FusedStep | None,
        donates: bool = False,
    ) -> None:
        self.name, self.state_type, self.init_slots, self.rule = name, state_type, init_slots, rule
        self.intervals, self.mask, self.prox, self.table = intervals, mask, prox, table
        self.skip_nonfinite, self.references, self.check = skip_nonfinite, references, check
        self.fused, self.donates = fused, donates
        self.elementwise: set[tuple[Any, ...]] = set()  # groups the rule ran over as lists
        self.defaults = {key: _numbers_of(value) for key, value in hyperparams.items()}
        self.resolved({})
        self.table_field = leaf_table_field(state_type)
        self.slot_fields = [f for f in state_type._fields[:-1] if f != self.table_field]
        self.checked = _Checked()

    def resolved(self, overrides: Mapping[str, Any]) -> dict[str, Scalar]:
        h = resolve(self.name, self.defaults, overrides, self.intervals)
        if self.check is not None:
            self.check(h)
        return h

    def init(self, params: Params) -> State:
        name = self.name
        if isinstance(params, Iterator):
            raise TypeError(
                f"{name}.init got a {type(params).__name__} (e.g. model.parameters()), which "
                "has no leaf names and is used up once read; pass a dict of tensors: "
                "{k: v.detach() for k, v in model.named_parameters()}"
            )
        leaves, spec = flatten(params)
        names = spec_names(spec)
        _check_unique_names(name, names)
        _check_not_complex(name, names, leaves)
        if not any(is_float(leaf) for leaf in leaves):
            raise ValueError(f"{name}.init: params hold no floating-point tensor")
        device = next(leaf.device for leaf in leaves if is_float(leaf))
        per_leaf = [self.init_slots(leaf) if is_float(leaf) else None for leaf in leaves]
        fields: dict[str, Any] = {}
        for index, field in enumerate(self.slot_fields):
            column = [None if slots is None else slots[index] for slots in per_leaf]
            fields[field] = DISABLED if all(x is None for x in column) else spec.unflatten(column)
        if self.table_field is not None:
            table = self.table
            fields[self.table_field] = (
                DISABLED if table is None else torch.stack([table.init_row(device) for _ in leaves])
            )
        skipped = torch.zeros((), dtype=torch.int64, device=device)
        return self.state_type(**fields, skipped=skipped)

    def update(
        self,
        params: Params,
        grads: Params,
        state: State,
        overrides: Mapping[str, Any],
        in_place: bool,
    ) -> _Update:
        """The new leaves and state columns; nothing is modified.

        Outside ``torch.compile``, the leaves that share a dtype, a device and their
        options step as one group: through ``fused`` where it applies (with
        ``in_place``, its writes are returned as ``pending``, to run after the checks),
        else through ``rule`` over TensorLists (:mod:`._foreach`).
        """
        h = self.resolved(overrides)
        inputs = self._gather(params, grads, state)
        prox = self.prox
        threshold = (
            None if prox is None or is_zero(h["prox_strength"]) else h["lr"] * h["prox_strength"]
        )
        present = [g for g in inputs.grads if g is not None]
        finite = _all_finite(present) if self.skip_nonfinite and present else None
        old_table, new_table, derived = self._advance_table(state, inputs, h, finite)
        new_values = [list(inputs.leaves), *[list(column) for column in inputs.columns]]
        stepped, written, pending = self._apply_rule(
            inputs, h, derived, old_table, finite, new_values, in_place, threshold is not None
        )
        if prox is not None and threshold is not None:
            _prox_step(self.name, prox, threshold, inputs, stepped)
        _finish(inputs, stepped, new_values, finite)
        skipped = state.skipped if finite is None else state.skipped + (~finite).long()
        columns = [inputs.leaves, *inputs.columns]
        return _Update(
            inputs.spec, columns, new_values, old_table, new_table, skipped, written, pending
        )

    def _gather(self, params: Params, grads: Params, state: State) -> _Gathered:
        """Flatten the params, match the grads and the state's per-leaf fields to them
        (checking dtypes and devices), and look up each leaf's mask and reference."""
        name = self.name
        leaves, spec = flatten(params)
        grad_leaves = matching_leaves(leaves, spec, grads)
        _check_grads(name, spec, leaves, grad_leaves)
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"{name}: state must be a {self.state_type.__name__}, got {type(state).__name__}"
            )
        columns: list[list[Tensor | None]] = []
        for field in self.slot_fields:
            tree = getattr(state, field)
            if not enabled(tree):
                columns.append([None] * len(leaves))
            else:
                column = matching_leaves(
                    leaves, spec, tree, other_name=f"state.{field}", check_shapes=False
                )
                _check_like_params(f"state.{field}", spec, leaves, column)
                columns.append(column)
        decays = selected(params, self.mask)
        references = self.references
        refs = [None] * len(leaves) if references is None else references(leaves, spec, decays)
        updated = [
            g is not None and isinstance(p, Tensor) and p.is_floating_point()
            for p, g in zip(leaves, grad_leaves, strict=True)
        ]
        return _Gathered(leaves, spec, grad_leaves, columns, decays, refs, updated)

    def _advance_table(
        self, state: State, inputs: _Gathered, h: Mapping[str, Scalar], finite: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The leaf table before and after this step, and the rows the rule reads; rows
        of leaves that do not step (and all rows, in a skipped step) keep their values."""
        if self.table is None:
            return None, None, None
        old_table = getattr(state, cast(str, self.table_field))
        n_leaves = len(inputs.leaves)
        if old_table.shape[0] != n_leaves:
            raise ValueError(
                f"{self.name}: state.{self.table_field} has rows for {old_table.shape[0]} "
                f"leaves, the params have {n_leaves}"
            )
        new_table, derived = self.table.advance(old_table, h)
        if not all(inputs.updated):
            rows = torch.tensor(inputs.updated, device=old_table.device)
            rows = rows.view(-1, *([1] * (old_table.dim() - 1)))
            new_table = torch.where(rows, new_table, old_table)
        if finite is not None:
            new_table = torch.where(finite, new_table, old_table)
        return old_table, new_table, derived

    def _apply_rule(
        self,
        inputs: _Gathered,
        h: Mapping[str, Scalar],
        derived: Tensor | None,
        old_table: Tensor | None,
        finite: Tensor | None,
        new_values: list[list[Any]],
        in_place: bool,
        proxed: bool,
    ) -> tuple[dict[int, RuleOutput], list[tuple[int, Sequence[int]]], list[Callable[[], None]]]:
        """Step every updated leaf: per group through ``fused`` where it applies (a
        decayed group with a prox excepted), else ``rule`` over the group's TensorLists,
        else (under ``torch.compile``, for special tensors, for a rule that needs a
        leaf's shape) ``rule`` leaf by leaf. Returns the rule's outputs by leaf, and
        the fused kernels' writes (see :class:`_Update`)."""
        stepped: dict[int, RuleOutput] = {}
        leaves, grad_leaves, columns = inputs.leaves, inputs.grads, inputs.columns
        decays, refs = inputs.decays, inputs.refs

        def per_leaf(i: int) -> None:
            slots = tuple(column[i] for column in columns)
            row = None if derived is None else derived[i]
            stepped[i] = self.rule(leaves[i], grad_leaves[i], slots, row, h, decays[i], refs[i])

        todo = [i for i, updated in enumerate(inputs.updated) if updated]
        groups, alone = _groups(todo, leaves, grad_leaves, columns, decays, refs, h)
        for i in alone:
            per_leaf(i)
        pending: list[Callable[[], None]] = []
        written: list[tuple[int, Sequence[int]]] = []
        rows = _TableRows(old_table)
        for group in groups:
            decay = decays[group[0]]
            if self.fused is not None and not (decay and proxed):
                run = _fused_run(self.fused, inputs, group, rows, h, decay)
                if run is not None:
                    targets = _fused_targets(group, new_values, in_place)
                    grads_group = [grad_leaves[i] for i in group]
                    found_inf = None if finite is None else (~finite).to(torch.float32)
                    if in_place:
                        written.extend((c, group) for c, column in enumerate(targets) if column)
                        pending.append(functools.partial(run, targets, grads_group, found_inf))
                    else:
                        run(targets, grads_group, found_inf)
                    continue
            donating = in_place and finite is None and not (decay and proxed)
            for indices in _cache_blocks(group, leaves):
                key = _group_key(indices, inputs, h) if self.donates else None
                if donating and key in self.elementwise:
                    targets = _fused_targets(indices, new_values, in_place)
                    written.extend((c, indices) for c, column in enumerate(targets) if column)
                    deferred = functools.partial(
                        _grouped_rule, self.rule, indices, leaves, grad_leaves, columns, derived
                    )
                    pending.append(
                        functools.partial(_donated_run, deferred, refs, h, decay, targets)
                    )
                    continue
                try:
                    results = _grouped_rule(
                        self.rule, indices, leaves, grad_leaves, columns, derived, refs, h, decay
                    )
                except NotElementwiseError:
                    for i in indices:
                        per_leaf(i)
                    continue
                if key is not None:
                    # Params of ever new layouts: start over (a step adds at most a key
                    # per leaf, one per cache block or group).
                    if len(self.elementwise) >= max(256, 4 * len(todo)):
                        self.elementwise.clear()
                    self.elementwise.add(key)
                stepped.update(zip(indices, results, strict=True))
        return stepped, written, pending

    def step(
        self, params: Params, grads: Params, state: State, **overrides: Any
    ) -> tuple[Params, State]:
        if torch.is_grad_enabled():
            _check_no_parameters(self.name, params)
        new = self.update(params, grads, state, overrides, in_place=False)
        new_leaves, *new_columns = new.new_columns
        fields: dict[str, Any] = {
            field: new.spec.unflatten(column) if enabled(getattr(state, field)) else DISABLED
            for field, column in zip(self.slot_fields, new_columns, strict=True)
        }
        if self.table_field is not None:
            fields[self.table_field] = DISABLED if new.new_table is None else new.new_table
        return new.spec.unflatten(new_leaves), self.state_type(**fields, skipped=new.skipped)

    def step_(self, params: Params, grads: Params, state: State, **overrides: Any) -> None:
        with torch.no_grad():
            new = self.update(params, grads, state, overrides, in_place=True)
            _check_writable(self.name, self.slot_fields, new, state.skipped, self.checked)
            # Everything is computed and checked before the first write, so an error
            # leaves no trace.
            _write_update(new, state.skipped)

    def validate(self, params: Params | None = None, **overrides: Any) -> None:
        self.resolved(overrides)
        if params is not None:
            step_on_meta(self.init, self.step, params, overrides)

    def for_flat(self, flat: Any) -> Optimizer:
        from ..flat import mask_for, prox_for

        prox = self.prox
        return build(
            self.name,
            state_type=self.state_type,
            init_slots=self.init_slots,
            rule=self.rule,
            hyperparams=self.defaults,
            intervals=self.intervals,
            mask=mask_for(flat, self.mask, self.name),
            prox=None if prox is None else cast(Prox, prox_for(flat, prox)),
            skip_nonfinite=self.skip_nonfinite,
            table=self.table,
            references=self.references,
            check=self.check,
            fused=self.fused,
            donates=self.donates,
        )


class _TableRows:
    """The leaf table's rows as Python values, read once per step and only when a fused
    kernel asks (a CPU tensor's values cost no device sync); ``None`` off the CPU."""

    def __init__(self, table: Tensor | None) -> None:
        self.table = table
        self.rows: list[Any] | None = None

    def pick(self, indices: Sequence[int]) -> list[Any] | None:
        if self.table is None or self.table.device.type != "cpu":
            return None
        if self.rows is None:
            self.rows = self.table.tolist()
        return [self.rows[i] for i in indices]


def _fused_run(
    fused: FusedStep,
    inputs: _Gathered,
    indices: list[int],
    rows: _TableRows,
    h: Mapping[str, Scalar],
    decay: bool,
) -> Callable[[list[list[Tensor]], list[Tensor], Tensor | None], None] | None:
    """The fused kernel's run for one group, or ``None`` where it does not apply (a
    non-contiguous tensor, or options it does not implement)."""
    if not _contiguous(indices, [inputs.leaves, inputs.grads, *inputs.columns]):
        return None
    return fused([inputs.leaves[i] for i in indices], rows.pick(indices), h, decay)


def _prox_step(
    name: str,
    prox: Prox,
    threshold: Scalar,
    inputs: _Gathered,
    stepped: dict[int, RuleOutput],
) -> None:
    """Replace each decayed leaf's new value in ``stepped`` by its prox."""
    proxed = [i for i in stepped if inputs.decays[i]]
    names = spec_names(inputs.spec)
    if proxed and all(len(stepped[i]) == 2 for i in proxed):
        new_ps = _apply_prox(name, prox, names, proxed, stepped, threshold)
    else:
        # In each rule's metric D (prox_metric="preconditioned"): the threshold
        # lr * rho / D is shaped like its leaf, so each leaf is its own call.
        new_ps = {}
        for i in proxed:
            result = stepped[i]
            leaf_threshold = threshold if len(result) == 2 else threshold / result[2]
            new_ps.update(_apply_prox(name, prox, names, [i], stepped, leaf_threshold))
    for i in proxed:
        stepped[i] = (new_ps[i], stepped[i][1])


def _finish(
    inputs: _Gathered,
    stepped: Mapping[int, RuleOutput],
    new_values: list[list[Any]],
    finite: Tensor | None,
) -> None:
    """Write the rule's outputs into ``new_values`` (params, then one column per slot
    field) in their old dtypes, keeping the old values where ``finite`` is false."""
    new_leaves, *new_columns = new_values
    for i, result in stepped.items():
        new_p, new_slots = result[0], result[1]
        p = inputs.leaves[i]
        slots = tuple(column[i] for column in inputs.columns)
        # Float64 scalars (Adam's bias corrections, a float64 lr tensor) promote a
        # 0-d leaf, and a step never changes a param's (or its state's) dtype.
        new_p = _as_dtype(new_p, p.dtype)
        new_slots = tuple(
            None if new is None or old is None else _as_dtype(new, old.dtype)
            for new, old in zip(new_slots, slots, strict=True)
        )
        if finite is not None:
            new_p = torch.where(finite, new_p, p)
            new_slots = tuple(
                None if new is None or old is None else torch.where(finite, new, old)
                for new, old in zip(new_slots, slots, strict=True)
            )
        new_leaves[i] = new_p
        for column, new in zip(new_columns, new_slots, strict=True):
            column[i] = new


def _write_update(new: _Update, skipped: Tensor) -> None:
    """``step_``'s writes, once everything is checked: the fused kernels, then the new
    values of the params and state (one foreach copy), the table and ``skipped``."""
    for run in new.pending:
        run()
    olds, news = [], []
    for column, new_column in zip(new.columns, new.new_columns, strict=True):
        for old, new_value in zip(column, new_column, strict=True):
            if new_value is not old:
                olds.append(old)
                news.append(new_value)
    _copy(olds, news)
    if new.table is not None and new.new_table is not None:
        new.table.copy_(new.new_table)
    _write(skipped, new.skipped)


def check_optimizer(optimizer: Optimizer, params: Params | None = None, **overrides: Any) -> None:
    """``optimizer.validate(params, **overrides)``, or, for an ``Optimizer`` built without
    ``validate``, one step on meta copies of ``params``: raises as its step would."""
    if optimizer.validate is not None:
        optimizer.validate(params, **overrides)
    elif params is not None:
        step_on_meta(optimizer.init, optimizer.step, params, overrides)


def step_on_meta(
    init: Callable[[Params], State],
    step: Callable[..., Any],
    params: Params,
    overrides: Mapping[str, Any],
) -> None:
    """Run ``step`` once on meta-device copies of ``params`` (zero gradients for the
    floating leaves), so that every check of a step runs with no memory and no device
    work. Tensor hyperparameters are read on the CPU, where they combine with meta
    tensors."""
    leaves, spec = flatten(params)
    meta = [
        torch.empty_like(leaf, device="meta") if isinstance(leaf, Tensor) else leaf
        for leaf in leaves
    ]
    grads = [torch.zeros_like(leaf) if is_float(leaf) else None for leaf in meta]
    tree = spec.unflatten(meta)
    with torch.no_grad():
        step(tree, spec.unflatten(grads), init(tree), **_on_cpu(overrides))


def _on_cpu(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _on_cpu(v) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_on_cpu(v) for v in value)
    return value.detach().cpu() if isinstance(value, Tensor) else value


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
    merged = {key: as_scalar(value) for key, value in merged.items()}
    check_scalars(name, merged, intervals)
    return merged


def _numbers_of(value: Any) -> Any:
    """A hyperparameter (or a pair such as ``betas``) with NumPy scalars as Python numbers."""
    if isinstance(value, (tuple, list)):
        return type(value)(as_scalar(v) for v in value)
    return as_scalar(value)


def _apply_prox(
    name: str,
    prox: Prox,
    names: Sequence[str],
    proxed: Sequence[int],
    stepped: Mapping[int, tuple[Any, ...]],
    threshold: Scalar,
) -> dict[int, Tensor]:
    """The prox of the selected leaves' new values, called once on ``{leaf name: leaf}``."""
    tree = {names[i]: stepped[i][0] for i in proxed}
    hint = (
        f"{name}: prox must map a dict {{leaf name: tensor}} to a dict with the same keys "
        "(as fr.prox.l1 does); lift a prox written for one tensor with "
        "lambda tree, t: {k: my_prox(v, t) for k, v in tree.items()}"
    )
    try:
        out = prox(tree, threshold)
    except (AttributeError, TypeError) as error:
        if "dict" not in str(error):
            raise
        raise TypeError(f"{hint} ({error})") from error
    if not isinstance(out, Mapping) or set(out) != set(tree):
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"{hint}; given {sorted(tree)[:4]} it returned {got}")
    return {i: out[names[i]] for i in proxed}


def _write(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)``; a 0-d target is written through a 1-element view, since
    torch.compile (Inductor, torch 2.13 on CPU) drops an in-place write into a 0-d
    float64 input (a learned temperature kept its value)."""
    if target.ndim == 0:
        target.view(1).copy_(value.reshape(1))
    else:
        target.copy_(value)


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _wrapped(x: Tensor) -> bool:
    """Whether ``x`` is a functorch wrapper (under ``vmap`` or ``torch.func.grad``)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


CACHE_BLOCK = 2 * 2**20
"""Bytes of params per run of a rule over a CPU group larger than two of these: the rule
makes several passes over each tensor (AdamW about eight), and a run over a block whose
params, grads and state fit in the CPU's cache makes them there rather than in main
memory, as torch.optim's for-loop does leaf by leaf, and its temporaries are small enough
to be reused rather than faulted in afresh. AdamW over 8M parameters in 160 tensors took
0.6 to 0.7x the time of one run over the whole group where that run page-faulted its
temporaries, and about the same where it did not (2-core Zen 3, 32 MiB L3;
``benchmarks/RESULTS.md``); the same bits, since each leaf sees the same ops."""


def _cache_blocks(group: list[int], leaves: Sequence[Tensor]) -> list[list[int]]:
    """``group`` in consecutive runs of about :data:`CACHE_BLOCK` bytes of params (a leaf
    larger than that alone), or whole: off the CPU (one launch per op is what counts
    there) and when it holds at most two blocks."""
    if leaves[group[0]].device.type != "cpu":
        return [group]
    sizes = list(map(_NBYTES, [leaves[i] for i in group]))
    if sum(sizes) <= 2 * CACHE_BLOCK:
        return [group]
    blocks: list[list[int]] = [[]]
    filled = 0
    for i, size in zip(group, sizes, strict=True):
        if blocks[-1] and filled + size > CACHE_BLOCK:
            blocks.append([])
            filled = 0
        blocks[-1].append(i)
        filled += size
    return blocks


def _groups(
    todo: Sequence[int],
    leaves: Sequence[Any],
    grad_leaves: Sequence[Any],
    columns: Sequence[Sequence[Tensor | None]],
    decays: Sequence[bool],
    refs: Sequence[Tensor | None],
    h: Mapping[str, Scalar],
) -> tuple[list[list[int]], list[int]]:
    """The leaves to step together (one dtype, device and set of options per group),
    and those to step alone: all of them under ``torch.compile`` (the traced per-leaf
    code is what Inductor fuses) and any leaf that is a DTensor, a functorch wrapper
    (``vmap``, ``grad``) or recorded by autograd."""
    if torch.compiler.is_compiling():
        return [], list(todo)
    grad_mode = torch.is_grad_enabled()
    if not _plain([value for value in h.values() if isinstance(value, Tensor)], grad_mode):
        return [], list(todo)
    ps = [leaves[i] for i in todo]
    slots = [[column[i] for i in todo] for column in columns]
    tensors = [*ps, *(grad_leaves[i] for i in todo), *(refs[i] for i in todo)]
    tensors.extend(s for column in slots for s in column)
    together: list[int] = []
    alone: list[int] = []
    if _plain([t for t in tensors if t is not None], grad_mode):
        together = list(range(len(todo)))
    else:  # find the special leaves
        for j, i in enumerate(todo):
            mine = [leaves[i], grad_leaves[i], refs[i], *(column[j] for column in slots)]
            (together if _plain([t for t in mine if t is not None], grad_mode) else alone).append(j)
    if len(together) < len(todo):
        ps, slots = [ps[j] for j in together], [[c[j] for j in together] for c in slots]
    indices = [todo[j] for j in together]
    keys = zip(
        map(_DEVICE, ps),
        map(_DTYPE, ps),
        [decays[i] for i in indices],
        [refs[i] is None for i in indices],
        *[[s is None for s in column] for column in slots],
        strict=True,
    )
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in zip(indices, keys, strict=True):
        groups.setdefault(key, []).append(i)
    return list(groups.values()), [todo[j] for j in alone]


def _plain(tensors: Sequence[Tensor], grad_mode: bool) -> bool:
    """Whether all ``tensors`` are plain (no DTensor, no functorch wrapper, not recorded
    by autograd), read at C speed: the grouped path runs on plain tensors only."""
    if _TENSOR_TYPES.issuperset(map(type, tensors)):
        if any(map(torch._C._functorch.is_functorch_wrapped_tensor, tensors)):
            return False
    elif any(_wrapped(t) or is_dtensor(t) for t in tensors):
        return False
    return not (grad_mode and any(map(_REQUIRES_GRAD, tensors)))


def _grouped_rule(
    rule: LeafRule,
    indices: list[int],
    leaves: Sequence[Any],
    grad_leaves: Sequence[Any],
    columns: Sequence[Sequence[Tensor | None]],
    derived: Tensor | None,
    refs: Sequence[Tensor | None],
    h: Mapping[str, Scalar],
    decay: bool,
    donate: bool = False,
) -> list[Any]:
    """``rule`` over the group's leaves at once, as TensorLists: per leaf,
    what ``rule`` gives on that leaf alone. Raises :class:`NotElementwiseError` when the
    rule needs a leaf's own shape (then each leaf steps alone). With ``donate``, the
    params and slots are donated (see :func:`build`): the rule may write into them, and
    the result is per column (new params, then each slot field; ``None`` for a disabled
    one), not per leaf."""
    remeasure_temporaries()
    first = indices[0]
    params = [leaves[i] for i in indices]
    layout = layout_of(params)
    shapes = list(map(_SHAPE, params)) if layout is not None else []

    def group(
        column: Sequence[Any], donated: bool = False, like: bool = False
    ) -> TensorList | None:
        if column[first] is None:
            return None
        tensors = [column[i] for i in indices]
        # The leaf layout lets an op reuse a temporary in place: only for tensors of
        # the params' shapes and dtype (a factored state slot has other shapes; the
        # params and their grads, ``like``, are known to fit: _gather checked them).
        same = layout is not None and (
            like
            or (
                list(map(_SHAPE, tensors)) == shapes
                and set(map(_DTYPE, tensors)) == {params[0].dtype}
            )
        )
        result = TensorList(tensors, layout if same else None)
        result.donated = donated
        return result

    row = None
    if derived is not None:
        start, stop = first, indices[-1] + 1
        if stop - start == len(indices):  # contiguous: a view, no gather
            rows = derived[start:stop]
        else:
            rows = derived[torch.tensor(indices, device=derived.device)]
        # Kept in the table's dtype, as each leaf's row is: an op with the leaves casts
        # a field once for all of them (Rows), arithmetic among fields stays in float64.
        row = Rows(rows)
    output = rule(
        cast(Tensor, group(leaves, donate, like=True)),
        cast(Tensor, group(grad_leaves, like=True)),
        tuple(cast(Tensor | None, group(column, donate)) for column in columns),
        cast(Tensor | None, row),
        h,
        decay,
        cast(Tensor | None, group(refs)),
    )
    new_p, new_slots = output[0], output[1]
    outputs = [new_p, *new_slots]
    if not all(x is None or isinstance(x, TensorList) for x in outputs) or not isinstance(
        new_p, TensorList
    ):
        raise NotElementwiseError("the rule gave a tensor for a group of leaves")
    lists = [None if x is None else cast(TensorList, x).tensors for x in outputs]
    if donate:  # _donated_run reads the columns
        return lists
    results: list[Any] = [
        (p, tuple(None if column is None else column[j] for column in lists[1:]))
        for j, p in enumerate(cast(list[Tensor], lists[0]))
    ]
    if len(output) == 3:  # the rule's metric D (prox_metric="preconditioned")
        metric: Any = output[2]
        per_leaf = metric.tensors if isinstance(metric, TensorList) else [metric] * len(indices)
        results = [(*result, m) for result, m in zip(results, per_leaf, strict=True)]
    return results


def _group_key(indices: list[int], inputs: _Gathered, h: Mapping[str, Scalar]) -> tuple[Any, ...]:
    """What decides the path a donating rule takes over a group: its leaves (position,
    shape, dtype, device), which slots and reference they have, whether they decay, and
    the kinds of the hyperparameters (tensor, number, zero). The group shares its dtype,
    device and options (see :func:`_groups`), so its first leaf speaks for the rest."""
    first = indices[0]
    leaf = inputs.leaves[first]
    present = tuple(column[first] is None for column in (*inputs.columns, inputs.refs))
    shapes = tuple(map(_SHAPE, (inputs.leaves[i] for i in indices)))
    kinds = tuple((key, type(value), is_zero(value)) for key, value in h.items())
    return (tuple(indices), shapes, leaf.dtype, leaf.device, inputs.decays[first], present, kinds)


def _donated_run(
    run: Callable[..., list[Any]],
    refs: Sequence[Tensor | None],
    h: Mapping[str, Scalar],
    decay: bool,
    targets: list[list[Tensor]],
) -> None:
    """``step_``'s deferred rule over a group whose params and state it may write
    (see :func:`build`), then a copy of each new value it did not write in place."""
    olds: list[Tensor] = []
    news: list[Tensor] = []
    for column, new_column in zip(targets, run(refs, h, decay, True), strict=True):
        if column and new_column is not None:
            pairs = [
                (old, new) for old, new in zip(column, new_column, strict=True) if new is not old
            ]
            olds.extend(old for old, _ in pairs)
            news.extend(new for _, new in pairs)
    _copy(olds, news)


def _contiguous(indices: Sequence[int], columns: Sequence[Sequence[Any]]) -> bool:
    """Whether every tensor of the group is contiguous, as the fused kernels need (they
    walk memory in order, so a transposed leaf next to a contiguous grad would mix up
    elements)."""
    tensors = [column[i] for column in columns for i in indices]
    return all(map(Tensor.is_contiguous, [t for t in tensors if t is not None]))


def _fused_targets(
    indices: Sequence[int], new_values: list[list[Any]], in_place: bool
) -> list[list[Tensor]]:
    """Per column (params, then each state field), the tensors a fused kernel writes:
    the group's own tensors in place, else fresh copies that become the new values."""
    targets: list[list[Tensor]] = []
    for column in new_values:
        if column[indices[0]] is None:
            targets.append([])
        elif in_place:
            targets.append([column[i] for i in indices])
        else:
            copies = [column[i].clone() for i in indices]
            for i, copy in zip(indices, copies, strict=True):
                column[i] = copy
            targets.append(copies)
    return targets


def _copy(targets: list[Tensor], values: list[Tensor]) -> None:
    """``target.copy_(value)`` for each pair, with one foreach call outside compile."""
    if not targets:
        return
    if torch.compiler.is_compiling() or any(_wrapped(t) or is_dtensor(t) for t in targets):
        for target, value in zip(targets, values, strict=True):
            _write(target, value)
    else:
        torch._foreach_copy_(targets, values)


def _check_unique_names(name: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for leaf_name in names:
        if leaf_name in seen:
            raise ValueError(
                f"{name}.init: params have two leaves named {leaf_name!r} (e.g. a key "
                f"{leaf_name!r} next to nested keys that join to it), so their state "
                "could not be saved apart; rename one"
            )
        seen.add(leaf_name)


def _check_not_complex(name: str, names: Sequence[str], leaves: Sequence[Any]) -> None:
    for leaf_name, leaf in zip(names, leaves, strict=True):
        if isinstance(leaf, Tensor) and leaf.is_complex():
            raise TypeError(
                f"{name}: leaf {leaf_name!r} is complex ({leaf.dtype}); the update rules step "
                "real floating-point leaves: pass torch.view_as_real(leaf) (and its grad "
                "likewise), which is how torch.optim steps complex params"
            )


def _check_grads(name: str, spec: Any, leaves: Sequence[Any], grad_leaves: Sequence[Any]) -> None:
    """Each gradient has its param's dtype and device, as autograd's do."""
    if _alike(leaves, grad_leaves):
        return
    for i, (p, g) in enumerate(zip(leaves, grad_leaves, strict=True)):
        if g is None or not isinstance(p, Tensor):
            continue
        if not isinstance(g, Tensor):
            raise TypeError(
                f"{name}: the grad of leaf {spec_names(spec)[i]!r} is a {type(g).__name__}, "
                "not a tensor; pass a tensor like its param (or None for no gradient)"
            )
        if p.is_complex() or g.is_complex():
            _check_not_complex(name, spec_names(spec)[i : i + 1], [p if p.is_complex() else g])
        if not is_float(p):
            continue
        if g.dtype != p.dtype:
            raise TypeError(
                f"{name}: the grad of leaf {spec_names(spec)[i]!r} is {g.dtype}, its param "
                f"is {p.dtype}; cast the grad (g.to(p.dtype)): a step keeps params' dtypes"
            )
        if g.device != p.device:
            raise ValueError(
                f"{name}: the grad of leaf {spec_names(spec)[i]!r} is on {g.device}, its "
                f"param on {p.device}; move the grad to the param's device"
            )


def _check_like_params(field: str, spec: Any, leaves: Sequence[Any], column: Sequence[Any]) -> None:
    """A state field's tensors have their params' dtypes and devices."""
    if _alike(leaves, column):
        return
    for i, (p, s) in enumerate(zip(leaves, column, strict=True)):
        if not (is_float(p) and isinstance(s, Tensor)):
            continue
        if s.dtype != p.dtype or s.device != p.device:
            raise TypeError(
                f"{field} {spec_names(spec)[i]!r} is {s.dtype} on {s.device}, its param "
                f"{p.dtype} on {p.device}; build the state with init(params) or "
                "load_state_dict(optimizer, params, saved)"
            )


def _alike(leaves: Sequence[Any], others: Sequence[Any]) -> bool:
    """Whether the common case holds at C speed: every leaf and its partner are plain
    real floating tensors of one dtype and device (``None`` partners skipped). False
    sends the caller to its leaf-by-leaf checks, which name what differs (and which
    torch.compile traces: it has no attrgetter)."""
    if torch.compiler.is_compiling():
        return False
    pairs = [(p, x) for p, x in zip(leaves, others, strict=True) if x is not None]
    if not pairs:
        return True
    firsts, seconds = zip(*pairs, strict=True)
    if not _TENSOR_TYPES.issuperset(map(type, firsts + seconds)):
        return False
    dtypes = list(map(_DTYPE, firsts))
    return (
        dtypes == list(map(_DTYPE, seconds))
        and list(map(_DEVICE, firsts)) == list(map(_DEVICE, seconds))
        and all(map(_REAL_FLOATS.__contains__, dtypes))
    )


def _check_no_parameters(name: str, params: Params) -> None:
    """``step`` on ``nn.Parameter`` leaves would record the update in autograd, and each
    step's result would hold the graph of all the steps before it."""
    leaves, spec = flatten(params)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.nn.Parameter) and leaf.requires_grad:
            raise TypeError(
                f"{name}.step: leaf {spec_names(spec)[i]!r} is an nn.Parameter that requires "
                "grad, so step() would chain autograd graphs across steps (memory grows "
                "every step); pass {k: v.detach() for k, v in model.named_parameters()}, "
                "call it under torch.no_grad(), or update the Parameters with step_()"
            )


class _Checked:
    """The target layouts that :func:`_check_writable` passed lately (a few, for the
    param groups of one optimizer that take turns).

    Whether targets can be written and whether two share memory follow from each
    target's address, shape, strides, dtype, device and inference flag, and from
    whether inference mode is on, which make the key: a step over the same tensors
    (or over others laid out in the same memory) is checked once.
    """

    SIZE = 8

    def __init__(self) -> None:
        self.keys: list[tuple[Any, ...]] = []

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return key in self.keys

    def add(self, key: tuple[Any, ...]) -> None:
        self.keys = [key, *self.keys[: self.SIZE - 1]]


def _layout_key(targets: Sequence[tuple[int, int, Tensor]]) -> tuple[Any, ...] | None:
    """What the checks of :func:`_check_writable` depend on, or ``None`` for DTensors."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and any(isinstance(t, dtensor.DTensor) for _, _, t in targets):
        return None
    tensors = [t for _, _, t in targets]
    return (
        torch.is_inference_mode_enabled(),
        tuple((c, i) for c, i, _ in targets),
        *(
            tuple(map(read, tensors))
            for read in (Tensor.data_ptr, _SHAPE, Tensor.stride, _DTYPE, _DEVICE)
        ),
        tuple(map(Tensor.is_inference, tensors)),
    )


def _check_writable(
    name: str,
    slot_fields: Sequence[str],
    new: _Update,
    skipped: Tensor,
    checked: _Checked | None = None,
) -> None:
    """Every tensor that ``step_`` is about to write can take its new value, and no two
    share memory (tied weights, a view and its base): otherwise one update would
    overwrite the other. Memory is not inspected under ``torch.compile`` or ``vmap``.
    Layouts found good are remembered in ``checked`` and not inspected again."""
    if torch.compiler.is_compiling():
        return
    # (column, leaf index) of each target, the table and skipped as column -1 and -2;
    # labels are only spelled out for an error.
    targets: list[tuple[int, int, Tensor]] = []
    written: dict[int, set[int]] = {}
    for column_index, indices in new.written:
        written.setdefault(column_index, set()).update(indices)
    for column_index, (column, new_column) in enumerate(
        zip(new.columns, new.new_columns, strict=True)
    ):
        mine = written.get(column_index, ())
        targets.extend(
            (column_index, i, old)
            for i, (old, new_value) in enumerate(zip(column, new_column, strict=True))
            if new_value is not old or i in mine
        )
    if new.table is not None and new.new_table is not None:
        targets.append((-1, 0, new.table))
    targets.append((-2, 0, skipped))
    if torch._C._functorch.is_functorch_wrapped_tensor(targets[0][2]):  # vmap or grad
        return
    key = None if checked is None else _layout_key(targets)
    if key is not None and checked is not None and key in checked:
        return
    _inspect_targets(name, slot_fields, new, targets)
    if key is not None and checked is not None:
        checked.add(key)


def _inspect_targets(
    name: str, slot_fields: Sequence[str], new: _Update, targets: list[tuple[int, int, Tensor]]
) -> None:
    """The checks of :func:`_check_writable` (:func:`.._memory.check_writable`), on its
    targets."""

    def label(target: int) -> str:
        column_index, i, _ = targets[target]
        if column_index == -1:
            return "the state's leaf table"
        if column_index == -2:
            return "state.skipped"
        column_name = "params" if column_index == 0 else f"state.{slot_fields[column_index - 1]}"
        return f"{column_name} {spec_names(new.spec)[i]!r}"

    check_writable(f"{name}.step_", [tensor for _, _, tensor in targets], label, "step()")


def _all_finite(grads: list[Tensor]) -> Tensor:
    # A DTensor's check covers its local shard only; made global (and plain, to mix
    # with the state's plain scalars), it makes every rank skip the same steps.
    return torch.stack([full_tensor(torch.isfinite(g).all()) for g in grads]).all()


def __getattr__(name: str) -> Any:
    """``state_dict`` and ``load_state_dict``, re-exported from :mod:`.checkpoint`
    (imported on first use: that module imports this one)."""
    if name in ("state_dict", "load_state_dict"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
