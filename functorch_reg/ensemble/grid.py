"""What a sweep was asked, resolved and checked once: the frozen, typed :class:`SweepPlan`.

:func:`plan` takes :func:`~functorch_reg.sweep`'s arguments, checks every one of them
before anything trains (strengths, penalties, data, folds, initial members, the
optimizer's hyperparameters through ``Optimizer.validate``, and the model and loss on two
samples of a copy, by :func:`probe`) and resolves them: the grid of strengths, the
members' initial parameters and buffers, the flat layout, how members see their folds.
:mod:`functorch_reg.ensemble.loop` runs the plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .. import sweep_data
from .._checks import check_positive_int
from ..flat import FlatParams, pack
from ..modules import Logits, logits_of
from ..optim import Optimizer
from ..optim.base import check_optimizer
from ..select import Where
from ..sweep_data import as_strengths
from ..tree import Params, stack, unstack
from .members import (
    ModelParts,
    Randomness,
    check_randomness,
    check_strength_target,
    first_member_dtype,
    forward,
    init_ensemble,
    model_parts,
    repeat_members,
    seeded,
    stacked,
)

if TYPE_CHECKING:
    from .search import SweepResult

__all__ = ["Folding", "Probe", "Select", "Strengths", "SweepPlan", "plan", "probe"]

Strengths = Tensor | Sequence[float] | Mapping[str, Tensor | Sequence[float]]
Select = Literal["val_loss", "val_accuracy"] | Callable[["SweepResult"], int]


@dataclass(frozen=True)
class Folding:
    """How the members of a cross-validated sweep see their folds.

    Attributes:
        folds: members per grid point.
        samples: ``"weighted"`` (the shared batch, held-out rows weighted 0) or
            ``"gathered"`` (each member its own training fold's rows, for BatchNorm).
        per_member: the weights or rows per member, ``(K * folds, n)``.
        held_out: each member's held-out weights, ``(K * folds, n)``.
    """

    folds: int
    samples: Literal["weighted", "gathered"]
    per_member: Tensor
    held_out: Tensor


@dataclass(frozen=True)
class SweepPlan:
    """The resolved inputs of one :func:`~functorch_reg.sweep`: what it trains, and what
    :func:`~functorch_reg.ensemble.refit` trains again from.

    Made by :func:`plan` after its checks, stored as :attr:`SweepResult.plan`. It holds
    the optimizer (a NamedTuple of closures) and the data, so it does not pickle: a
    pickled :class:`SweepResult` leaves it behind.

    Attributes:
        parts: the model, split into trainable, frozen and buffer tensors.
        loss_fn: the sweep's ``loss_fn``.
        optimizer: the sweep's functional optimizer.
        penalties: ``{axis: penalty}`` scaled by the strength axes (``{}`` if none).
        layout: the flat layout the members train in, or ``None`` (per leaf).
        randomness: vmap's randomness for dropout.
        train: the checked training data.
        val: the checked validation data, or ``None`` (cross-validation).
        batch_size: the minibatch size for tensor data, or ``None``.
        seed: the seed of the batch order and of the random draws.
        device: where the members train.
        grid: each axis's strength per grid point, in the params' dtype on ``device``.
        initial: every member's initial parameters, stacked (``K * folds`` members,
            fold-major per grid point).
        initial_buffers: the members' initial buffers, stacked like ``initial``.
        folds: members per grid point (1 without cross-validation).
        steps: the sweep's optimizer steps.
        compile: whether the sweep compiled its step.
        folding: how members see their folds, or ``None`` (a ``val`` set).
        sample_losses: the per-sample loss that fold weights and evaluation use.
        logits: where accuracy finds the logits, or ``False`` (no accuracy).
        select: the rule that chooses a member.
    """

    parts: ModelParts
    loss_fn: Callable[[Any, Tensor], Tensor]
    optimizer: Optimizer
    penalties: Mapping[str, Callable[[Params], Tensor]]
    layout: FlatParams | None
    randomness: Randomness
    train: sweep_data.Data
    val: sweep_data.Data | None
    batch_size: int | None
    seed: int
    device: torch.device
    grid: Mapping[str, Tensor]
    initial: Params
    initial_buffers: Params
    folds: int
    steps: int
    compile: bool
    folding: Folding | None
    sample_losses: Callable[[Any, Tensor], Tensor]
    logits: Logits | Literal[False]
    select: Select

    @property
    def count(self) -> int:
        """The number of grid points ``K`` (members per fold)."""
        return len(next(iter(self.grid.values())))


def plan(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    strengths: Strengths,
    *,
    train: Any,
    val: Any = None,
    penalty: Callable[[Params], Tensor] | Mapping[str, Callable[[Params], Tensor]] | None = None,
    hyperparameter: str | None = None,
    steps: int = 200,
    batch_size: int | None = None,
    folds: int | None = None,
    cv: Any = None,
    select: Select = "val_loss",
    init: Literal["shared", "independent"] | Params = "shared",
    seed: int = 0,
    grid_positions: Tensor | Sequence[int] | None = None,
    flat: bool | Mapping[str, Where] = False,
    randomness: Randomness = "different",
    logits: Logits = None,
    compile: bool = True,
) -> SweepPlan:
    """:func:`~functorch_reg.sweep`'s arguments (all but ``progress``, with its defaults),
    checked and resolved; nothing is trained and the model is read only (its first batch
    runs once, in :func:`probe`, on a copy of the first member).

    Returns:
        A :class:`SweepPlan`.

    Raises:
        ValueError, TypeError: as :func:`~functorch_reg.sweep`, before anything trains.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X, y = torch.randn(16, 2), torch.randn(16)
        >>> def mse(out, target):
        ...     return torch.nn.functional.mse_loss(out.squeeze(-1), target)
        >>> resolved = fr.ensemble.plan(torch.nn.Linear(2, 1), mse, fr.sgd(lr=0.1),
        ...     [0.0, 1.0], train=(X, y), folds=4, penalty=fr.penalties.l1)
        >>> resolved.count, resolved.folds, resolved.initial["weight"].shape
        (2, 4, torch.Size([8, 1, 2]))
    """
    check_randomness(randomness, "sweep")
    penalties = _penalties(penalty, strengths, optimizer)
    grid = _grid(strengths, optimizer, penalties, hyperparameter)
    count = len(next(iter(grid.values())))
    _check_steps_and_select(steps, select)
    train_data, val_data = _sweep_data(train, val, folds, cv, batch_size)
    parts = model_parts(model, "sweep")
    device = next(iter(parts.params.values())).device
    members = _initial_members(parts, init, count, seed, _positions(grid_positions, count))
    first_member = unstack(members)[0]
    with seeded(seed, device):
        probed = probe(parts, loss_fn, first_member, val_data or train_data, device, logits)
    _check_accuracy(select, probed)
    layout = None
    if flat is not False:
        layout = pack(first_member, None if flat is True else flat)
        if optimizer.for_flat is not None:
            # A mask or prox written for leaves, translated to the buffers (or refused).
            optimizer = optimizer.for_flat(layout)
    _check_hyperparameters(
        optimizer, first_member if layout is None else layout.buffers, grid, penalties
    )
    # In the params' dtype, as torch.optim's Python floats act: a float32 0.05 is not a
    # float64 model's 0.05.
    dtype = first_member_dtype(first_member)
    grid = {axis: values.to(device, dtype) for axis, values in grid.items()}
    folding = None
    if val_data is None:
        folding = _folding(parts, probed, train_data, folds, cv, batch_size, count, dtype, device)
        members = repeat_members(members, folding.folds)
    n_folds = 1 if folding is None else folding.folds
    return SweepPlan(
        parts=parts,
        loss_fn=loss_fn,
        optimizer=optimizer,
        penalties=penalties,
        layout=layout,
        randomness=randomness,
        train=train_data,
        val=val_data,
        batch_size=batch_size,
        seed=seed,
        device=device,
        grid=grid,
        initial=members,
        initial_buffers=stacked(parts.buffers, count * n_folds),
        folds=n_folds,
        steps=steps,
        compile=compile,
        folding=folding,
        sample_losses=probed.sample_losses,
        logits=logits if probed.classification else False,
        select=select,
    )


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` learned: whether to report accuracy, whether the forward
    updates buffers, and the model's per-sample loss (for fold weights)."""

    classification: bool
    updates_buffers: bool
    sample_losses: Callable[[Any, Tensor], Tensor]


