"""Ensembles over regularization strength: one vmapped, compiled step trains a whole grid.

:func:`sweep` trains one member per strength (or grid point, or fold) of a model, all at
once, and reports per-member validation metrics; :func:`ensemble_step` is its step, for
loops of one's own. The linear path is in :mod:`functorch_reg.paths`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import optree
import torch
from torch import Tensor, nn

from . import _plot, sweep_data, sweep_step
from .flat import FlatParams, pack
from .modules import Logits
from .optim import Optimizer
from .optim.base import check_optimizer
from .select import Where
from .sweep_data import as_strengths
from .sweep_step import Randomness
from .tree import Params, flatten, is_float, stack, unstack

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SweepPlan", "SweepResult", "ensemble_step", "init_ensemble", "refit", "sweep"]


def init_ensemble(
    model: nn.Module, n: int, seed: int = 0, *, positions: Tensor | Sequence[int] | None = None
) -> Params:
    """Parameters of ``n`` independently initialized copies of ``model``, stacked.

    Each member is ``model`` re-initialized by its modules' ``reset_parameters()``
    under a seed drawn from ``seed``, so the ensemble is reproducible and ``model``
    itself is left untouched. The member at position ``i`` of a grid gets the ``i``-th
    seed drawn, so a slice of a grid (``positions``, e.g. a rank's
    :func:`~functorch_reg.distributed.shard_grid` indices) gets the members it has in
    the whole grid.

    Args:
        model: the architecture; its modules' ``reset_parameters()`` (if any) draw the
            members' values. ``model`` is deep-copied, never changed.
        n: the number of members, a positive int.
        seed: an int; the same seed gives the same members.
        positions: the members' positions in a larger grid, ``n`` non-negative ints
            (default ``range(n)``).

    Returns:
        A dict from the names of ``model.named_parameters()`` to detached tensors of
        shape ``(n, *param.shape)`` and the parameters' dtypes and devices.

    Raises:
        ValueError: ``n`` is not a positive int; ``positions`` is not ``n``
            non-negative ints.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> members = fr.init_ensemble(torch.nn.Linear(3, 2), n=4, seed=0)
        >>> members["weight"].shape
        torch.Size([4, 2, 3])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"init_ensemble: n must be a positive int, got {n!r}")
    where = torch.arange(n) if positions is None else torch.as_tensor(positions).long().cpu()
    if where.shape != (n,) or (where < 0).any():
        raise ValueError(f"init_ensemble: positions must be {n} non-negative ints, got {where}")
    # Draws are prefix-stable: the first m of n draws are the m draws of a shorter grid.
    generator = torch.Generator().manual_seed(seed)
    member_seeds = torch.randint(2**62, (int(where.max()) + 1,), generator=generator)[where]
    members = []
    for member_seed in member_seeds.tolist():
        replica = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed)
            for module in replica.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        members.append({name: p.detach() for name, p in replica.named_parameters()})
    return stack(members)


Strengths = Tensor | Sequence[float] | Mapping[str, Tensor | Sequence[float]]
Select = Literal["val_loss", "val_accuracy"] | Callable[["SweepResult"], int]


@dataclass(frozen=True)
class SweepPlan:
    """The resolved inputs of one :func:`sweep` that :func:`refit` trains again from.

    Made by :func:`sweep` after its checks, stored as :attr:`SweepResult.plan`. It holds
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
        grid: each axis's value per grid point, in the params' dtype on ``device``.
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

    parts: sweep_step.ModelParts
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


def refit(
    plan: SweepPlan,
    index: int,
    *,
    steps: int | None = None,
    compile: bool | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Train grid point ``index`` of ``plan`` again on all the data, as one model.

    See :meth:`SweepResult.refit`, which calls it with the chosen member. Returns the
    trained model as ``model.state_dict()`` keys (params, buffers, frozen params).
    """
    compile = plan.compile if compile is None else compile
    data = (
        plan.train
        if plan.val is None
        else sweep_data.concatenated(plan.train, plan.val, plan.batch_size)
    )
    start = _packed(plan.layout, stack([unstack(plan.initial)[index * plan.folds]]))
    one = {axis: values[index : index + 1] for axis, values in plan.grid.items()}
    refit_step = sweep_step.vmapped_step(
        plan.parts,
        plan.loss_fn,
        plan.optimizer,
        plan.penalties,
        flat=plan.layout,
        randomness=plan.randomness,
    )
    steps = steps or plan.steps
    with sweep_step.seeded(plan.seed, plan.device):
        trained, buffers, _ = sweep_step.train(
            torch.compile(refit_step, fullgraph=True) if compile else refit_step,
            start,
            optree.tree_map(lambda t: t[:1], plan.initial_buffers),
            stack([plan.optimizer.init(unstack(start)[0])]),
            one,
            _batches(data, plan.batch_size, steps, plan.seed, plan.device, "shared", None),
            steps,
            progress=progress,
            compiling=compile,
            desc="refit",
        )
    params, buffers = (
        optree.tree_map(lambda t: t[0], t) for t in (_unpacked(plan.layout, trained), buffers)
    )
    return plan.parts.state_dict(params, buffers)


