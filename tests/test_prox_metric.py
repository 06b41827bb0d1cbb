"""Proximal steps in the optimizer's metric (``prox_metric="preconditioned"``): Adam's and
SGD-with-momentum's fixed points are scikit-learn's Lasso solution, the diagonal-metric
group prox meets its KKT conditions, and the option works with masks, the flat layout,
TorchOptimizer, sweep and hypergrad.implicit."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso

import functorch_reg as fr
from functorch_reg import prox

DTYPE = torch.float64


def diabetes():
    """Standardized diabetes data; loss (1/2n)|Xw - y|^2 is scikit-learn's Lasso's."""
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return torch.tensor(X, dtype=DTYPE), torch.tensor(y, dtype=DTYPE)


def lasso(alpha: float) -> torch.Tensor:
    X, y = diabetes()
    model = Lasso(alpha=alpha, fit_intercept=False, tol=1e-15, max_iter=200_000)
    return torch.tensor(model.fit(X.numpy(), y.numpy()).coef_, dtype=DTYPE)


def data_grad():
    X, y = diabetes()
    gram, moment = X.T @ X / len(y), X.T @ y / len(y)
    return lambda w: gram @ w - moment


ALPHA = 0.05


def train(opt, steps: int) -> torch.Tensor:
    gradient = data_grad()
    params = {"w": torch.zeros(10, dtype=DTYPE)}
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.step(params, {"w": gradient(params["w"])}, state)
    return params["w"]


def assert_is_lasso(w: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(w == 0, expected == 0), (w, expected)
    assert (w - expected).abs().max() <= 1e-6 * expected.abs().max()


# Adam --------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
def test_one_preconditioned_adam_step_keeps_the_lasso_solution(amsgrad):
    """At w*, with m = grad L(w*) (past the bias correction) and any positive v, one step
    returns w* (to 1e-12); the Euclidean prox moves it."""
    w_star = lasso(ALPHA)
    assert (w_star == 0).any() and (w_star != 0).any()
    g = data_grad()(w_star)
    second = torch.rand(10, dtype=DTYPE, generator=torch.Generator().manual_seed(0)) + 0.05
    moved = {}
    for metric in ("preconditioned", "euclidean"):
        opt = fr.adam(
            lr=0.01, amsgrad=amsgrad, prox=fr.prox.l1, prox_strength=ALPHA, prox_metric=metric
        )
        state = opt.init({"w": w_star})
        state = state._replace(
            exp_avg={"w": g.clone()},
            exp_avg_sq={"w": second.clone()},
            max_exp_avg_sq={"w": second.clone()} if amsgrad else (),
            beta_powers=torch.zeros(1, 2, dtype=DTYPE),  # many steps in: no bias correction
        )
        params, _ = opt.step({"w": w_star}, {"w": g}, state)
        moved[metric] = (params["w"] - w_star).abs().max()
    assert moved["preconditioned"] <= 1e-12
    assert moved["euclidean"] > 1e-5


@functools.cache
def prox_adam_solution() -> torch.Tensor:
    opt = fr.adam(
        lr=0.02,
        betas=(0.9, 0.99),
        prox=fr.prox.l1,
        prox_strength=ALPHA,
        prox_metric="preconditioned",
    )
    return train(opt, 800)


@pytest.mark.slow
def test_preconditioned_adam_trained_from_zero_reaches_lasso():
    expected = lasso(ALPHA)
    assert_is_lasso(prox_adam_solution(), expected)
    # The Euclidean prox after Adam's step solves another problem.
    euclidean = train(
        fr.adam(lr=0.02, betas=(0.9, 0.99), prox=fr.prox.l1, prox_strength=ALPHA), 800
    )
    assert (euclidean - expected).abs().max() > 1e-3 * expected.abs().max()


def test_preconditioned_adamw_with_zero_decay_is_adam():
    opt = fr.adamw(
        lr=0.02,
        weight_decay=0.0,
        prox=fr.prox.l1,
        prox_strength=ALPHA,
        prox_metric="preconditioned",
    )
    reference = fr.adam(lr=0.02, prox=fr.prox.l1, prox_strength=ALPHA, prox_metric="preconditioned")
    assert torch.equal(train(opt, 50), train(reference, 50))


def test_euclidean_default_is_unchanged_bit_for_bit():
    """The default equals the explicit "euclidean" and the hand-written step + prox."""
    gradient = data_grad()
    w = torch.linspace(-0.3, 0.3, 10, dtype=DTYPE)
    default = fr.adam(lr=0.1, prox=fr.prox.l1, prox_strength=0.2)
    explicit = fr.adam(lr=0.1, prox=fr.prox.l1, prox_strength=0.2, prox_metric="euclidean")
    plain = fr.adam(lr=0.1)
    outs = []
    for opt in (default, explicit, plain):
        params, _ = opt.step({"w": w}, {"w": gradient(w)}, opt.init({"w": w}))
        outs.append(params["w"])
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], fr.prox.soft_threshold(outs[2], 0.1 * 0.2))


# SGD ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "momentum, dampening, nesterov",
    [(0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.5, False)],
)
@pytest.mark.slow
def test_sgd_momentum_with_the_metric_prox_reaches_lasso(momentum, dampening, nesterov):
    """The Euclidean prox solves the problem for (1 - mu) / (1 - tau) * alpha (a tenth at
    mu = 0.9); the metric-correct one for alpha."""
    kwargs = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov)
    opt = fr.sgd(**kwargs, prox=fr.prox.l1, prox_strength=ALPHA, prox_metric="preconditioned")
    assert_is_lasso(train(opt, 500), lasso(ALPHA))
    euclidean = fr.sgd(**kwargs, prox=fr.prox.l1, prox_strength=ALPHA)
    assert_is_lasso(train(euclidean, 500), lasso((1 - momentum) / (1 - dampening) * ALPHA))


def test_sgd_without_momentum_has_one_metric():
    a = fr.sgd(lr=0.05, prox=fr.prox.l1, prox_strength=ALPHA, prox_metric="preconditioned")
    b = fr.sgd(lr=0.05, prox=fr.prox.l1, prox_strength=ALPHA)
    assert torch.equal(train(a, 30), train(b, 30))


def test_prox_metric_bad_input():
    with pytest.raises(ValueError, match="prox_metric must be"):
        fr.adam(prox=fr.prox.l1, prox_metric="adam")
    with pytest.raises(ValueError, match="pass prox="):
        fr.sgd(lr=0.1, momentum=0.9, prox_metric="preconditioned")
    with pytest.raises(ValueError, match="dampening < 1"):
        fr.sgd(lr=0.1, momentum=0.9, dampening=1.0, prox=fr.prox.l1, prox_metric="preconditioned")


# The prox in a diagonal metric ------------------------------------------------------


def group_kkt_residual(v, t, x, dim=0):
    """The largest relative KKT residual over the groups (slices along ``dim``) of
    argmin_x sum (x - v)^2 / (2 t) + sqrt(n) |x|."""
    dims = [d for d in range(v.ndim) if d != dim]
    c = math.sqrt(math.prod(v.shape[d] for d in dims))
    x_norm = x.square().sum(dims, keepdim=True).sqrt()
    v_norm = v.square().sum(dims, keepdim=True).sqrt().clamp_min(1e-300)
    live = (x - v + c * t * x / x_norm.clamp_min(1e-300)).square().sum(dims, keepdim=True)
    dead = ((v / (c * t)).square().sum(dims, keepdim=True).sqrt() - 1).clamp_min(0)
    return torch.where(x_norm > 0, live.sqrt() / v_norm, dead).max()


def test_group_prox_in_a_diagonal_metric_meets_kkt():
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(300, 6, dtype=DTYPE, generator=generator)
    v = v * torch.exp(2 * torch.randn(300, 1, dtype=DTYPE, generator=generator))
    t = 0.3 * torch.exp(4 * torch.randn(300, 6, dtype=DTYPE, generator=generator))
    # Rows 0-9 exactly at the threshold, |v / (sqrt(n) t)| = 1; rows 10-19 just above.
    c = math.sqrt(6)
    at = v[:20] / ((v[:20] / (c * t[:20])).square().sum(1, keepdim=True).sqrt())
    v[:10], v[10:20] = at[:10], at[10:20] * (1 + 1e-9)
    x = prox.group_lasso({"w": v}, t)["w"]
    assert group_kkt_residual(v, t, x) < 1e-10
    # On the threshold the group is zero up to rounding (the test |v / b| <= 1 rounds).
    assert (x[:10].abs() <= 1e-12 * v[:10].abs().amax(1, keepdim=True)).all()
    assert (x[10:20] != 0).all()
    assert (x == 0).all(1).sum() > 20 and (x != 0).all(1).sum() > 20  # both kinds elsewhere


def test_group_prox_in_a_constant_metric_is_the_closed_form():
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(50, 4, 3, dtype=DTYPE, generator=generator)
    for dim in (0, 1, None):
        closed = prox.group_lasso({"w": v}, 0.4, dim=dim)["w"]
        metric = prox.group_lasso({"w": v}, torch.full_like(v, 0.4), dim=dim)["w"]
        torch.testing.assert_close(metric, closed, rtol=1e-14, atol=1e-15)
        assert torch.equal(metric == 0, closed == 0)


@pytest.mark.compile
@pytest.mark.slow
def test_group_prox_in_a_metric_compiles_and_vmaps():
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(3, 8, 5, dtype=DTYPE, generator=generator)
    t = torch.rand(3, 8, 5, dtype=DTYPE, generator=generator)

    def one(v, t):
        return prox.group_lasso({"w": v}, t)["w"]

    looped = torch.stack([one(v[i], t[i]) for i in range(3)])
    torch.testing.assert_close(torch.vmap(one)(v, t), looped, rtol=1e-13, atol=1e-15)
    compiled = torch.compile(one, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(v[0], t[0]), looped[0], rtol=1e-13, atol=1e-15)


def test_separable_prox_in_a_metric_is_per_coordinate():
    v = torch.tensor([3.0, -0.5, 1.0, -2.0], dtype=DTYPE)
    t = torch.tensor([2.0, 0.1, 0.5, 3.0], dtype=DTYPE)
    for name in ("l1", "l2", "elastic_net"):
        operator = getattr(prox, name)
        per_coordinate = torch.stack(
            [operator({"w": v[i : i + 1]}, float(t[i]))["w"][0] for i in range(4)]
        )
        assert torch.equal(operator({"w": v}, t)["w"], per_coordinate)


def test_per_coordinate_threshold_bad_input():
    params = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="leaf 'b'"):
        prox.l1(params, torch.ones(3))
    with pytest.raises(ValueError, match="negative or non-finite"):
        prox.l1({"a": torch.ones(3)}, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        prox.group_lasso({"a": torch.ones(3, 2)}, torch.ones(3, 2, dtype=torch.int64))


# With the rest of the library --------------------------------------------------------


def model_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, dtype=DTYPE, generator=generator),
        "layer.bias": torch.randn(4, dtype=DTYPE, generator=generator),
    }


def test_mask_limits_the_metric_prox_to_selected_leaves():
    params = model_params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    opt = fr.adam(
        lr=0.1,
        mask=fr.select.weights(),
        prox=fr.prox.l1,
        prox_strength=2.0,
        prox_metric="preconditioned",
    )
    plain = fr.adam(lr=0.1)
    new, _ = opt.step(params, grads, opt.init(params))
    reference, ref_state = plain.step(params, grads, plain.init(params))
    assert torch.equal(new["layer.bias"], reference["layer.bias"])
    denom = ref_state.exp_avg_sq["layer.weight"].sqrt() / math.sqrt(1 - 0.999) + 1e-8
    expected = fr.prox.soft_threshold(reference["layer.weight"], 0.1 * 2.0 / denom)
    assert torch.equal(new["layer.weight"], expected)


def test_torch_optimizer_and_flat_layout_equal_the_functional_steps():
    functional = lambda: fr.adam(  # noqa: E731
        lr=0.05, prox=fr.prox.l1, prox_strength=0.3, prox_metric="preconditioned"
    )
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 4).double() for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    x = torch.randn(8, 3, dtype=DTYPE)
    plain = fr.TorchOptimizer(models[1].parameters(), functional())
    flat = fr.TorchOptimizer(models[2].parameters(), functional(), flat=True)
    params = {k: v.detach().clone() for k, v in models[0].named_parameters()}
    opt = functional()
    state = opt.init(params)
    for _ in range(5):
        grads = torch.func.grad(
            lambda p: torch.func.functional_call(models[0], p, (x,)).square().mean()
        )(params)
        params, state = opt.step(params, grads, state)
        for model, torch_opt in ((models[1], plain), (models[2], flat)):
            torch_opt.zero_grad()
            model(x).square().mean().backward()
            torch_opt.step()
    for model in models[1:]:
        for name, value in model.named_parameters():
            torch.testing.assert_close(value.detach(), params[name], rtol=1e-13, atol=1e-15)
    assert (params["weight"] == 0).any()


def test_sweep_over_prox_strength_equals_single_runs():
    X, y = diabetes()
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1, bias=False).double()
    opt = fr.adam(lr=0.02, prox=fr.prox.l1, prox_metric="preconditioned")
    strengths = torch.tensor([0.02, 0.1], dtype=DTYPE)
    loss_fn = lambda out, target: (out.squeeze(-1) - target).square().mean()  # noqa: E731
    result = fr.sweep(
        model,
        loss_fn,
        opt,
        strengths,
        train=(X, y),
        val=(X, y),
        hyperparameter="prox_strength",
        steps=40,
        compile=False,
        progress=False,
    )
    for i, strength in enumerate(strengths):
        single = fr.adam(
            lr=0.02, prox=fr.prox.l1, prox_metric="preconditioned", prox_strength=float(strength)
        )
        params = {"weight": model.weight.detach().clone()}
        state = single.init(params)
        for _ in range(40):
            grads = torch.func.grad(lambda p: loss_fn(X @ p["weight"].T, y))(params)
            params, state = single.step(params, grads, state)
        torch.testing.assert_close(
            fr.unstack(result.params)[i]["weight"], params["weight"], rtol=1e-12, atol=1e-14
        )


def test_hypergrad_implicit_differentiates_the_fixed_point_prox_adam_reaches():
    """prox-Adam's limit is the fixed point of T(w) = prox(w - eta grad, eta lam) that
    hypergrad.implicit differentiates: stationary there, and its hypergradient is the
    lasso's closed form on the support."""
    X, y = diabetes()
    n = len(y)
    alpha = torch.tensor(ALPHA, dtype=DTYPE)
    w = prox_adam_solution()
    X_val, y_val = X[::2], y[::2] + 0.1

    def train_loss(w, lam):
        return (X @ w - y).square().sum() / (2 * n)

    def val_loss(w):
        return (X_val @ w - y_val).square().mean()

    hypergradient = fr.hypergrad.implicit(
        train_loss, val_loss, w, alpha, prox=fr.prox.l1, step_size=0.1, stationary_tol=1e-9
    )
    # On the support S: X_S^T (X_S w_S - y) / n + alpha sign(w_S) = 0, so
    # dw_S / d alpha = -(X_S^T X_S / n)^{-1} sign(w_S).
    support = w != 0
    gram = X[:, support].T @ X[:, support] / n
    dw = torch.zeros_like(w)
    dw[support] = -torch.linalg.solve(gram, w[support].sign())
    expected = torch.func.grad(val_loss)(w) @ dw
    torch.testing.assert_close(hypergradient, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("penalty", ["l1", "group_lasso"])
def test_flat_buffers_with_the_metric_prox_equal_per_leaf(penalty):
    """Adam's metric prox on flat buffers (l1 directly, group_lasso through
    flat.leafwise, which splits the buffer-shaped threshold) equals the per-leaf run."""
    params = model_params()
    params["head.weight"] = torch.randn(
        2, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(3)
    )
    flat = fr.flat.pack(params, {"decay": fr.select.weights(), "no_decay": "*.bias"})
    per_leaf_prox = getattr(fr.prox, penalty)
    flat_prox = per_leaf_prox if penalty == "l1" else fr.flat.leafwise(flat, per_leaf_prox)
    make = lambda prox, mask: fr.adam(  # noqa: E731
        lr=0.1, prox=prox, prox_strength=0.5, prox_metric="preconditioned", mask=mask
    )
    opt, flat_opt = make(per_leaf_prox, fr.select.weights()), make(flat_prox, "decay")
    x = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(4))

    def objective(p):
        hidden = torch.tanh(x @ p["layer.weight"].T + p["layer.bias"])
        return (hidden @ p["head.weight"].T).sin().sum()

    state, flat_state = opt.init(params), flat_opt.init(flat.buffers)
    for _ in range(6):
        params, state = opt.step(params, torch.func.grad(objective)(params), state)
        grads = torch.func.grad(lambda b: objective(flat.unpack(b)))(flat.buffers)
        flat_opt.step_(flat.buffers, grads, flat_state)
    for name, leaf in params.items():
        torch.testing.assert_close(flat.params[name], leaf, rtol=1e-13, atol=1e-15)
    assert (params["layer.weight"] == 0).any()


@pytest.mark.slow
def test_adam_with_the_metric_group_prox_reaches_the_group_lasso_solution():
    """Adam's metric group prox (no closed form) converges to the point that proximal
    gradient descent (ISTA, Euclidean and exact) reaches: the group lasso solution."""
    gradient = data_grad()
    lam = 0.08

    def run(opt, steps):
        params = {"w": torch.zeros(5, 2, dtype=DTYPE)}
        state = opt.init(params)
        for _ in range(steps):
            grads = {"w": gradient(params["w"].flatten()).view(5, 2)}
            params, state = opt.step(params, grads, state)
        return params["w"]

    ista = run(fr.sgd(lr=0.2, prox=fr.prox.group_lasso, prox_strength=lam), 3000)
    adam = run(
        fr.adam(
            lr=0.02,
            betas=(0.9, 0.99),
            prox=fr.prox.group_lasso,
            prox_strength=lam,
            prox_metric="preconditioned",
        ),
        800,
    )
    zero_rows = (ista == 0).all(1)
    assert zero_rows.any() and not zero_rows.all()
    assert torch.equal((adam == 0).all(1), zero_rows)
    assert (adam - ista).abs().max() <= 1e-6 * ista.abs().max()