def probe(
    parts: ModelParts,
    loss_fn: Callable[[Any, Tensor], Tensor],
    member: Params,
    data: sweep_data.Data,
    device: torch.device,
    logits: Logits,
) -> Probe:
    """Run two samples through the model (on copies of its buffers: the user's module
    is left as it was) and the loss.

    Raises:
        ValueError: ``loss_fn`` does not return a 0-d tensor, or ``logits`` names
            nothing in the model's output.
    """
    x, y = data.first_batch(device)  # starts no pass: a stream loses nothing
    with torch.no_grad():
        outputs, after = forward(parts, member, parts.buffers, x[:2])
        loss = loss_fn(outputs, y[:2])
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(f"sweep: loss_fn must return a 0-d tensor (a mean), got {loss!r}")
    try:
        found = logits_of(outputs, logits)
    except (KeyError, AttributeError, IndexError, TypeError) as error:
        raise ValueError(
            f"sweep: logits={logits!r} finds nothing in the model's output (a "
            f"{type(outputs).__name__}): {error!r}; name the attribute, key or index of "
            "the logits, or pass a callable output -> logits"
        ) from error
    classification = (
        isinstance(found, Tensor) and not y.is_floating_point() and found.ndim == 2 and y.ndim == 1
    )
    updates = any(not torch.equal(after[name], b) for name, b in parts.buffers.items())
    return Probe(classification, updates, sweep_data.per_sample(loss_fn, outputs, y[:2]))