def _packed(layout: FlatParams | None, members: Params) -> Params:
    """Stacked members as the trees the step trains: stacked buffers when flat."""
    if layout is None:
        return members
    return stack([layout.pack_like(member) for member in unstack(members)])


def _unpacked(layout: FlatParams | None, trained: Params) -> Params:
    return trained if layout is None else layout.unpack(trained)


@dataclass(frozen=True)
class _MemberStateDict:
    """``ModelParts.state_dict`` without the module: what a result keeps to name one
    member's tensors as ``model.state_dict()`` keys (plain tensors and strings, so it
    pickles)."""

    frozen: dict[str, Tensor]
    keys: tuple[tuple[str, str], ...]

    def __call__(self, params: Params, buffers: Params) -> dict[str, Tensor]:
        values = {**self.frozen, **dict(buffers), **dict(params)}
        return {key: values[name] for key, name in self.keys}


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` measured, one entry per member (per point of the grid).

    With ``folds``, a member is a grid point: its metrics are means over its folds and
    the per-fold figures are in ``fold_val_loss`` / ``fold_val_accuracy``.

    Attributes:
        strengths: the first grid axis's value of each member, shape ``(K,)``.
        params: the trained parameters, stacked: leading dim ``K``, or ``(K, folds)``.
        train_loss: unregularized training loss per step, ``(steps, K)`` or
            ``(steps, K, folds)``.
        val_loss: validation loss, shape ``(K,)`` (with folds, the mean over folds).
        val_accuracy: validation accuracy for classification (integer targets), else ``None``.
        sparsity: fraction of parameter entries that are exactly zero, shape ``(K,)``.
        param_norm: Euclidean norm of all parameters, shape ``(K,)``.
        fold_val_loss: held-out loss per member and fold, ``(K, folds)``, or ``None``.
        fold_val_accuracy: held-out accuracy per member and fold, or ``None``.
        grid: each axis's value per member, ``{axis: (K,)}``; the axis is ``"penalty"``
            or the optimizer hyperparameter the values set.
        select: ``"val_loss"`` (lowest), ``"val_accuracy"`` (highest) or a callable
            ``result -> index``; it sets :attr:`best_index`. Ties go to the first
            member (the lowest index, the first grid point): under ``"val_loss"``
            among exactly equal losses, under ``"val_accuracy"`` among accuracies within
            ``ACCURACY_TIE_TOLERANCE`` (1e-6, absolute) of the highest, so that the
            float rounding of a mean over batches or folds does not settle a tie.
        buffers: each member's buffers after training (BatchNorm running statistics),
            stacked like :attr:`params`; ``{}`` for a model without buffers.

    Losses are means over the samples (as ``loss_fn`` returns them), unregularized;
    ``best_index``, ``best`` (the chosen grid point), ``best_params``,
    ``best_state_dict``, ``refit()``, ``table()`` and ``plot()`` read the result.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X, y = torch.randn(16, 2), torch.randn(16)
        >>> def mse(out, target):
        ...     return torch.nn.functional.mse_loss(out.squeeze(-1), target)
        >>> result = fr.sweep(torch.nn.Linear(2, 1), mse, fr.sgd(lr=0.1), [0.0, 1.0],
        ...                   train=(X, y), val=(X, y), penalty=fr.penalties.l1, steps=5,
        ...                   compile=False, progress=False)
        >>> result.val_loss.shape, result.param_norm.shape, sorted(result.grid)
        (torch.Size([2]), torch.Size([2]), ['penalty'])
    """

    ACCURACY_TIE_TOLERANCE: ClassVar[float] = 1e-6

    strengths: Tensor
    params: Params
    train_loss: Tensor
    val_loss: Tensor
    val_accuracy: Tensor | None
    sparsity: Tensor
    param_norm: Tensor
    fold_val_loss: Tensor | None = None
    fold_val_accuracy: Tensor | None = None
    grid: Mapping[str, Tensor] = field(default_factory=dict)
    select: Select = "val_loss"
    buffers: Params = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    plan: SweepPlan | None = field(default=None, repr=False, compare=False)
    _state_dict: Callable[[Params, Params], dict[str, Tensor]] | None = field(
        default=None, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (and ``torch.save``, ``copy.deepcopy``) keeps every measured field
        and drops :attr:`plan`, which holds the optimizer's closures and the data;
        :meth:`refit` on the copy then says so."""
        state = dict(self.__dict__)
        state["_unpickled"] = state["plan"] is not None or state.get("_unpickled", False)
        state["plan"] = None
        return state

    @property
    def finite(self) -> Tensor:
        """Whether each member's validation loss is finite (``False``: it diverged)."""
        return torch.isfinite(self.val_loss)

    @property
    def best_index(self) -> int:
        """The member chosen by :attr:`select`; a member with a non-finite validation
        loss is never chosen."""
        finite = self.finite
        if not finite.any():
            raise ValueError("every member's validation loss is non-finite: all diverged")
        if callable(self.select):
            index = self.select(self)
            if isinstance(index, Tensor):
                index = int(index)
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"select must return an int index, got {index!r}")
            if not 0 <= index < len(self.val_loss):
                raise ValueError(f"select returned {index}, not in [0, {len(self.val_loss)})")
            if not finite[index]:
                raise ValueError(
                    f"select chose member {index}, whose validation loss is not finite"
                )
            return index
        if self.select == "val_accuracy":
            assert self.val_accuracy is not None
            accuracy = torch.where(finite, self.val_accuracy.double(), -math.inf)
            near_best = accuracy >= accuracy.max() - self.ACCURACY_TIE_TOLERANCE
            return int(near_best.nonzero()[0, 0])  # the first of the (near-)equal best
        return int(torch.where(finite, self.val_loss, math.inf).argmin())

    @property
    def best(self) -> dict[str, float]:
        """The chosen member's value on each grid axis."""
        return {axis: values[self.best_index].item() for axis, values in self.grid.items()}

    @property
    def best_member_params(self) -> Params:
        """The trained parameters (weights, not hyperparameters: those are :attr:`best`)
        of the member :attr:`best_index`, trainable ones only; with folds, its members
        stacked per fold (:meth:`refit` gives one model). :attr:`best_state_dict` has
        the whole model."""
        return unstack(self.params)[self.best_index]

    @property
    def best_params(self) -> Params:
        """Deprecated alias of :attr:`best_member_params` (the chosen member's trained
        weights; scikit-learn's ``best_params_`` are hyperparameters, here :attr:`best`).

        Warns:
            DeprecationWarning: always; use ``best_member_params``.
        """
        warnings.warn(
            "SweepResult.best_params is deprecated: it holds the chosen member's trained "
            "weights, not hyperparameters; use best_member_params (or best for the "
            "chosen hyperparameters, best_state_dict for the whole model)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.best_member_params

    @property
    def best_state_dict(self) -> dict[str, Tensor]:
        """The chosen member as a whole model: its parameters and buffers and the
        frozen parameters, keyed as ``model.state_dict()``, so that
        ``model.load_state_dict(result.best_state_dict)`` (``strict=True``) loads it.

        Raises:
            ValueError: with folds, where a grid point is one model per fold (use
                :meth:`refit`), or for a result not made by :func:`sweep`.
        """
        if self._state_dict is None:
            raise ValueError("this SweepResult was not made by fr.sweep; use best_member_params")
        if self.fold_val_loss is not None:
            raise ValueError(
                "with folds, the chosen grid point is one model per fold; refit() trains "
                "one model on all the data (best_member_params holds the fold members)"
            )
        index = self.best_index
        params, buffers = (
            optree.tree_map(lambda t: t[index], tree) for tree in (self.params, self.buffers)
        )
        return self._state_dict(params, buffers)

    def refit(
        self, *, steps: int | None = None, compile: bool | None = None, progress: bool = False
    ) -> Params:
        """Train the chosen member's hyperparameters again on all the data.

        All the data is ``train`` and ``val`` together (with folds, all of ``train``),
        from the chosen member's initialization, with the sweep's optimizer, batches and
        ``steps`` unless given; ``compile`` defaults to the sweep's (one member of a small
        model often runs faster eagerly than it compiles). The member's buffers start
        from the model's own, as in the sweep. Returns the trained model as a state
        dict: its parameters and buffers and the frozen parameters, keyed as
        ``model.state_dict()``: ``model.load_state_dict(result.refit())``.
        """
        if self.plan is None:
            if self.__dict__.get("_unpickled", False):
                raise ValueError(
                    "this SweepResult was unpickled (or copied): refit needs the sweep's "
                    "inputs (the optimizer's closures and the data do not pickle); call "
                    "fr.sweep again, or refit before saving and save the returned state dict"
                )
            raise ValueError("this SweepResult was not made by fr.sweep and cannot refit")
        return refit(self.plan, self.best_index, steps=steps, compile=compile, progress=progress)

    def table(self) -> str:
        """A text table: grid values (3 significant digits), validation loss and accuracy,
        sparsity, norm; the chosen member marked ``<- best``."""
        return _plot.sweep_table(self)

    def plot(
        self,
        path: str | None = None,
        *,
        title: str | None = None,
        names: Mapping[str, str] | None = None,
    ) -> Figure:
        """Regularization path (the L2 norm of each parameter tensor along the first axis)
        and validation curve (one line per value of the other axes; with folds, the mean
        and the range over folds), on a log strength axis, the chosen member marked and
        labeled, the fraction of exact zeros on a twin axis.

        Args:
            path: where to save the figure (format from the suffix), or ``None``.
            title: the figure's title; by default, how many models of which layers were
                trained over which axis.
            names: words for grid axes, e.g. ``{"prox_strength": "group-lasso strength"}``
                labels the x-axis "group-lasso strength (prox_strength)".

        Returns:
            A ``matplotlib.figure.Figure`` (not registered with pyplot; the backend is
            left alone: in a notebook, make it the cell's value to show it).

        Raises:
            ImportError: matplotlib is not installed.
        """
        return _plot.sweep_figure(self, path, title, names)


def sweep(
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
    progress: bool = True,
) -> SweepResult:
    """Train one member of ``model`` per regularization strength (or grid point), all at once.

    The strength of member ``k`` either scales a penalty added to the loss,
    ``loss_fn(model(x), y) + strengths[k] * penalty(params)`` (give ``penalty``), or
    drives one of the optimizer's hyperparameters, e.g. ``prox_strength`` or
    ``weight_decay`` (give ``hyperparameter``). A dict of axes,
    ``{"penalty" or hyperparameter: values}``, sweeps their product. Every step runs all
    members through one ``torch.compile(vmap(step))``; all members see the same batches.

    The model may be a real one. Parameters with ``requires_grad=False`` are constants,
    never updated or decayed. Buffers are per-member state: each member has its own
    (BatchNorm running statistics, :attr:`SweepResult.buffers`), updated by its own
    training batches as ``model.train()`` would, and validation runs in eval mode.
    Dropout in train mode draws per member (``randomness``). The forward may return a
    tensor, dict, tuple or ``ModelOutput``: ``loss_fn`` gets it as is, and accuracy is
    reported where ``logits=`` finds the logits. A ``torch.compile``d module is
    unwrapped (the sweep compiles the whole step itself). The model itself is never
    modified, also when the sweep fails.

    With ``folds=k`` (or a ``cv`` splitter) and no ``val``, each grid point trains one
    member per fold, all in the same vmapped step: every member sees the shared batch
    with its held-out fold's samples weighted 0, so ``loss_fn`` must be a mean over
    samples (as the torch losses are by default). Folds are contiguous, as
    ``sklearn.model_selection.KFold(k)`` without shuffling. A model whose train-mode
    forward mixes samples (BatchNorm) or updates buffers instead gives each member the
    rows of its own training fold, so a held-out sample never reaches its member's
    batch statistics; the training folds must then be of equal size.

    Args:
        model: the architecture; its parameters are the shared initialization.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, a mean over samples;
            ``outputs`` is what the model returns (a tensor, dict, tuple or
            ``ModelOutput``).
        optimizer: a functional optimizer such as ``fr.adam(prox=fr.prox.l1)``.
        strengths: one strength per member, shape ``(K,)``, or a dict of grid axes.
        train: a pair of tensors ``(x, y)``, a ``DataLoader`` or any re-iterable of
            ``(x, y)`` batches (re-iterated per epoch). A batch of a new shape (a
            loader's last partial batch) compiles once more: ``drop_last=True`` avoids it.
        val: the same forms; evaluated batch by batch (the exact mean over samples).
            Integer targets make it a classification problem and add accuracy. It is
            read before training (checked) and after, so a one-shot iterable (an
            ``IterableDataset`` over a stream) is refused before training.
        penalty: ``penalty(params) -> 0-d tensor``, scaled by the strength; or a dict
            of named penalties (one per group of layers, e.g. ``functools.partial(
            fr.penalties.l1, where="0.*")``), each with its own strength axis of the
            same name in a dict ``strengths``.
        hyperparameter: the optimizer hyperparameter the strength sets instead.
        steps: optimizer steps (across epochs).
        batch_size: minibatch size for tensor data (the last partial batch of an epoch
            is dropped so shapes stay static); ``None`` for full-batch steps.
        folds: cross-validate over ``folds`` contiguous folds of ``train`` (tensors).
        cv: a scikit-learn splitter or a list of ``(train_index, test_index)`` instead.
        select: ``"val_loss"``, ``"val_accuracy"`` or ``result -> index``.
        init: ``"shared"`` (every member starts from ``model``'s parameters),
            ``"independent"`` (:func:`init_ensemble` with ``seed``), or stacked
            parameters with ``K`` members.
        seed: seeds the batch order (and the members' initialization when independent).
        grid_positions: the members' positions in a larger grid split across ranks
            (:func:`~functorch_reg.distributed.shard_grid`'s indices), so that
            ``init="independent"`` gives each member the initialization it has in the
            whole grid.
        flat: train stacked flat buffers (see :mod:`functorch_reg.flat`): ``True`` packs
            one group per dtype, a dict ``group -> where=`` names the groups; the
            optimizer's ``mask`` names groups (``mask="decay"``) or leaves, whose
            selection must then fill whole groups, and a structured prox is lifted to
            the leaves (``Optimizer.for_flat``). Each member's
            update is then one kernel per group rather than one per leaf; results equal
            the per-leaf sweep, and :attr:`SweepResult.params` is per-leaf either way.
        randomness: vmap's ``"different"`` (each member draws its own dropout masks),
            ``"same"`` (all members the same masks) or ``"error"`` (random operations
            raise). The draws follow ``seed``; the caller's random stream is left as
            it was.
        logits: where the logits are in the model's output, for accuracy: ``None``
            (the output itself if a tensor, else its ``logits``), an attribute or key
            name, a tuple index, or a callable ``output -> logits``.
        compile: compile the vmapped step with ``fullgraph=True``.
        progress: show a progress bar (it says "compiling" during the first step).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: before any training: not exactly one of ``penalty`` and
            ``hyperparameter``; strengths not finite and >= 0; ``steps`` not a positive
            int; an unknown ``select``, ``init`` or ``randomness``; neither ``val`` nor
            ``folds``/``cv``, or both; bad ``folds``; data whose ``x`` and ``y`` differ
            in length.
        TypeError: before any training: ``train`` or ``val`` is not tensors, a loader
            or a re-iterable of ``(x, y)`` batches (e.g. a one-shot iterator).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X = torch.randn(32, 4)
        >>> y = X @ torch.tensor([1.0, 0.0, 0.0, 0.0])
        >>> def mse(out, target):
        ...     return torch.nn.functional.mse_loss(out.squeeze(-1), target)
        >>> result = fr.sweep(torch.nn.Linear(4, 1), mse, fr.sgd(lr=0.1), [0.0, 0.1, 1.0],
        ...                   train=(X, y), val=(X, y), penalty=fr.penalties.l2,
        ...                   steps=50, compile=False, progress=False)
        >>> result.best_index, result.params["weight"].shape, result.train_loss.shape
        (0, torch.Size([3, 1, 4]), torch.Size([50, 3]))
    """
    plan = _plan(
        model,
        loss_fn,
        optimizer,
        strengths,
        train=train,
        val=val,
        penalty=penalty,
        hyperparameter=hyperparameter,
        steps=steps,
        batch_size=batch_size,
        folds=folds,
        cv=cv,
        select=select,
        init=init,
        seed=seed,
        grid_positions=grid_positions,
        flat=flat,
        randomness=randomness,
        logits=logits,
        compile=compile,
    )
    members, buffers, losses = _run(plan, progress)
    return _result(plan, members, buffers, losses)


def _plan(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    strengths: Strengths,
    *,
    train: Any,
    val: Any,
    penalty: Callable[[Params], Tensor] | Mapping[str, Callable[[Params], Tensor]] | None,
    hyperparameter: str | None,
    steps: int,
    batch_size: int | None,
    folds: int | None,
    cv: Any,
    select: Select,
    init: Literal["shared", "independent"] | Params,
    seed: int,
    grid_positions: Tensor | Sequence[int] | None,
    flat: bool | Mapping[str, Where],
    randomness: Randomness,
    logits: Logits,
    compile: bool,
) -> SweepPlan:
    """:func:`sweep`'s arguments, checked and resolved; nothing is trained, the model is
    read only (its first batch runs once, in a probe, on a copy of the members)."""
    sweep_step.check_randomness(randomness, "sweep")
    penalties = _penalties(penalty, strengths, optimizer)
    grid = _grid(strengths, optimizer, penalties, hyperparameter)
    count = len(next(iter(grid.values())))
    _check_steps_and_select(steps, select)
    train_data, val_data = _sweep_data(train, val, folds, cv, batch_size)
    parts = sweep_step.model_parts(model, "sweep")
    device = next(iter(parts.params.values())).device
    positions = _positions(grid_positions, count)
    members = _initial_members(parts, init, count, seed, positions)
    first_member = unstack(members)[0]
    with sweep_step.seeded(seed, device):
        probe = sweep_step.probe(
            parts, loss_fn, first_member, val_data or train_data, device, logits
        )
    _check_accuracy(select, probe)
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
    folding, n_folds = None, 1
    if val_data is None:
        folding = _folding(parts, probe, train_data, folds, cv, batch_size, count, dtype, device)
        n_folds = folding.folds
        members = _repeat_members(members, n_folds)
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
        initial_buffers=sweep_step.stacked(parts.buffers, count * n_folds),
        folds=n_folds,
        steps=steps,
        compile=compile,
        folding=folding,
        sample_losses=probe.sample_losses,
        logits=logits if probe.classification else False,
        select=select,
    )


def _check_steps_and_select(steps: Any, select: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sweep: steps must be a positive int, got {steps!r}")
    if select not in ("val_loss", "val_accuracy") and not callable(select):
        raise ValueError(
            f"sweep: select must be 'val_loss', 'val_accuracy' or a callable, got {select!r}"
        )


def _check_accuracy(select: Select, probe: sweep_step.Probe) -> None:
    if select == "val_accuracy" and not probe.classification:
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
    parts: sweep_step.ModelParts,
    probe: sweep_step.Probe,
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
    if mixing or probe.updates_buffers:
        # Batch statistics would mix a held-out fold into its member: each member
        # trains on the rows of its own training fold instead.
        samples = "gathered"
        per_member = _fold_rows(train_mask, mixing, batch_size).repeat(count, 1)
    else:
        samples = "weighted"
        per_member = train_mask.to(device, dtype).repeat(count, 1)
    return Folding(n_folds, samples, per_member, held_out)


def _run(plan: SweepPlan, progress: bool) -> tuple[Params, Params, list[Tensor]]:
    """Train every member of ``plan``: the per-leaf members, their buffers, the losses."""
    count = len(next(iter(plan.grid.values())))
    folding = plan.folding
    samples: Literal["shared", "weighted", "gathered"] = (
        "shared" if folding is None else folding.samples
    )
    per_member = None if folding is None else folding.per_member
    member_grid = {axis: values.repeat_interleave(plan.folds) for axis, values in plan.grid.items()}
    trained = _packed(plan.layout, plan.initial)
    states = stack([plan.optimizer.init(member) for member in unstack(trained)])
    step = sweep_step.vmapped_step(
        plan.parts,
        plan.loss_fn,
        plan.optimizer,
        plan.penalties,
        samples=samples,
        sample_losses=plan.sample_losses,
        flat=plan.layout,
        randomness=plan.randomness,
    )
    if plan.compile:
        step = torch.compile(step, fullgraph=True)
    batches = _batches(
        plan.train, plan.batch_size, plan.steps, plan.seed, plan.device, samples, per_member
    )
    with sweep_step.seeded(plan.seed, plan.device):
        trained, buffers, losses = sweep_step.train(
            step,
            trained,
            plan.initial_buffers,
            states,
            member_grid,
            batches,
            plan.steps,
            progress=progress,
            compiling=plan.compile,
            desc=f"sweep over {count} x {plan.folds} members"
            if folding is not None
            else f"sweep over {count} members",
        )
    return _unpacked(plan.layout, trained), buffers, losses


def _result(plan: SweepPlan, members: Params, buffers: Params, losses: list[Tensor]) -> SweepResult:
    """Evaluate the trained members and gather what :func:`sweep` returns."""
    count, n_folds = len(next(iter(plan.grid.values()))), plan.folds
    folding = plan.folding
    with torch.no_grad():
        if folding is not None:
            assert plan.train.tensors is not None
            loss, accuracy = sweep_step.evaluate_folds(
                plan.parts,
                plan.sample_losses,
                members,
                buffers,
                plan.train.tensors,
                folding.held_out,
                plan.device,
                plan.logits,
            )
        else:
            assert plan.val is not None
            loss, accuracy = sweep_step.evaluate(
                plan.parts, plan.loss_fn, members, buffers, plan.val, plan.device, plan.logits
            )
        leaves = [leaf.reshape(len(leaf), -1) for leaf in flatten(members)[0] if is_float(leaf)]
        entries = torch.cat(leaves, dim=1)
        sparsity = (entries == 0).float().mean(1).view(count, n_folds).mean(1)
        norm = entries.norm(dim=1).view(count, n_folds).mean(1)

    def fold_view(tree: Any) -> Any:
        return optree.tree_map(lambda t: t.reshape(count, n_folds, *t.shape[1:]), tree)

    cross_validate = folding is not None
    train_loss = torch.stack(losses).cpu()
    return SweepResult(
        strengths=next(iter(plan.grid.values())).cpu(),
        params=fold_view(members) if cross_validate else members,
        train_loss=train_loss.view(plan.steps, count, n_folds) if cross_validate else train_loss,
        val_loss=loss.view(count, n_folds).mean(1).cpu(),
        val_accuracy=None if accuracy is None else accuracy.view(count, n_folds).mean(1).cpu(),
        sparsity=sparsity.cpu(),
        param_norm=norm.cpu(),
        fold_val_loss=loss.view(count, n_folds).cpu() if cross_validate else None,
        fold_val_accuracy=(
            accuracy.view(count, n_folds).cpu() if cross_validate and accuracy is not None else None
        ),
        grid={axis: values.cpu() for axis, values in plan.grid.items()},
        select=plan.select,
        buffers=fold_view(buffers) if cross_validate else buffers,
        labels=_layer_labels(plan.parts.module),
        plan=plan,
        _state_dict=_MemberStateDict(plan.parts.frozen, plan.parts.keys),
    )


def ensemble_step(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    *,
    penalty: Callable[[Params], Tensor] | None = None,
    hyperparameter: str | None = None,
    flat: FlatParams | None = None,
    randomness: Randomness = "different",
) -> Callable[..., tuple[Any, ...]]:
    """The vmapped training step that :func:`sweep` compiles, for loops of your own.

    ``step(members, states, strengths, x, y) -> (members, states, losses)`` takes stacked
    parameters and optimizer states (leading dim ``K``), one strength per member and a
    batch shared by all members; ``losses`` are the members' unregularized losses.

    A model with buffers that its forward updates (BatchNorm in train mode) needs each
    member's buffers: ``step(members, states, strengths, x, y, buffers=buffers) ->
    (members, states, losses, buffers)``, with ``buffers`` stacked like ``members``
    (e.g. ``fr.stack([dict(model.named_buffers())] * K)``); each member's come back
    updated by its own forward, as ``model.train()`` updates the module's. Without
    ``buffers=``, the module's own buffers are used as constants (eval mode).

    Parameters with ``requires_grad=False`` stay as they are: left out of ``members``
    (``fr.split_module(model)[0]`` holds the trainable ones), the model's own are used;
    given in ``members``, they get no gradient, so the optimizer never updates or
    decays them. Random operations (dropout) follow vmap's ``randomness``.

    With ``flat=fr.flat.pack(params, ...)``, ``members`` are stacked buffers
    (``[K, n]`` per group, e.g. ``fr.stack([flat.pack_like(m) for m in trees])``), the
    model and ``penalty`` see their leaf views, and one kernel per group updates every
    member. Compile the returned function (``torch.compile(step, fullgraph=True)``), not
    the other way round.

    Args:
        model: the architecture (a ``torch.compile``d module is unwrapped).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``; ``outputs`` is what the
            model returns (a tensor, a dict, a tuple, a ``ModelOutput``).
        optimizer: a functional optimizer.
        penalty: ``penalty(params) -> 0-d tensor``, scaled by each member's strength.
        hyperparameter: the optimizer hyperparameter the strengths set instead.
        flat: a flat layout of the trainable parameters (none frozen).
        randomness: vmap's ``"different"`` (each member its own dropout masks),
            ``"same"`` or ``"error"``.

    Returns:
        ``step(members, states, strengths, x, y, buffers=None)``: ``strengths`` of shape
        ``(K,)`` (absolute, the multiplier of ``penalty`` or the hyperparameter's
        value); ``x``, ``y`` one batch shared by the members; ``losses`` of shape
        ``(K,)``, each the mean over the batch as ``loss_fn`` returns it.

    Raises:
        ValueError: not exactly one of ``penalty`` and ``hyperparameter``;
            ``hyperparameter`` is not a scalar hyperparameter of ``optimizer``;
            ``randomness`` is not ``"different"``, ``"same"`` or ``"error"``; ``flat``
            holds frozen parameters; at a call, buffers missing for a model with
            BatchNorm in train mode (naming the modules).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> net, opt = torch.nn.Linear(3, 1), fr.sgd(lr=0.1)
        >>> step = fr.ensemble_step(net, torch.nn.functional.mse_loss, opt,
        ...                         penalty=fr.penalties.l2)
        >>> members = fr.init_ensemble(net, n=2)
        >>> states = fr.stack([opt.init(m) for m in fr.unstack(members)])
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> members, states, losses = step(members, states, torch.tensor([0.0, 1.0]), x, y)
        >>> losses.shape, members["weight"].shape
        (torch.Size([2]), torch.Size([2, 1, 3]))
    """
    _check_strength_target(optimizer, penalty, hyperparameter)
    sweep_step.check_randomness(randomness, "ensemble_step")
    parts = sweep_step.model_parts(model, "ensemble_step")
    if flat is not None:
        frozen = sorted(set(flat.params) & set(parts.frozen))
        if frozen:
            raise ValueError(
                f"ensemble_step: the flat layout holds frozen parameters {frozen} "
                "(requires_grad=False), which a flat buffer would train; pack "
                "fr.split_module(model)[0] instead"
            )
    axis = "penalty" if hyperparameter is None else hyperparameter
    vmapped = sweep_step.vmapped_step(
        parts,
        loss_fn,
        optimizer,
        {} if penalty is None else {"penalty": penalty},
        flat=flat,
        randomness=randomness,
    )
    mixing = parts.batch_norms_in_training() if parts.buffers else []

    def step(
        members: Params,
        states: Any,
        strengths: Tensor,
        x: Tensor,
        y: Tensor,
        buffers: Params | None = None,
    ) -> tuple[Any, ...]:
        if buffers is None:
            if mixing:
                raise ValueError(
                    f"ensemble_step: {mixing} in train mode update their buffers; pass each "
                    "member's, step(..., buffers=fr.stack([dict(model.named_buffers())] * K)), "
                    "or call model.eval()"
                )
            members, _, states, losses = vmapped(members, {}, states, {axis: strengths}, x, y, None)
            return members, states, losses
        members, buffers, states, losses = vmapped(
            members, buffers, states, {axis: strengths}, x, y, None
        )
        return members, states, losses, buffers

    return step


def _batches(
    data: sweep_data.Data,
    batch_size: int | None,
    steps: int,
    seed: int,
    device: torch.device,
    samples: str,
    per_member: Tensor | None,
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """The training steps' ``(x, y, extra)``: a shared batch (with each member's weights
    of its samples), or all of ``data`` with each member's row positions (gathered)."""
    if samples == "gathered":
        assert data.tensors is not None and per_member is not None
        x, y = (t.to(device) for t in data.tensors)
        rows = per_member.to(device)
        for positions in sweep_data.sample_batches(rows.shape[1], batch_size, steps, seed, device):
            yield x, y, rows[:, positions]
        return
    for (inputs, targets), index in sweep_data.training_batches(
        data, batch_size, steps, seed, device
    ):
        if per_member is None:
            yield inputs, targets, None
        else:
            assert index is not None  # tensor data: weights need positions
            yield inputs, targets, per_member[:, index]


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


def first_member_dtype(params: Params) -> torch.dtype:
    dtype: torch.dtype = next(leaf.dtype for leaf in flatten(params)[0] if is_float(leaf))
    return dtype


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
    """Each axis's value per member (the product of the axes, first axis slowest)."""
    if not isinstance(strengths, Mapping):
        _check_strength_target(optimizer, penalties.get("penalty"), hyperparameter)
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
    mesh = torch.meshgrid(*axes.values(), indexing="ij")
    return {axis: values.reshape(-1) for axis, values in zip(axes, mesh, strict=True)}


def _check_hyperparameters(
    optimizer: Optimizer, member: Params, grid: dict[str, Tensor], penalties: Mapping[str, Any]
) -> None:
    """Let the optimizer validate every swept value (inside vmap it cannot read them)."""
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


def _repeat_members(members: Params, times: int) -> Params:
    return optree.tree_map(lambda t: t.repeat_interleave(times, dim=0), members)


def _layer_labels(model: nn.Module) -> dict[str, str]:
    """Parameter names in words: ``"0.weight"`` -> ``"Linear 64->32 weight"``."""
    labels = {}
    for name, _ in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        kind = type(module).__name__
        if isinstance(module, nn.Linear):
            kind += f" {module.in_features}->{module.out_features}"
        elif isinstance(module, nn.modules.conv._ConvNd):
            kernel = "x".join(map(str, module.kernel_size))
            kind += f" {module.in_channels}->{module.out_channels} {kernel}"
        labels[name] = f"{kind} {leaf}" if module_name else name
    return labels


def _check_strength_target(
    optimizer: Optimizer, penalty: Callable[[Params], Tensor] | None, hyperparameter: str | None
) -> None:
    if (penalty is None) == (hyperparameter is None):
        raise ValueError("give exactly one of penalty= or hyperparameter=")
    scalars = sorted(set(optimizer.hyperparams) - {"betas"})
    if hyperparameter is not None and hyperparameter not in scalars:
        raise ValueError(
            f"hyperparameter={hyperparameter!r} is not a scalar hyperparameter of the "
            f"optimizer; choose from {scalars}"
        )


def _initial_members(
    parts: sweep_step.ModelParts,
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
