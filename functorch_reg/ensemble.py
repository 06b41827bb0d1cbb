"""Ensembles over regularization strength: one vmapped, compiled step trains a whole grid.

:func:`sweep` trains one member per strength of a model, all at once, and reports
per-member validation metrics; :func:`lambda_grid` and :func:`linear_path` give the
regularization path of a linear model (lasso / elastic net) as scikit-learn defines it.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from . import prox as prox_ops
from .optim import Optimizer, sgd
from .tree import Params, flatten, is_float, spec_names, stack, unstack

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "LinearPath",
    "SweepResult",
    "ensemble_step",
    "init_ensemble",
    "lambda_grid",
    "linear_path",
    "sweep",
]


def init_ensemble(model: nn.Module, n: int, seed: int = 0) -> Params:
    """Parameters of ``n`` independently initialized copies of ``model``, stacked.

    Each member is ``model`` re-initialized by its modules' ``reset_parameters()``
    under a seed drawn from ``seed``, so the ensemble is reproducible and ``model``
    itself is left untouched.

    Example:
        >>> members = init_ensemble(torch.nn.Linear(3, 2), n=4, seed=0)
        >>> members["weight"].shape
        torch.Size([4, 2, 3])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"init_ensemble: n must be a positive int, got {n!r}")
    member_seeds = torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed))
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


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` measured, one entry per member (per strength).

    Attributes:
        strengths: the regularization strengths, shape ``(K,)``.
        params: the trained members' parameters, stacked (leading dim ``K``).
        train_loss: unregularized training loss per step, shape ``(steps, K)``.
        val_loss: validation loss, shape ``(K,)``.
        val_accuracy: validation accuracy for classification (integer targets), else ``None``.
        sparsity: fraction of parameter entries that are exactly zero, shape ``(K,)``.
        param_norm: Euclidean norm of all parameters, shape ``(K,)``.
    """

    strengths: Tensor
    params: Params
    train_loss: Tensor
    val_loss: Tensor
    val_accuracy: Tensor | None
    sparsity: Tensor
    param_norm: Tensor

    @property
    def best_index(self) -> int:
        """The member with the lowest validation loss."""
        return int(self.val_loss.argmin())

    @property
    def best_params(self) -> Params:
        """Parameters of :attr:`best_index`."""
        return unstack(self.params)[self.best_index]

    def table(self) -> str:
        """A text table: strength, validation loss and accuracy, sparsity, norm."""
        header = f"{'lambda':>10}  {'val loss':>9}  {'val acc':>7}  {'zeros':>6}  {'norm':>8}"
        rows = [header, "-" * len(header)]
        for i, lam in enumerate(self.strengths.tolist()):
            accuracy = "" if self.val_accuracy is None else f"{self.val_accuracy[i].item():.3f}"
            mark = "  <- best" if i == self.best_index else ""
            rows.append(
                f"{lam:>10.3g}  {self.val_loss[i].item():>9.4f}  {accuracy:>7}  "
                f"{self.sparsity[i].item():>6.1%}  {self.param_norm[i].item():>8.3f}{mark}"
            )
        return "\n".join(rows)

    def plot(self, path: str | None = None) -> Figure:
        """Regularization path (norm of each parameter tensor per strength) and
        validation curve, on a log strength axis. Needs matplotlib; saves to ``path``
        when given."""
        plt = _pyplot()
        figure, (path_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4))
        leaves, spec = flatten(self.params)
        for name, leaf in zip(spec_names(spec), leaves, strict=True):
            if is_float(leaf):
                path_axis.plot(self.strengths, leaf.flatten(1).norm(dim=1), label=name)
        path_axis.set(title="Regularization path", xlabel="lambda", ylabel="parameter norm")
        path_axis.legend(fontsize="small")
        metric, label = (
            (self.val_accuracy, "validation accuracy")
            if self.val_accuracy is not None
            else (self.val_loss, "validation loss")
        )
        val_axis.plot(self.strengths, metric, marker="o", label=label)
        val_axis.set(title="Validation", xlabel="lambda", ylabel=label)
        zeros_axis = val_axis.twinx()
        zeros_axis.plot(self.strengths, self.sparsity, color="gray", linestyle="--")
        zeros_axis.set_ylabel("fraction of exact zeros", color="gray")
        for axis in (path_axis, val_axis):
            _log_strength_axis(axis, self.strengths)
        return _finish(figure, path)


def sweep(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: Optimizer,
    strengths: Tensor | Sequence[float],
    *,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    penalty: Callable[[Params], Tensor] | None = None,
    hyperparameter: str | None = None,
    steps: int = 200,
    batch_size: int | None = None,
    init: Literal["shared", "independent"] | Params = "shared",
    seed: int = 0,
    compile: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Train one member of ``model`` per regularization strength, all at once.

    The strength of member ``k`` either scales a penalty added to the loss,
    ``loss_fn(model(x), y) + strengths[k] * penalty(params)`` (give ``penalty``), or
    drives one of the optimizer's hyperparameters, e.g. ``prox_strength`` or
    ``weight_decay`` (give ``hyperparameter``). Every step runs all members through one
    ``torch.compile(vmap(step))``; all members see the same batches.

    Args:
        model: the architecture; its parameters are the shared initialization.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        optimizer: a functional optimizer such as ``fr.adam(prox=fr.prox.l1)``.
        strengths: one strength per member, shape ``(K,)``.
        train: training inputs and targets.
        val: validation inputs and targets; integer targets make it a classification
            problem and add accuracy.
        penalty: ``penalty(params) -> 0-d tensor``, scaled by the strength.
        hyperparameter: the optimizer hyperparameter the strength sets instead.
        steps: optimizer steps.
        batch_size: minibatch size (the last partial batch of an epoch is dropped so
            shapes stay static); ``None`` for full-batch steps.
        init: ``"shared"`` (every member starts from ``model``'s parameters),
            ``"independent"`` (:func:`init_ensemble` with ``seed``), or stacked
            parameters with ``K`` members.
        seed: seeds the batch order (and the members' initialization when independent).
        compile: compile the vmapped step with ``fullgraph=True``.
        progress: show a progress bar.

    Returns:
        A :class:`SweepResult`.
    """
    strengths = _as_strengths(strengths)
    count = len(strengths)
    step = ensemble_step(model, loss_fn, optimizer, penalty=penalty, hyperparameter=hyperparameter)
    if compile:
        step = torch.compile(step, fullgraph=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sweep: steps must be a positive int, got {steps!r}")
    device = next(model.parameters()).device
    members = _initial_members(model, init, count, seed)
    states = stack([optimizer.init(member) for member in unstack(members)])
    strengths = strengths.to(device)
    x_train, y_train = (t.to(device) for t in train)
    x_val, y_val = (t.to(device) for t in val)
    batches = _batches(len(x_train), batch_size, steps, seed, device)
    losses = []
    for index in tqdm(batches, desc=f"sweep over {count} strengths", disable=not progress):
        members, states, loss = step(members, states, strengths, x_train[index], y_train[index])
        losses.append(loss)

    def evaluate(params: Params) -> tuple[Tensor, Tensor]:
        outputs = functional_call(model, params, (x_val,))
        return loss_fn(outputs, y_val), outputs

    with torch.no_grad():
        val_loss, outputs = vmap(evaluate)(members)
        accuracy = None
        if not y_val.is_floating_point() and outputs.ndim == 3:
            accuracy = (outputs.argmax(-1) == y_val).float().mean(-1)
        leaves = [leaf.flatten(1) for leaf in flatten(members)[0] if is_float(leaf)]
        entries = torch.cat(leaves, dim=1)
    return SweepResult(
        strengths=strengths.cpu(),
        params=members,
        train_loss=torch.stack(losses).cpu(),
        val_loss=val_loss.cpu(),
        val_accuracy=None if accuracy is None else accuracy.cpu(),
        sparsity=(entries == 0).float().mean(1).cpu(),
        param_norm=entries.norm(dim=1).cpu(),
    )


def ensemble_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: Optimizer,
    *,
    penalty: Callable[[Params], Tensor] | None = None,
    hyperparameter: str | None = None,
) -> Callable[..., tuple[Params, Any, Tensor]]:
    """The vmapped training step that :func:`sweep` compiles, for loops of your own.

    ``step(members, states, strengths, x, y) -> (members, states, losses)`` takes stacked
    parameters and optimizer states (leading dim ``K``), one strength per member and a
    batch shared by all members; ``losses`` are the members' unregularized losses.
    Compile the returned function (``torch.compile(step, fullgraph=True)``), not the
    other way round.
    """
    _check_strength_target(optimizer, penalty, hyperparameter)

    def objective(params: Params, strength: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = loss_fn(functional_call(model, params, (x,)), y)
        if penalty is None:
            return loss, loss
        return loss + strength * penalty(params), loss

    def member_step(params: Params, state: Any, strength: Tensor, x: Tensor, y: Tensor):
        grads, loss = grad(objective, has_aux=True)(params, strength, x, y)
        overrides = {} if hyperparameter is None else {hyperparameter: strength}
        params, state = optimizer.step(params, grads, state, **overrides)
        return params, state, loss

    return vmap(member_step, in_dims=(0, 0, 0, None, None))


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


def lambda_grid(
    X: Tensor,
    y: Tensor,
    n: int = 100,
    eps: float = 1e-3,
    l1_ratio: float = 1.0,
    fit_intercept: bool = True,
) -> Tensor:
    """scikit-learn's grid of elastic-net strengths for ``X``, ``y``, largest first.

    ``alpha_max = max_j |x_j^T y| / (n_samples * l1_ratio)`` (on centered data when
    ``fit_intercept``) is the smallest strength at which every coefficient is zero;
    the grid is ``n`` log-spaced values from ``alpha_max`` down to ``eps * alpha_max``.
    """
    if not 0 < l1_ratio <= 1:
        raise ValueError(f"lambda_grid: l1_ratio must be in (0, 1], got {l1_ratio}")
    X, y = _centered(X, y) if fit_intercept else (X, y)
    correlation = X.T @ y.reshape(len(y), -1)
    alpha_max = correlation.norm(dim=1).max() / (len(y) * l1_ratio)
    return torch.logspace(
        math.log10(alpha_max.item()), math.log10(eps * alpha_max.item()), n, dtype=X.dtype
    )


@dataclass(frozen=True)
class LinearPath:
    """Coefficients of a linear model along a grid of strengths.

    Attributes:
        strengths: shape ``(K,)``.
        coef: shape ``(K, n_features)``.
        intercept: shape ``(K,)``.
    """

    strengths: Tensor
    coef: Tensor
    intercept: Tensor

    def plot(self, path: str | None = None) -> Figure:
        """Each coefficient against the strength (log axis); saves to ``path`` when given."""
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot(self.strengths, self.coef)
        axis.set(title="Regularization path", xlabel="lambda", ylabel="coefficient")
        _log_strength_axis(axis, self.strengths)
        return _finish(figure, path)


def linear_path(
    X: Tensor,
    y: Tensor,
    strengths: Tensor | None = None,
    *,
    l1_ratio: float = 1.0,
    steps: int = 10_000,
    fit_intercept: bool = True,
    compile: bool = True,
    progress: bool = False,
) -> LinearPath:
    r"""Lasso / elastic-net coefficients for every strength, by proximal gradient descent.

    Minimizes scikit-learn's objective for each strength :math:`\alpha`,

    .. math:: \frac{1}{2n}\|y - Xw - b\|_2^2 + \alpha\left(r\|w\|_1 + \frac{1-r}{2}\|w\|_2^2\right),

    with ``fr.sgd(lr=1/L, prox=fr.prox.elastic_net)`` (ISTA; ``L`` the largest
    eigenvalue of :math:`X^T X / n`), all strengths in one vmapped step. Plain ISTA,
    not momentum: with momentum :math:`\mu` the fixed point solves the problem for
    :math:`(1 - \mu)\alpha` instead.

    Args:
        X: features, shape ``(n, d)``.
        y: targets, shape ``(n,)``.
        strengths: defaults to :func:`lambda_grid`.
        l1_ratio: ``r``, 1 for the lasso.
        steps: proximal gradient steps (the error falls linearly, at a rate set by the
            conditioning of ``X``).
        fit_intercept: fit ``b`` by centering ``X`` and ``y``, as scikit-learn does.
        compile: compile the vmapped step.
        progress: show a progress bar.
    """
    if strengths is None:
        strengths = lambda_grid(X, y, l1_ratio=l1_ratio, fit_intercept=fit_intercept)
    strengths = _as_strengths(strengths).to(X.dtype)
    X_fit, y_fit = _centered(X, y) if fit_intercept else (X, y)
    # The gradient X^T (X w - y) / n through the Gram matrix: d x d work per step, not n x d.
    gram, correlation = X_fit.T @ X_fit / len(y), X_fit.T @ y_fit / len(y)
    optimizer = sgd(
        lr=1 / torch.linalg.eigvalsh(gram).max().item(),
        prox=functools.partial(prox_ops.elastic_net, l1_ratio=l1_ratio),
    )
    coef = torch.zeros(len(strengths), X.shape[1], dtype=X.dtype, device=X.device)
    states = stack([optimizer.init({"coef": row}) for row in coef])

    def member_step(coef: Tensor, state: Any, strength: Tensor):
        grads = {"coef": gram @ coef - correlation}
        params, state = optimizer.step({"coef": coef}, grads, state, prox_strength=strength)
        return params["coef"], state

    step = vmap(member_step)
    if compile:
        step = torch.compile(step, fullgraph=True)
    for _ in tqdm(range(steps), desc="linear path", disable=not progress):
        coef, states = step(coef, states, strengths)
    intercept = (y.mean() - coef @ X.mean(0)) if fit_intercept else torch.zeros_like(strengths)
    return LinearPath(strengths=strengths, coef=coef, intercept=intercept)


def _as_strengths(strengths: Tensor | Sequence[float]) -> Tensor:
    strengths = torch.as_tensor(strengths)
    if not strengths.is_floating_point():
        strengths = strengths.to(torch.get_default_dtype())
    if strengths.ndim != 1 or len(strengths) == 0:
        raise ValueError(
            f"strengths must be a non-empty 1-d tensor, got shape {tuple(strengths.shape)}"
        )
    if not (torch.isfinite(strengths).all() and (strengths >= 0).all()):
        raise ValueError(f"strengths must be finite and non-negative, got {strengths.tolist()}")
    return strengths


def _initial_members(
    model: nn.Module, init: Literal["shared", "independent"] | Params, count: int, seed: int
) -> Params:
    if isinstance(init, str):
        if init == "shared":
            return stack([{name: p.detach() for name, p in model.named_parameters()}] * count)
        if init == "independent":
            return init_ensemble(model, count, seed)
        raise ValueError(
            f"sweep: init must be 'shared', 'independent' or stacked params, got {init!r}"
        )
    sizes = {leaf.shape[0] for leaf in flatten(init)[0] if isinstance(leaf, Tensor)}
    if sizes != {count}:
        raise ValueError(
            f"sweep: init holds {sorted(sizes)} members but there are {count} strengths; "
            "the leading dim of every stacked parameter must equal len(strengths)"
        )
    return init


def _batches(
    size: int, batch_size: int | None, steps: int, seed: int, device: torch.device
) -> list[Tensor]:
    if batch_size is None:
        return [torch.arange(size, device=device)] * steps
    if not 0 < batch_size <= size:
        raise ValueError(f"sweep: batch_size must be in [1, {size}], got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = size // batch_size
    batches = []
    while len(batches) < steps:
        order = torch.randperm(size, generator=generator)
        batches += list(order[: per_epoch * batch_size].view(per_epoch, batch_size))
    return [batch.to(device) for batch in batches[:steps]]


def _centered(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return X - X.mean(0), y - y.mean(0)


def _log_strength_axis(axis: Any, strengths: Tensor) -> None:
    positive = strengths[strengths > 0]
    if len(positive) == len(strengths):
        axis.set_xscale("log")
    elif len(positive):
        axis.set_xscale("symlog", linthresh=positive.min().item())


def _finish(figure: Figure, path: str | None) -> Figure:
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # matplotlib is an optional extra
        raise ImportError(
            'plot() needs matplotlib: pip install "functorch_reg[examples]"'
        ) from error
    return plt