def _check_steps_and_select(steps: Any, select: Any) -> None:
    check_positive_int("sweep", "steps", steps)
    if select not in ("val_loss", "val_accuracy") and not callable(select):
        raise ValueError(
            f"sweep: select must be 'val_loss', 'val_accuracy' or a callable, got {select!r}"
        )


def _check_accuracy(select: Select, probed: Probe) -> None:
    if select == "val_accuracy" and not probed.classification:
        raise ValueError(
            "sweep: select='val_accuracy' needs a classification problem (integer targets "
            "and logits of shape (batch, classes); say where they are with logits=); use "
            "'val_loss' or a callable"
        )


def _sweep_data(
    train: Any, val: Any, folds: int | None, cv: Any, batch_size: Any
) -> tuple[sweep_data.Data, sweep_data.Data | None]:
    """``train`` and ``val`` checked, and the choice between ``val`` and folds."""
    train_data = sweep_data.as_data(train, "train")
    cross_validate = folds is not None or cv is not None
    if folds is not None and cv is not None:
        raise ValueError("sweep: give folds= or cv=, not both")
    if cross_validate and val is not None:
        raise ValueError("sweep: folds=/cv= cross-validate within train; pass val=None")
    if not cross_validate and val is None:
        raise ValueError("sweep: give val= data, or folds=k to cross-validate on train")
    if cross_validate and train_data.tensors is None:
        raise ValueError("sweep: folds=/cv= need train as a pair of tensors (folds are positions)")
    val_data = None if val is None else sweep_data.as_data(val, "val", check_all=True)
    _check_batch_size(batch_size, train_data)
    return train_data, val_data


