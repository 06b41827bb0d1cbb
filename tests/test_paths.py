"""The linear path: scikit-learn's alpha grid, lasso_path, LassoCV and ElasticNetCV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import lasso_path

import functorch_reg as fr


def test_lambda_grid_is_scikit_learns():
    X, y = load_diabetes(return_X_y=True)
    expected = lasso_path(X - X.mean(0), y - y.mean())[0]
    got = fr.lambda_grid(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    half = fr.lambda_grid(torch.from_numpy(X), torch.from_numpy(y), n=5, l1_ratio=0.5)
    assert half[0].item() == pytest.approx(2 * got[0].item())


@pytest.mark.slow
def test_lasso_path_on_diabetes_matches_scikit_learn():
    """Both solve the same strictly convex problem (X has full column rank), so the
    coefficients agree up to solver accuracy: scikit-learn runs coordinate descent to a
    duality gap of 1e-12, ours 10k ISTA steps whose error contracts by about
    1 - 1/cond(X^T X) ~ 1 - 1/470 per step. 1e-6 of the largest coefficient (~700) is
    far above both errors and far below any real difference."""
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    path = fr.linear_path(Xt, yt, steps=10_000)
    _, coefs, _ = lasso_path(
        X - X.mean(0), y - y.mean(), alphas=path.strengths.numpy(), tol=1e-12, max_iter=100_000
    )
    expected = coefs.T
    np.testing.assert_allclose(
        path.coef.numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max()
    )
    assert np.array_equal(path.coef.numpy() == 0, expected == 0), "same exact zeros"
    intercepts = y.mean() - expected @ X.mean(0)
    np.testing.assert_allclose(path.intercept.numpy(), intercepts, atol=1e-6 * np.abs(y).max())


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
@pytest.mark.slow
def test_cross_validated_path_matches_lasso_cv_and_elastic_net_cv(l1_ratio):
    from sklearn.linear_model import ElasticNetCV
    from sklearn.model_selection import KFold

    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    grid = fr.lambda_grid(Xt, yt, n=12, l1_ratio=l1_ratio)
    path = fr.linear_path(Xt, yt, grid, l1_ratio=l1_ratio, folds=5, steps=20_000)
    cv = ElasticNetCV(
        l1_ratio=l1_ratio, alphas=grid.numpy(), cv=KFold(5), tol=1e-12, max_iter=100_000
    ).fit(X, y)
    assert path.mse_path.shape == (12, 5)
    np.testing.assert_allclose(cv.alphas_, grid.numpy())
    np.testing.assert_allclose(path.mse_path.numpy(), cv.mse_path_, rtol=1e-9)
    assert path.best_strength == pytest.approx(cv.alpha_, rel=1e-12)
    best = path.best_index
    np.testing.assert_allclose(
        path.coef[best].numpy(), cv.coef_, atol=1e-6 * np.abs(cv.coef_).max()
    )
    np.testing.assert_allclose(path.intercept[best].item(), cv.intercept_, rtol=1e-9)


def test_path_plot_draws_and_saves(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = load_diabetes(return_X_y=True)
    path = fr.linear_path(torch.from_numpy(X), torch.from_numpy(y), steps=10, compile=False)
    path.plot(tmp_path / "path.png")
    assert (tmp_path / "path.png").stat().st_size > 10_000
