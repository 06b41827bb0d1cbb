"""Sweeps over lambda: vmapped equals a loop, reproducible, and the lasso path matches
scikit-learn."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import lasso_path
from torch.func import functional_call, grad

import functorch_reg as fr


def classification_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:64], y[:64]), (x[64:], y[64:])


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train_one(model, loss_fn, optimizer, strength, train, batches, penalty=None, hp=None):
    """The reference: one member, eager, plain Python loop."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = optimizer.init(params)

    def objective(params, x, y):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        return loss if penalty is None else loss + strength * penalty(params)

    for index in batches:
        grads = grad(objective)(params, train[0][index], train[1][index])
        overrides = {} if hp is None else {hp: strength}
        params, state = optimizer.step(params, grads, state, **overrides)
    return params


@pytest.mark.compile
def test_compiled_vmapped_sweep_equals_members_trained_one_by_one():
    train, val = classification_data()
    model = small_model()
    optimizer = fr.adam(lr=0.05, prox=fr.prox.l1, mask=fr.select.weights())
    strengths = torch.tensor([0.0, 0.01, 0.1, 1.0])
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        train=train,
        val=val,
        hyperparameter="prox_strength",
        steps=30,
        batch_size=16,
        seed=3,
        progress=False,
    )
    batches = fr.sweep_data.sample_batches(64, 16, 30, seed=3, device=torch.device("cpu"))
    for i, strength in enumerate(strengths):
        expected = train_one(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            strength,
            train,
            batches,
            hp="prox_strength",
        )
        torch.testing.assert_close(fr.unstack(result.params)[i], expected, rtol=1e-5, atol=1e-6)
    assert result.sparsity[-1] > result.sparsity[0] == 0
    assert result.train_loss.shape == (30, 4) and result.val_accuracy.shape == (4,)


def test_penalty_sweep_equals_a_loop_and_reports_metrics():
    train, val = classification_data()
    model = small_model()
    optimizer = fr.sgd(lr=0.2, momentum=0.5)
    penalty = functools.partial(fr.penalties.group_lasso, where=fr.select.weights())
    strengths = torch.tensor([0.0, 0.05, 0.5])
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        train=train,
        val=val,
        penalty=penalty,
        steps=20,
        compile=False,
        progress=False,
    )
    batches = [torch.arange(64)] * 20
    for i, strength in enumerate(strengths):
        expected = train_one(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            strength,
            train,
            batches,
            penalty=penalty,
        )
        member = fr.unstack(result.params)[i]
        torch.testing.assert_close(member, expected)
        logits = functional_call(model, member, (val[0],))
        torch.testing.assert_close(
            result.val_loss[i], torch.nn.functional.cross_entropy(logits, val[1])
        )
        torch.testing.assert_close(
            result.val_accuracy[i], (logits.argmax(1) == val[1]).float().mean()
        )
        flat = torch.cat([v.flatten() for v in member.values()])
        torch.testing.assert_close(result.param_norm[i], flat.norm())
    assert result.best_index == int(result.val_loss.argmin())
    assert "<- best" in result.table()


def test_regression_sweep_has_no_accuracy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [0.0], [-2.0]])
    result = fr.sweep(
        torch.nn.Linear(3, 1),
        torch.nn.functional.mse_loss,
        fr.sgd(lr=0.1, weight_decay=0.0),
        [0.0, 0.5],
        train=(x[:30], y[:30]),
        val=(x[30:], y[30:]),
        hyperparameter="weight_decay",
        steps=10,
        compile=False,
        progress=False,
    )
    assert result.val_accuracy is None
    assert result.param_norm[1] < result.param_norm[0]


def test_init_ensemble_is_reproducible_and_independent():
    model = small_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    a = fr.init_ensemble(model, 3, seed=7)
    b = fr.init_ensemble(model, 3, seed=7)
    c = fr.init_ensemble(model, 3, seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert not torch.equal(a["0.weight"][0], a["0.weight"][1])
    torch.testing.assert_close(dict(model.named_parameters()), before, rtol=0, atol=0)


def test_sweep_is_reproducible_from_the_seed():
    train, val = classification_data()
    run = functools.partial(
        fr.sweep,
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 0.1],
        train=train,
        val=val,
        penalty=fr.penalties.l2,
        steps=6,
        batch_size=8,
        init="independent",
        compile=False,
        progress=False,
    )
    first, second, other = run(seed=1), run(seed=1), run(seed=2)
    torch.testing.assert_close(first.params, second.params, rtol=0, atol=0)
    assert not torch.equal(first.params["0.weight"], other.params["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"init": fr.init_ensemble(small_model(), 3)},
            "init holds \\[3\\] members but there are 4",
        ),
        ({"penalty": fr.penalties.l1, "hyperparameter": "lr"}, "exactly one of"),
        ({"penalty": None}, "exactly one of"),
        ({"penalty": None, "hyperparameter": "betas"}, "not a scalar hyperparameter"),
        ({"strengths": [[0.1, 0.2]]}, "1-d"),
        ({"strengths": [0.1, -0.2]}, "non-negative"),
        ({"steps": 0}, "positive int"),
        ({"batch_size": 1000}, "batch_size"),
        ({"init": "random"}, "'shared', 'independent'"),
    ],
)
def test_bad_sweep_input_raises(kwargs, message):
    train, val = classification_data()
    arguments = {
        "strengths": [0.0, 0.1, 0.2, 0.3],
        "train": train,
        "val": val,
        "penalty": fr.penalties.l1,
        "compile": False,
        "progress": False,
        **kwargs,
    }
    strengths = arguments.pop("strengths")
    with pytest.raises(ValueError, match=message):
        fr.sweep(
            small_model(), torch.nn.functional.cross_entropy, fr.adam(), strengths, **arguments
        )


def test_lambda_grid_is_scikit_learns():
    X, y = load_diabetes(return_X_y=True)
    expected = lasso_path(X - X.mean(0), y - y.mean())[0]
    got = fr.lambda_grid(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    half = fr.lambda_grid(torch.from_numpy(X), torch.from_numpy(y), n=5, l1_ratio=0.5)
    assert half[0].item() == pytest.approx(2 * got[0].item())


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


def test_plot_draws_and_saves(tmp_path):
    pytest.importorskip("matplotlib")
    train, val = classification_data()
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 0.1, 1.0],
        train=train,
        val=val,
        penalty=fr.penalties.l1,
        steps=3,
        compile=False,
        progress=False,
    )
    figure = result.plot(tmp_path / "sweep.png")
    assert len(figure.axes) == 3 and (tmp_path / "sweep.png").stat().st_size > 10_000
    X, y = load_diabetes(return_X_y=True)
    path = fr.linear_path(torch.from_numpy(X), torch.from_numpy(y), steps=10, compile=False)
    path.plot(tmp_path / "path.png")
    assert (tmp_path / "path.png").exists()


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    train, val = classification_data()
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0],
        train=train,
        val=val,
        penalty=fr.penalties.l1,
        steps=1,
        compile=False,
        progress=False,
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install \"functorch_reg\[examples\]\""):
        result.plot()
