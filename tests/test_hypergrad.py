"""Hypergradients against closed forms, scikit-learn and finite differences, in float64."""

from __future__ import annotations

import functools
import math
import warnings

import optree
import pytest
import torch
from sklearn.linear_model import Lasso
from torch._dynamo.testing import CompileCounterWithBackend

import functorch_reg as fr

F64 = torch.float64


def regression(n: int = 40, d: int = 6, seed: int = 0, sparse: bool = False):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=F64)
    truth = torch.randn(d, generator=generator, dtype=F64)
    if sparse:
        truth[d // 2 :] = 0
    y = X @ truth + 0.5 * torch.randn(n, generator=generator, dtype=F64)
    X_val = torch.randn(n, d, generator=generator, dtype=F64)
    y_val = X_val @ truth + 0.5 * torch.randn(n, generator=generator, dtype=F64)
    return X, y, X_val, y_val


def mse(inputs, targets):
    return lambda w: (inputs @ w - targets).square().mean()


def central_difference(fn, strengths: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    flat = strengths.reshape(-1)
    out = torch.empty_like(flat)
    for i in range(len(flat)):
        step = torch.zeros_like(flat)
        step[i] = h
        up = fn((flat + step).reshape(strengths.shape))
        down = fn((flat - step).reshape(strengths.shape))
        out[i] = (up - down) / (2 * h)
    return out.reshape(strengths.shape)


def minimize(loss, params: dict) -> dict:
    """A minimizer to float64 precision: L-BFGS, then Newton steps on the flat vector."""
    names = list(params)
    sizes = [params[k].numel() for k in names]
    shapes = [params[k].shape for k in names]

    def objective(vector):
        parts = vector.split(sizes)
        return loss({k: part.view(shape) for k, part, shape in zip(names, parts, shapes)})

    vector = torch.cat([params[k].reshape(-1) for k in names]).clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS([vector], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = objective(vector)
        value.backward()
        return value

    lbfgs.step(closure)
    vector = vector.detach()
    for _ in range(6):
        gradient = torch.func.grad(objective)(vector)
        vector = vector - torch.linalg.solve(torch.func.hessian(objective)(vector), gradient)
    assert torch.func.grad(objective)(vector).norm() < 1e-11
    parts = vector.split(sizes)
    return {k: part.view(shape) for k, part, shape in zip(names, parts, shapes)}


def proximal_gradient(train, prox, w, lam, step, iterations=20_000):
    """Proximal gradient descent (on any pytree) until the iterate stops changing."""
    for _ in range(iterations // 50):
        previous = w
        for _ in range(50):
            grads = torch.func.grad(train)(w, lam)
            w = prox(optree.tree_map(lambda p, g: p - step * g, w, grads), step * lam)
        gaps = optree.tree_map(lambda a, b: (a - b).abs().max(), w, previous)
        if max(optree.tree_leaves(gaps)) < 1e-15:
            break
    return w


# ---------------------------------------------------------------------------------------
# implicit, smooth penalties: ridge


def test_ridge_one_strength_matches_closed_form():
    X, y, X_val, y_val = regression()
    n, d = X.shape
    lam = torch.tensor(0.3, dtype=F64)
    hessian = 2 * X.T @ X / n + 2 * lam * torch.eye(d, dtype=F64)
    w = torch.linalg.solve(hessian, 2 * X.T @ y / n)

    def train(params, lam):
        return mse(X, y)(params["w"]) + lam * fr.penalties.l2(params)

    val = lambda params: mse(X_val, y_val)(params["w"])  # noqa: E731
    dw = -torch.linalg.solve(hessian, 2 * w)  # dw/dlam = -H^-1 (2 w)
    expected = torch.func.grad(mse(X_val, y_val))(w) @ dw
    got = fr.hypergrad.implicit(train, val, {"w": w}, lam)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_ridge_strength_per_block_with_where_matches_closed_form():
    X, y, X_val, y_val = regression(d=7)
    n, d = X.shape
    k = 3
    strengths = torch.tensor([0.05, 0.8], dtype=F64)
    block = torch.cat([torch.zeros(k), torch.ones(d - k)]).to(F64)
    per_coef = strengths[0] * (1 - block) + strengths[1] * block
    hessian = 2 * X.T @ X / n + 2 * torch.diag(per_coef)
    w = torch.linalg.solve(hessian, 2 * X.T @ y / n)
    params = {"first": w[:k], "second": w[k:]}

    def train(params, lam):
        coef = torch.cat([params["first"], params["second"]])
        penalty = lam[0] * fr.penalties.l2(params, where="first")
        return mse(X, y)(coef) + penalty + lam[1] * fr.penalties.l2(params, where="second")

    def val(params):
        return mse(X_val, y_val)(torch.cat([params["first"], params["second"]]))

    val_grad = torch.func.grad(mse(X_val, y_val))(w)
    expected = torch.stack(
        [val_grad @ -torch.linalg.solve(hessian, 2 * w * mask) for mask in (1 - block, block)]
    )
    got = fr.hypergrad.implicit(train, val, params, strengths)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    normal = fr.hypergrad.implicit(train, val, params, strengths, solver="normal_cg")
    torch.testing.assert_close(normal, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------
# implicit, proximal penalties: lasso at scikit-learn's solution, group lasso


def lasso_problem(alpha: float = 0.1):
    X, y, X_val, y_val = regression(n=60, d=8, seed=1, sparse=True)
    n = len(X)
    model = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
    model.fit(X.numpy(), y.numpy())
    w = torch.tensor(model.coef_, dtype=F64)
    # scikit-learn's objective: |y - Xw|^2 / (2 n) + alpha |w|_1; the smooth part goes in
    # train_loss, the l1 part in the prox.
    train = lambda w, lam: (X @ w - y).square().sum() / (2 * n)  # noqa: E731
    step = 1 / torch.linalg.matrix_norm(X, ord=2).item() ** 2 * n
    return X, w, train, mse(X_val, y_val), step


def test_lasso_at_sklearn_solution_matches_active_set_form():
    alpha = 0.1
    X, w, train, val, step = lasso_problem(alpha)
    active = w != 0
    assert 0 < active.sum() < len(w), "the test needs zeros and nonzeros"
    n = len(X)
    X_active = X[:, active]
    dw_active = -torch.linalg.solve(X_active.T @ X_active / n, w[active].sign())
    expected = torch.func.grad(val)(w)[active] @ dw_active
    lam = torch.tensor(alpha, dtype=F64)
    got = fr.hypergrad.implicit(train, val, w, lam, prox=fr.prox.l1, step_size=step)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
    normal = fr.hypergrad.implicit(
        train, val, w, lam, prox=fr.prox.l1, step_size=step, solver="normal_cg"
    )
    torch.testing.assert_close(normal, expected, rtol=1e-6, atol=1e-9)


def group_lasso_problem():
    X, y, X_val, y_val = regression(n=50, d=8, seed=2)
    n = len(X)
    y = X[:, :4] @ torch.tensor([1.0, -1.0, 0.5, 0.3], dtype=F64) + 0.3 * y
    train = lambda w, lam: (X @ w - y).square().sum() / (2 * n)  # noqa: E731
    step = 1 / torch.linalg.matrix_norm(X, ord=2).item() ** 2 * n
    prox = functools.partial(fr.prox.group_lasso, dim=0)  # rows of a (4, 2) weight
    flat_prox = lambda w, t: prox(w.view(4, 2), t).reshape(-1)  # noqa: E731
    return train, flat_prox, mse(X_val, y_val), step


@pytest.mark.slow
def test_group_lasso_normal_cg_matches_finite_differences():
    train, prox, val, step = group_lasso_problem()
    lam = torch.tensor(0.15, dtype=F64)
    w = proximal_gradient(train, prox, torch.zeros(8, dtype=F64), lam, step)
    groups = w.view(4, 2).norm(dim=1)
    assert (groups == 0).any() and (groups > 0).sum() >= 2, "the test needs both kinds"

    def val_at(lam):
        return val(proximal_gradient(train, prox, w, lam, step))

    expected = central_difference(val_at, lam)
    got = fr.hypergrad.implicit(train, val, w, lam, prox=prox, step_size=step, solver="normal_cg")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    # Plain CG on this non-symmetric system would be silently wrong: it is refused.
    with pytest.raises(ValueError, match="normal_cg"):
        fr.hypergrad.implicit(train, val, w, lam, prox=prox, step_size=step)


@pytest.mark.slow
def test_l1_with_where_and_a_strength_per_leaf_matches_finite_differences():
    X, y, X_val, y_val = regression(n=60, d=8, seed=3, sparse=True)
    n = len(X)

    def split(params):
        return torch.cat([params["a"], params["b"], params["bias"]])

    def train(params, lam):
        return (X @ split(params)[:8] + split(params)[8] - y).square().sum() / (2 * n)

    def val(params):
        return (X_val @ split(params)[:8] + split(params)[8] - y_val).square().mean()

    def prox(params, threshold):  # one strength per leaf; the bias is not penalized
        params = fr.prox.l1(params, threshold[0], where="a")
        return fr.prox.l1(params, threshold[1], where="b")

    step = 1 / (torch.linalg.matrix_norm(X, ord=2).item() ** 2 / n + 1)
    strengths = torch.tensor([0.05, 0.2], dtype=F64)
    zeros = {"a": torch.zeros(4, dtype=F64), "b": torch.zeros(4, dtype=F64)}
    start = {**zeros, "bias": torch.zeros(1, dtype=F64)}

    def solve(lam, params=start):
        return proximal_gradient(train, prox, params, lam, step)

    params = solve(strengths)
    coef = torch.cat([params["a"], params["b"]])
    assert (coef == 0).any() and (coef != 0).sum() >= 2
    expected = central_difference(lambda lam: val(solve(lam, params)), strengths)
    got = fr.hypergrad.implicit(train, val, params, strengths, prox=prox, step_size=step)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# implicit on a small MLP, against finite differences of retrained minimizers


@pytest.mark.slow
def test_mlp_per_layer_l2_matches_finite_differences():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(30, 3, generator=generator, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    x_val = torch.randn(30, 3, generator=generator, dtype=F64)
    y_val = torch.sin(x_val.sum(1, keepdim=True))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.to(F64)
    start = {k: v.detach() for k, v in model.named_parameters()}

    def data_loss(params, x, y):
        return (torch.func.functional_call(model, params, (x,)) - y).square().mean()

    def train(params, lam):
        penalty = lam[0] * fr.penalties.l2(params, where="0.weight")
        return data_loss(params, x, y) + penalty + lam[1] * fr.penalties.l2(params, where="2.*")

    val = functools.partial(data_loss, x=x_val, y=y_val)
    strengths = torch.tensor([0.002, 0.005], dtype=F64)
    params = minimize(lambda p: train(p, strengths), start)
    assert params["0.weight"].abs().min() > 1e-3  # no collapsed unit: a strict minimum

    def val_at(lam):
        return val(minimize(lambda p: train(p, lam), params))

    got = fr.hypergrad.implicit(train, val, params, strengths, stationary_tol=1e-7)
    # The smallest Hessian eigenvalue is about 6e-4: a larger h has truncation error, a
    # smaller one amplifies the minimizer's own error.
    expected = central_difference(val_at, strengths, h=1e-5)
    torch.testing.assert_close(got, expected, rtol=5e-4, atol=1e-7)
    # And exactly the dense formula -(d grad / d lam)^T H^-1 grad val.
    names = list(params)
    vector = torch.cat([params[k].reshape(-1) for k in names])
    sizes, shapes = [params[k].numel() for k in names], [params[k].shape for k in names]

    def tree(v):
        return {k: part.view(shape) for k, part, shape in zip(names, v.split(sizes), shapes)}

    hessian = torch.func.hessian(lambda v: train(tree(v), strengths))(vector)
    cross = torch.func.jacrev(lambda lam: torch.func.grad(lambda v: train(tree(v), lam))(vector))(
        strengths
    )
    val_grad = torch.func.grad(lambda v: val(tree(v)))(vector)
    dense = -cross.T @ torch.linalg.solve(hessian, val_grad)
    torch.testing.assert_close(got, dense, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------------
# unrolled


def mlp_problem(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, generator=generator, dtype=F64)
    y = torch.cos(x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)).unsqueeze(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.to(F64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def data_loss(params, rows):
        out = torch.func.functional_call(model, params, (x[rows],))
        return (out - y[rows]).square().mean()

    def train(params, lam):
        decay = lam[0] * fr.penalties.l2(params, where="0.weight")
        return data_loss(params, slice(0, 16)) + decay + lam[1] * fr.penalties.l1(params)

    return params, train, functools.partial(data_loss, rows=slice(16, 24))


def run_optimizer(train, params, lam, optimizer, steps):
    state = optimizer.init(params)
    for _ in range(steps):
        params, state = optimizer.step(params, torch.func.grad(train)(params, lam), state)
    return params


@pytest.mark.parametrize(
    "optimizer",
    [
        fr.sgd(lr=0.05, momentum=0.9),
        fr.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        fr.adam(lr=1e-2),
    ],
    ids=["sgd_momentum", "sgd_nesterov", "adam"],
)
@pytest.mark.slow
def test_unrolled_matches_central_differences(optimizer):
    params, train, val = mlp_problem()
    strengths = torch.tensor([0.02, 0.01], dtype=F64)
    steps = 15
    expected = central_difference(
        lambda lam: val(run_optimizer(train, params, lam, optimizer, steps)), strengths, h=1e-6
    )
    hyper, trained = fr.hypergrad.unrolled(train, val, params, strengths, optimizer, steps)
    torch.testing.assert_close(hyper, expected, rtol=1e-6, atol=1e-10)
    reference = run_optimizer(train, params, strengths, optimizer, steps)
    for name in params:
        assert torch.equal(trained[name], reference[name])
        assert not trained[name].requires_grad
    checkpointed, trained_again = fr.hypergrad.unrolled(
        train, val, params, strengths, optimizer, steps, checkpoint=True
    )
    torch.testing.assert_close(checkpointed, hyper, rtol=1e-10, atol=1e-14)
    for name in params:
        assert torch.equal(trained_again[name], reference[name])


def test_unrolled_on_linear_regression_matches_closed_form_after_one_step():
    # One SGD step from w0: w1 = w0 - lr (grad f(w0) + 2 lam w0), so dw1/dlam = -2 lr w0.
    X, y, X_val, y_val = regression()
    w0 = torch.linspace(-1, 1, X.shape[1], dtype=F64)
    lam = torch.tensor(0.3, dtype=F64)
    train = lambda w, lam: mse(X, y)(w) + lam * w.square().sum()  # noqa: E731
    hyper, w1 = fr.hypergrad.unrolled(train, mse(X_val, y_val), w0, lam, fr.sgd(lr=0.1), 1)
    expected = torch.func.grad(mse(X_val, y_val))(w1) @ (-2 * 0.1 * w0)
    torch.testing.assert_close(hyper, expected, rtol=1e-12, atol=1e-14)


def test_unrolled_adam_with_a_zero_gradient_entry_warns_about_nan():
    # A weight with an exactly zero gradient keeps Adam's v at 0, where sqrt has an
    # infinite derivative: the hypergradient is NaN and the warning says why.
    X, y, X_val, y_val = regression()
    X = X.clone()
    X[:, 0] = 0
    train = lambda w, lam: mse(X, y)(w) + lam * w[1:].square().sum()  # noqa: E731
    w0 = torch.zeros(X.shape[1], dtype=F64)
    lam = torch.tensor(0.1, dtype=F64)
    with pytest.warns(RuntimeWarning, match="sqrt"):
        hyper, _ = fr.hypergrad.unrolled(train, mse(X_val, y_val), w0, lam, fr.adam(lr=0.1), 3)
    assert torch.isnan(hyper)


# ---------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.compile
@pytest.mark.slow
def test_implicit_compiles_as_one_graph_and_matches_eager():
    X, y, X_val, y_val = regression(n=12, d=3)
    n, d = X.shape
    train = lambda w, lam: mse(X, y)(w) + lam * w.square().sum()  # noqa: E731
    val = mse(X_val, y_val)
    lam = torch.tensor(0.2, dtype=F64)
    hessian = 2 * X.T @ X / n + 2 * lam * torch.eye(d, dtype=F64)
    w = torch.linalg.solve(hessian, 2 * X.T @ y / n)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(
        lambda w, lam: fr.hypergrad.implicit(train, val, w, lam, maxiter=4),
        backend=counter,
        fullgraph=True,
    )
    eager = fr.hypergrad.implicit(train, val, w, lam, maxiter=4)
    torch.testing.assert_close(compiled(w, lam), eager, rtol=1e-10, atol=1e-12)
    # Dynamo may restart its first analysis once to turn the 0-d float64 strength into a
    # tensor input, which the counter sees as a second frame; what matters is that a new
    # strength compiles nothing.
    first_compile = counter.frame_count
    assert first_compile in (1, 2)
    torch.testing.assert_close(
        compiled(w, lam * 1.5),
        fr.hypergrad.implicit(train, val, w, lam * 1.5, maxiter=4, stationary_tol=math.inf),
        rtol=1e-10,
        atol=1e-12,
    )
    assert counter.frame_count == first_compile


# ---------------------------------------------------------------------------------------
# tune


@pytest.mark.slow
def test_tune_moves_strengths_downhill_and_records_history():
    X, y, X_val, y_val = regression(n=30, d=10, seed=6)
    w0 = torch.zeros(10, dtype=F64)
    # Far too strong a penalty: tuning must lower it and the validation loss.
    strengths = torch.tensor([10.0, 10.0], dtype=F64)

    def train(w, lam):
        return mse(X, y)(w) + lam[0] * w[:5].square().sum() + lam[1] * w[5:].square().sum()

    val = mse(X_val, y_val)
    for method in ("implicit", "unrolled"):
        result = fr.hypergrad.tune(
            train,
            val,
            w0,
            strengths,
            fr.sgd(lr=0.02),
            rounds=20,
            steps_per_round=10,
            hyper_lr=0.2,
            method=method,
            progress=False,
        )
        history = result.history
        assert result.train_steps == 200
        assert history.train_steps.tolist() == list(range(0, 201, 10))
        assert history.strengths.shape == (21, 2) and history.val_loss.shape == (21,)
        assert history.hypergradient.shape == (20, 2)
        assert (result.strengths < strengths / 5).all(), method
        assert history.val_loss[-1] < 0.5 * history.val_loss[1], method
        torch.testing.assert_close(history.strengths[-1], result.strengths)


def test_tune_plot(tmp_path):
    pytest.importorskip("matplotlib")
    w0 = torch.zeros(3, dtype=F64)
    train = lambda w, lam: (w - 1).square().sum() + lam * w.square().sum()  # noqa: E731
    result = fr.hypergrad.tune(
        train,
        lambda w: (w - 1).square().sum(),
        w0,
        torch.tensor(1.0, dtype=F64),
        fr.sgd(lr=0.1),
        rounds=3,
        steps_per_round=2,
        progress=False,
    )
    path = tmp_path / "tune.png"
    result.plot(str(path))
    assert path.stat().st_size > 5_000


# ---------------------------------------------------------------------------------------
# warnings and bad input


def ridge():
    X, y, X_val, y_val = regression()
    n, d = X.shape
    lam = torch.tensor(0.3, dtype=F64)
    train = lambda w, lam: mse(X, y)(w) + lam * w.square().sum()  # noqa: E731
    hessian = 2 * X.T @ X / n + 2 * lam * torch.eye(d, dtype=F64)
    return train, mse(X_val, y_val), torch.linalg.solve(hessian, 2 * X.T @ y / n), lam


def test_warns_when_params_are_not_stationary():
    train, val, w, lam = ridge()
    with pytest.warns(RuntimeWarning, match="not a stationary point.*gradient norm is"):
        fr.hypergrad.implicit(train, val, w + 0.1, lam)


def test_warns_when_params_are_not_a_fixed_point_of_the_prox_map():
    _, w, train, val, step = lasso_problem()
    lam = torch.tensor(0.1, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"\|T\(w\) - w\| / step_size is"):
        fr.hypergrad.implicit(train, val, w + 0.05, lam, prox=fr.prox.l1, step_size=step)


def test_warns_with_the_residual_when_cg_does_not_converge():
    train, val, w, lam = ridge()
    with pytest.warns(RuntimeWarning, match="did not converge in maxiter=2 .*relative residual"):
        fr.hypergrad.implicit(train, val, w, lam, maxiter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.hypergrad.implicit(train, val, w, lam)  # converges: silent


def test_cg_keeps_its_best_iterate_on_an_indefinite_hessian():
    # A saddle: CG meets negative curvature and must not return garbage.
    A = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=F64))
    train = lambda w, lam: 0.5 * w @ A @ w + lam * w.square().sum()  # noqa: E731
    val = lambda w: w @ torch.tensor([1.0, 1.0, 1.0], dtype=F64)  # noqa: E731
    w = torch.zeros(3, dtype=F64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        hyper = fr.hypergrad.implicit(train, val, w, torch.tensor(0.0, dtype=F64))
    assert torch.isfinite(hyper)


@pytest.mark.parametrize(
    "strengths",
    [torch.tensor(1), torch.tensor([1, 2]), 0.5],
    ids=["int", "int_vector", "float"],
)
def test_strengths_must_be_a_floating_tensor(strengths):
    train, val, w, _ = ridge()
    with pytest.raises(TypeError, match="strengths must be a floating-point tensor"):
        fr.hypergrad.implicit(train, val, w, strengths)
    with pytest.raises(TypeError, match="strengths must be a floating-point tensor"):
        fr.hypergrad.unrolled(train, val, w, strengths, fr.sgd(lr=0.1), 2)


def test_prox_without_step_size_is_an_error():
    train, val, w, lam = ridge()
    with pytest.raises(ValueError, match="prox needs step_size"):
        fr.hypergrad.implicit(train, val, w, lam, prox=fr.prox.l1)


def test_non_scalar_val_loss_is_an_error():
    train, _, w, lam = ridge()
    with pytest.raises(ValueError, match=r"val_loss must return a floating 0-d tensor, got \(6,\)"):
        fr.hypergrad.implicit(train, lambda w: w.square(), w, lam)
    with pytest.raises(ValueError, match="val_loss must return a floating 0-d tensor"):
        fr.hypergrad.unrolled(train, lambda w: w.square(), w, lam, fr.sgd(lr=0.1), 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "gmres"}, "solver must be"),
        ({"maxiter": 0}, "maxiter must be a positive int"),
        ({"tol": -1.0}, "tol must be"),
        ({"damping": math.nan}, "damping must be"),
    ],
)
def test_bad_solver_settings(kwargs, match):
    train, val, w, lam = ridge()
    with pytest.raises(ValueError, match=match):
        fr.hypergrad.implicit(train, val, w, lam, **kwargs)


def test_bad_tune_and_unrolled_settings():
    train, val, w, lam = ridge()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fr.hypergrad.unrolled(train, val, w, lam, fr.sgd(lr=0.1), 0)
    with pytest.raises(ValueError, match="strengths must be positive"):
        fr.hypergrad.tune(
            train, val, w, lam * 0, fr.sgd(lr=0.1), rounds=1, steps_per_round=1, progress=False
        )
    with pytest.raises(ValueError, match="method must be"):
        fr.hypergrad.tune(
            train, val, w, lam, fr.sgd(lr=0.1), rounds=1, steps_per_round=1, method="x"
        )
