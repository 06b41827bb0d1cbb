"""Searching a grid of strengths: :func:`sweep` (plan, run, evaluate, result) and its result.

:func:`sweep` makes a :class:`~functorch_reg.ensemble.grid.SweepPlan`
(:mod:`~functorch_reg.ensemble.grid`), trains and measures it
(:mod:`~functorch_reg.ensemble.loop`) and returns a :class:`SweepResult`: the measured data
and the choice of a member, as scikit-learn's ``GridSearchCV`` reports ``cv_results_``
and ``best_index_``. Figures and tables of a result are drawn by ``functorch_reg._plot``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import optree
import torch
from torch import Tensor, nn

from .. import _plot
from ..modules import Logits
from ..optim import Optimizer
from ..select import Where
from ..tree import Params, unstack
from .grid import Select, Strengths, SweepPlan, plan
from .loop import Evaluation, evaluate_members, refit, run
from .members import Randomness

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SweepResult", "sweep"]


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
    resolved = plan(
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
    members, buffers, losses = run(resolved, progress)
    return _result(resolved, members, buffers, losses, evaluate_members(resolved, members, buffers))


def _result(
    plan: SweepPlan, members: Params, buffers: Params, losses: list[Tensor], measured: Evaluation
) -> SweepResult:
    """What :func:`sweep` returns: the trained members and their measures, per grid point."""
    count, n_folds = plan.count, plan.folds
    loss, accuracy = measured.loss.view(count, n_folds), measured.accuracy

    def fold_view(tree: Any) -> Any:
        return optree.tree_map(lambda t: t.reshape(count, n_folds, *t.shape[1:]), tree)

    cross_validate = plan.folding is not None
    train_loss = torch.stack(losses).cpu()
    return SweepResult(
        strengths=next(iter(plan.grid.values())).cpu(),
        params=fold_view(members) if cross_validate else members,
        train_loss=train_loss.view(plan.steps, count, n_folds) if cross_validate else train_loss,
        val_loss=loss.mean(1).cpu(),
        val_accuracy=None if accuracy is None else accuracy.view(count, n_folds).mean(1).cpu(),
        sparsity=measured.sparsity.cpu(),
        param_norm=measured.norm.cpu(),
        fold_val_loss=loss.cpu() if cross_validate else None,
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