def _folding(
    parts: ModelParts,
    probed: Probe,
    train_data: sweep_data.Data,
    folds: int | None,
    cv: Any,
    batch_size: int | None,
    count: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Folding:
    """How each of the ``count * folds`` members sees its training fold."""
    assert train_data.tensors is not None
    train_mask, held_mask = sweep_data.fold_masks(len(train_data.tensors[0]), folds, cv)
    n_folds = len(train_mask)
    held_out = held_mask.to(device, dtype).repeat(count, 1)
    mixing = parts.batch_norms_in_training()
    samples: Literal["weighted", "gathered"]
    if mixing or probed.updates_buffers:
        # Batch statistics would mix a held-out fold into its member: each member
        # trains on the rows of its own training fold instead.
        samples = "gathered"
        per_member = _fold_rows(train_mask, mixing, batch_size).repeat(count, 1)
    else:
        samples = "weighted"
        per_member = train_mask.to(device, dtype).repeat(count, 1)
    return Folding(n_folds, samples, per_member, held_out)


def _fold_rows(train_mask: Tensor, mixing: Sequence[str], batch_size: int | None) -> Tensor:
    """Each fold's training rows, ``(folds, m)``: folds must train on equally many."""
    sizes = train_mask.sum(1)
    why = f"{list(mixing)} in train mode" if mixing else "the model's forward updates buffers and"
    if (sizes != sizes[0]).any():
        raise ValueError(
            f"sweep: {why} mix the samples of a batch, so with folds each member trains on "
            f"its own training fold, and those must be of equal size; got {sizes.tolist()}. "
            "Make len(train) a multiple of folds, give cv= equal-size splits, or put those "
            "modules in eval mode"
        )
    if batch_size is not None and batch_size > int(sizes[0]):
        raise ValueError(
            f"sweep: batch_size={batch_size} is more than the {int(sizes[0])} samples of a "
            "training fold"
        )
    return torch.stack([mask.nonzero().squeeze(1) for mask in train_mask])


def _penalties(
    penalty: Callable[[Params], Tensor] | Mapping[str, Callable[[Params], Tensor]] | None,
    strengths: Strengths,
    optimizer: Optimizer,
) -> dict[str, Callable[[Params], Tensor]]:
    """The penalties by axis name: ``{"penalty": penalty}``, or the named group penalties."""
    if penalty is None:
        return {}
    if not isinstance(penalty, Mapping):
        return {"penalty": penalty}
    if not isinstance(strengths, Mapping):
        raise ValueError(
            "sweep: a dict of penalties needs a dict of strengths with one axis per penalty"
        )
    clashes = sorted(set(penalty) & set(optimizer.hyperparams))
    if clashes or not penalty:
        raise ValueError(
            f"sweep: penalty names must be non-empty and differ from the optimizer's "
            f"hyperparameters, got {sorted(penalty)}"
        )
    for name, function in penalty.items():
        if not callable(function):
            raise TypeError(f"sweep: penalty[{name!r}] is not callable")
    return dict(penalty)


def _grid(
    strengths: Strengths,
    optimizer: Optimizer,
    penalties: Mapping[str, Callable[[Params], Tensor]],
    hyperparameter: str | None,
) -> dict[str, Tensor]:
    """Each axis's strength per member (the product of the axes, first axis slowest)."""
    if not isinstance(strengths, Mapping):
        check_strength_target(optimizer, penalties.get("penalty"), hyperparameter)
        axis = "penalty" if hyperparameter is None else hyperparameter
        return {axis: as_strengths(strengths)}
    if hyperparameter is not None:
        raise ValueError(
            "sweep: with a dict of strengths, its keys name the hyperparameters; "
            "drop hyperparameter="
        )
    if not strengths:
        raise ValueError("sweep: strengths is an empty dict; give at least one axis")
    scalars = sorted(set(optimizer.hyperparams) - {"betas"})
    named = sorted(penalties) if penalties else ["penalty"]
    for axis in strengths:
        if axis not in named and axis not in scalars:
            raise ValueError(
                f"sweep: grid axis {axis!r} names no scalar hyperparameter of the optimizer "
                f"and no penalty; choose from {named + scalars}"
            )
    missing = sorted(set(penalties) - set(strengths))
    if missing or ("penalty" in strengths and not penalties):
        raise ValueError(
            "sweep: a penalty axis and penalty= go together: give both or neither "
            f"(penalties without an axis: {missing})"
        )
    axes = {
        axis: as_strengths(values, f"strengths[{axis!r}]") for axis, values in strengths.items()
    }
    # One dtype for the mesh (a list is float64, a tensor its own; plan casts the grid to
    # the params' dtype): every value promoted exactly.
    common = functools.reduce(torch.promote_types, (values.dtype for values in axes.values()))
    mesh = torch.meshgrid(*(values.to(common) for values in axes.values()), indexing="ij")
    return {axis: values.reshape(-1) for axis, values in zip(axes, mesh, strict=True)}


def _check_hyperparameters(
    optimizer: Optimizer, member: Params, grid: dict[str, Tensor], penalties: Mapping[str, Any]
) -> None:
    """Let the optimizer validate every swept value (``Optimizer.validate``, on meta
    copies: inside vmap it cannot read them)."""
    for axis, values in grid.items():
        if axis not in penalties:
            for value in values.unique():  # type: ignore[no-untyped-call]  # untyped in torch
                check_optimizer(optimizer, member, **{axis: value})


def _check_batch_size(batch_size: Any, data: sweep_data.Data) -> None:
    if batch_size is None:
        return
    if data.tensors is None:
        raise ValueError(
            "sweep: batch_size applies to tensor data; a DataLoader or list of batches "
            "is batched already (pass batch_size=None)"
        )
    size = len(data.tensors[0])
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 0 < batch_size <= size
    ):
        raise ValueError(f"sweep: batch_size must be an int in [1, {size}], got {batch_size!r}")


