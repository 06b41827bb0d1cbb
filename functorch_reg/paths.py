"""The regularization path of a linear model (lasso / elastic net), as scikit-learn
defines it: :func:`lambda_grid` gives its strengths, :func:`linear_path` trains every
strength (and every cross-validation fold) at once by ISTA in one vmapped step."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vmap
from tqdm.auto import tqdm

from . import _plot, sweep_data
from . import prox as prox_ops
from .optim.sgd import sgd
from .sweep_data import as_strengths
from .tree import stack

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LinearPath", "lambda_grid", "linear_path"]


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
    As ``sklearn.linear_model._coordinate_descent._alpha_grid`` (used by ``lasso_path``,
    ``LassoCV`` and ``ElasticNetCV``); a 2-D ``y`` (multi-task) takes the row norms of
    :math:`X^T y`, as ``MultiTaskLasso`` does.

    Args:
        X: features, shape ``(n_samples, n_features)``, floating.
        y: targets, shape ``(n_samples,)`` (or ``(n_samples, n_tasks)``), same dtype.
        n: the number of strengths.
        eps: the smallest strength relative to ``alpha_max``.
        l1_ratio: scikit-learn's ``l1_ratio`` :math:`r`, in ``(0, 1]``.
        fit_intercept: center ``X`` and ``y`` first.

    Returns:
        A tensor of shape ``(n,)`` and ``X``'s dtype, decreasing; the strengths are
        absolute, per sample (the loss is the mean squared error over 2).

    Raises:
        ValueError: ``l1_ratio`` is not in ``(0, 1]``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
        >>> fr.lambda_grid(X, y, n=3, eps=1e-2)
        tensor([0.6667, 0.0667, 0.0067], dtype=torch.float64)
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
    """Coefficients of a linear model along a grid of strengths, from :func:`linear_path`.

    ``best_index`` and ``best_strength`` (the lowest mean held-out error, scikit-learn's
    ``LassoCV.alpha_``) raise ``ValueError`` without ``folds``; ``plot()`` draws the
    path.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X = torch.randn(30, 3, dtype=torch.float64)
        >>> y = X @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> strengths = torch.tensor([1.0, 0.01], dtype=torch.float64)
        >>> path = fr.linear_path(X, y, strengths, folds=3, steps=200, compile=False)
        >>> path.coef.shape, path.best_strength
        (torch.Size([2, 3]), 0.01)

    Attributes:
        strengths: shape ``(K,)``.
        coef: shape ``(K, n_features)``, fitted on all the data.
        intercept: shape ``(K,)``.
        mse_path: with ``folds``, the held-out mean squared error per strength and fold,
            shape ``(K, folds)`` (scikit-learn's ``LassoCV.mse_path_``), else ``None``.
    """

    strengths: Tensor
    coef: Tensor
    intercept: Tensor
    mse_path: Tensor | None = None

    @property
    def best_index(self) -> int:
        """The strength with the lowest mean held-out error (needs ``folds``)."""
        if self.mse_path is None:
            raise ValueError("best_index needs cross-validation: linear_path(..., folds=k)")
        return int(self.mse_path.mean(1).argmin())

    @property
    def best_strength(self) -> float:
        """``strengths[best_index]``: scikit-learn's ``LassoCV.alpha_``."""
        return self.strengths[self.best_index].item()

    def plot(self, path: str | None = None) -> Figure:
        """Each coefficient against the strength (log axis); with ``folds``, a second panel
        of the held-out error (mean and range over folds) and the chosen strength marked.
        Saves to ``path`` when given; returns a ``matplotlib.figure.Figure`` (pyplot and
        the backend are left alone)."""
        return _plot.path_figure(self, path)


def linear_path(
    X: Tensor,
    y: Tensor,
    strengths: Tensor | None = None,
    *,
    l1_ratio: float = 1.0,
    steps: int = 10_000,
    fit_intercept: bool = True,
    folds: int | None = None,
    compile: bool = True,
    progress: bool = False,
) -> LinearPath:
    r"""Lasso / elastic-net coefficients for every strength, by proximal gradient descent.

    Minimizes scikit-learn's objective for each strength :math:`\alpha`,

    .. math:: \frac{1}{2n}\|y - Xw - b\|_2^2 + \alpha\left(r\|w\|_1 + \frac{1-r}{2}\|w\|_2^2\right),

    with ``fr.sgd(lr=1/L, prox=fr.prox.elastic_net)`` (ISTA; ``L`` the largest
    eigenvalue of :math:`X^T X / n`), all strengths in one vmapped step. Plain ISTA,
    not momentum: with momentum :math:`\mu` the fixed point solves the problem for
    :math:`(1 - \mu)\alpha` instead. With ``folds=k`` the path of each of ``k``
    contiguous folds' training part (``KFold(k)``, intercept fitted per fold) runs in
    the same vmapped step as the full path, giving ``LassoCV``'s ``mse_path_``.

    Args:
        X: features, shape ``(n, d)``, floating (float64 for a tight match with
            scikit-learn).
        y: targets, shape ``(n,)``, ``X``'s dtype.
        strengths: :math:`\alpha`, shape ``(K,)``, finite and >= 0, absolute (per
            sample, as scikit-learn's ``alpha``); defaults to :func:`lambda_grid` (on
            all of ``X``, as ``LassoCV``).
        l1_ratio: ``r``, 1 for the lasso.
        steps: proximal gradient steps (the error falls linearly, at a rate set by the
            conditioning of ``X``).
        fit_intercept: fit ``b`` by centering ``X`` and ``y``, as scikit-learn does.
        folds: cross-validate over ``folds`` contiguous folds.
        compile: compile the vmapped step.
        progress: show a progress bar.

    Returns:
        A :class:`LinearPath`.

    Raises:
        ValueError: ``X`` is not ``(n, d)`` or ``y`` not ``(n,)``; ``strengths`` is not
            a non-empty 1-D tensor of finite values >= 0; ``folds`` is not an int >= 2
            or is more than ``n``; ``l1_ratio`` is outside ``[0, 1]`` (or ``(0, 1]``
            without ``strengths``).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
        >>> path = fr.linear_path(X, y, torch.tensor([1.0, 0.1]), folds=3, steps=50,
        ...                       compile=False)
        >>> path.mse_path.shape
        torch.Size([2, 3])
    """
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(
            f"linear_path: X must be (n, d) and y (n,), got {tuple(X.shape)} and {tuple(y.shape)}"
        )
    if strengths is None:
        strengths = lambda_grid(X, y, l1_ratio=l1_ratio, fit_intercept=fit_intercept)
    strengths = as_strengths(strengths).to(X.dtype)
    count = len(strengths)
    # System 0 is all the data; system 1 + f is fold f's training part.
    fits = [torch.ones(len(y), dtype=torch.bool, device=X.device)]
    held_out = None
    if folds is not None:
        held_out = sweep_data.kfold_masks(len(y), folds).to(X.device)
        fits += list(~held_out)
    grams, correlations, rates, means = [], [], [], []
    for fit in fits:
        X_fit, y_fit = X[fit], y[fit]
        x_mean, y_mean = X_fit.mean(0), y_fit.mean()
        if fit_intercept:
            X_fit, y_fit = X_fit - x_mean, y_fit - y_mean
        # The gradient X^T (X w - y) / n through the Gram matrix: d x d work per step.
        gram = X_fit.T @ X_fit / len(y_fit)
        grams.append(gram)
        correlations.append(X_fit.T @ y_fit / len(y_fit))
        rates.append(1 / torch.linalg.eigvalsh(gram).max())
        means.append((x_mean, y_mean))
    systems = len(fits)
    optimizer = sgd(lr=1.0, prox=functools.partial(prox_ops.elastic_net, l1_ratio=l1_ratio))
    coef = torch.zeros(systems * count, X.shape[1], dtype=X.dtype, device=X.device)
    states = stack([optimizer.init({"coef": row}) for row in coef])
    member_grams = torch.stack(grams).repeat_interleave(count, 0)
    member_correlations = torch.stack(correlations).repeat_interleave(count, 0)
    member_rates = torch.stack(rates).repeat_interleave(count)
    member_strengths = strengths.repeat(systems)

    def member_step(
        coef: Tensor, state: Any, strength: Tensor, gram: Tensor, correlation: Tensor, lr: Tensor
    ) -> tuple[Tensor, Any]:
        grads = {"coef": gram @ coef - correlation}
        params, state = optimizer.step({"coef": coef}, grads, state, lr=lr, prox_strength=strength)
        return params["coef"], state

    step = vmap(member_step)
    if compile:
        step = torch.compile(step, fullgraph=True)
    for _ in tqdm(range(steps), desc="linear path", disable=not progress):
        coef, states = step(
            coef, states, member_strengths, member_grams, member_correlations, member_rates
        )
    coef = coef.view(systems, count, -1)
    intercepts = []
    for (x_mean, y_mean), system_coef in zip(means, coef, strict=True):
        intercepts.append(
            y_mean - system_coef @ x_mean if fit_intercept else torch.zeros_like(strengths)
        )
    mse_path = None
    if held_out is not None:
        errors = []
        for fold, test in enumerate(held_out):
            predictions = X[test] @ coef[1 + fold].T + intercepts[1 + fold]
            errors.append(((predictions - y[test, None]) ** 2).mean(0))
        mse_path = torch.stack(errors, dim=1)
    return LinearPath(strengths=strengths, coef=coef[0], intercept=intercepts[0], mse_path=mse_path)


def _centered(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return X - X.mean(0), y - y.mean(0)