def _positions(grid_positions: Tensor | Sequence[int] | None, count: int) -> Tensor:
    if grid_positions is None:
        return torch.arange(count)
    positions = torch.as_tensor(grid_positions).cpu()
    if positions.is_floating_point() or positions.shape != (count,) or (positions < 0).any():
        raise ValueError(
            f"sweep: grid_positions must be {count} non-negative ints, one per member, "
            f"got {positions.tolist()}"
        )
    return positions.long()


def _initial_members(
    parts: ModelParts,
    init: Literal["shared", "independent"] | Params,
    count: int,
    seed: int,
    positions: Tensor,
) -> Params:
    """The members' starting trainable parameters, stacked (new memory)."""
    own = parts.params
    if isinstance(init, str):
        if init == "shared":
            return stack([own] * count)
        if init == "independent":
            members = init_ensemble(parts.module, count, seed, positions=positions)
            return {name: members[name] for name in own}
        raise ValueError(
            f"sweep: init must be 'shared', 'independent' or stacked params, got {init!r}"
        )
    if not isinstance(init, Mapping):
        raise TypeError(f"sweep: stacked init must be a dict of tensors, got {type(init).__name__}")
    missing, extra = sorted(set(own) - set(init)), sorted(set(init) - set(own))
    if missing or extra:
        frozen = sorted(set(extra) & set(parts.frozen))
        hint = f"; {frozen} are frozen (requires_grad=False) and never trained" if frozen else ""
        raise ValueError(
            f"sweep: stacked init must hold exactly the model's trainable parameters; "
            f"missing {missing}, unknown {extra}{hint}"
        )
    sizes = {leaf.shape[0] for leaf in init.values() if isinstance(leaf, Tensor) and leaf.ndim}
    if sizes != {count}:
        raise ValueError(
            f"sweep: init holds {sorted(sizes)} members but there are {count} strengths; "
            "the leading dim of every stacked parameter must equal len(strengths)"
        )
    for name, param in own.items():
        leaf = init[name]
        if not isinstance(leaf, Tensor) or leaf.shape[1:] != param.shape:
            shape = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(
                f"sweep: init[{name!r}] has shape {shape}, expected ({count}, "
                f"{', '.join(map(str, param.shape))})"
            )
    return {name: init[name].to(param.device, param.dtype) for name, param in own.items()}
