"""Each prox satisfies its optimality condition and beats brute-force candidates."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from functorch_reg import penalties, prox

from .conftest import mlp_params

# prox, its penalty, keyword arguments
PAIRS = {
    "l1": (prox.l1, penalties.l1, {}),
    "l2": (prox.l2, penalties.l2, {}),
    "elastic_net": (prox.elastic_net, penalties.elastic_net, {"l1_ratio": 0.4}),
    "group_lasso": (prox.group_lasso, penalties.group_lasso, {"dim": 0}),
    "group_lasso_whole": (prox.group_lasso, penalties.group_lasso, {"dim": None}),
}


def objective(x, v, threshold, penalty, kwargs):
    """0.5 * ||x - v||^2 + t * P(x), the problem every prox solves."""
    squared = sum(((x[k] - v[k]) ** 2).sum() for k in v)
    return 0.5 * squared + threshold * penalty(x, **kwargs)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 2.0])
def test_prox_beats_brute_force_candidates(name, threshold):
    operator, penalty, kwargs = PAIRS[name]
    generator = torch.Generator().manual_seed(0)
    v = {"w": torch.randn(3, 2, generator=generator, dtype=torch.float64)}
    x = operator(v, threshold, **kwargs)
    best = objective(x, v, threshold, penalty, kwargs)
    # Random candidates around x and around v, plus the all-zero point.
    candidates = [{"w": torch.zeros(3, 2, dtype=torch.float64)}]
    for scale in (1e-3, 1e-1, 1.0):
        for center in (x, v):
            for _ in range(200):
                noise = scale * torch.randn(3, 2, generator=generator, dtype=torch.float64)
                candidates.append({"w": center["w"] + noise})
    for candidate in candidates:
        assert best <= objective(candidate, v, threshold, penalty, kwargs) + 1e-12


def test_l1_matches_a_fine_grid_search_on_scalars():
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    for v_value in (-2.5, -0.4, 0.0, 0.7, 1.9):
        t = 0.8
        values = 0.5 * (grid - v_value) ** 2 + t * grid.abs()
        expected = grid[values.argmin()].item()
        got = prox.l1({"w": torch.tensor([v_value], dtype=torch.float64)}, t)["w"].item()
        assert got == pytest.approx(expected, abs=1e-4)


def l1_subgradient_residual(x, smooth, t):
    """Largest distance of 0 from ``smooth + t * d|x|`` (elementwise subdifferential)."""
    r = smooth
    nonzero = x != 0
    residual = torch.where(nonzero, (r + t * x.sign()).abs(), (r.abs() - t).clamp_min(0))
    return residual.max()


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@given(shapes, st.floats(0.0, 3.0), st.integers(0, 2**16))
def test_l1_optimality_condition(shape, t, seed):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = prox.l1(v, t)
    assert l1_subgradient_residual(x, x - v, t) <= 1e-12
    assert torch.equal(x == 0, v.abs() <= t), "exact zeros exactly where |v| <= t"


@given(shapes, st.floats(0.0, 3.0), st.integers(0, 2**16))
def test_l2_optimality_condition(shape, t, seed):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = prox.l2(v, t)
    torch.testing.assert_close(x - v + 2 * t * x, torch.zeros_like(v), atol=1e-12, rtol=0)


@given(shapes, st.floats(0.0, 3.0), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_elastic_net_optimality_condition(shape, t, ratio, seed):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = prox.elastic_net(v, t, l1_ratio=ratio)
    assert l1_subgradient_residual(x, x - v + t * (1 - ratio) * x, t * ratio) <= 1e-12


@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple),
    st.floats(0.0, 3.0),
    st.integers(0, 2**16),
    st.sampled_from([0, 1, None]),
)
def test_group_lasso_optimality_condition(shape, t, seed, dim):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = prox.group_lasso(v, t, dim=dim)
    groups_v = [v.flatten()] if dim is None else [g.flatten() for g in v.movedim(dim, 0)]
    groups_x = [x.flatten()] if dim is None else [g.flatten() for g in x.movedim(dim, 0)]
    for gv, gx in zip(groups_v, groups_x, strict=True):
        weight = t * math.sqrt(gv.numel())
        if gx.norm() == 0:
            assert gv.norm() <= weight + 1e-12, "a zeroed group must have ||v_g|| <= t sqrt(|g|)"
        else:
            torch.testing.assert_close(gx - gv + weight * gx / gx.norm(), torch.zeros_like(gx))


def test_group_lasso_zeroes_whole_rows_exactly():
    v = torch.tensor([[0.1, -0.1, 0.05], [3.0, 1.0, -2.0]], dtype=torch.float64)
    x = prox.group_lasso({"w": v}, 0.2)["w"]
    assert torch.equal(x[0], torch.zeros(3, dtype=torch.float64))
    assert (x[1] != 0).all()


def test_where_leaves_other_leaves_untouched():
    params = mlp_params()
    out = prox.l1(params, 10.0, where="0.*")
    assert (out["0.weight"] == 0).all() and (out["0.bias"] == 0).all()
    assert out["2.weight"] is params["2.weight"] and out["2.bias"] is params["2.bias"]


def test_non_floating_leaves_pass_through():
    params = {"w": torch.randn(3), "steps": torch.tensor([4])}
    assert prox.l1(params, 0.5)["steps"] is params["steps"]


def test_vmap_over_thresholds_equals_a_loop():
    params = mlp_params(torch.float64)
    thresholds = torch.tensor([0.0, 0.1, 0.5, 2.0], dtype=torch.float64)
    for name, (operator, _, kwargs) in PAIRS.items():
        batched = vmap(functools.partial(operator, **kwargs), in_dims=(None, 0))(params, thresholds)
        for i, t in enumerate(thresholds):
            expected = operator(params, t, **kwargs)
            torch.testing.assert_close({k: v[i] for k, v in batched.items()}, expected, msg=name)


def test_tensor_and_float_thresholds_agree():
    params = mlp_params(torch.float64)
    for operator, _, kwargs in PAIRS.values():
        torch.testing.assert_close(
            operator(params, torch.tensor(0.3, dtype=torch.float64), **kwargs),
            operator(params, 0.3, **kwargs),
        )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: prox.l1(mlp_params(), -0.1), ValueError, "threshold=-0.1"),
        (lambda: prox.l2(mlp_params(), float("nan")), ValueError, "threshold=nan"),
        (lambda: prox.l1(mlp_params(), torch.ones(3)), ValueError, "scalar"),
        (lambda: prox.l1(mlp_params(), torch.tensor(1)), TypeError, "floating-point"),
        (lambda: prox.elastic_net(mlp_params(), 0.1, l1_ratio=-1.0), ValueError, "l1_ratio"),
        (lambda: prox.group_lasso(mlp_params(), 0.1, dim=1), ValueError, "group dim=1"),
        (lambda: prox.l1(mlp_params(), 0.1, where="enc*"), ValueError, "matches no"),
    ],
)
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("scale, threshold", [(1e20, 1e20), (1e-25, 1e-26)])
@pytest.mark.parametrize("dim", [0, None])
def test_group_lasso_neither_overflows_nor_underflows_in_float32(scale, threshold, dim):
    v = torch.tensor([[3.0, 4.0]]) * scale
    exact = prox.group_lasso({"v": v.double()}, threshold, dim=dim)["v"]
    assert 0.5 < (exact / v.double()).min() < 0.99
    torch.testing.assert_close(
        prox.group_lasso({"v": v}, threshold, dim=dim)["v"].double(), exact, rtol=1e-6, atol=0
    )


@given(
    st.floats(1e-3, 1e3),
    st.sampled_from(["float", "tensor32", "tensor64"]),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_group_lasso_gives_exact_zeros_at_the_threshold(value, threshold_type, dtype):
    """A one-element group whose norm equals the threshold, as prox.l1 gives."""
    v = torch.tensor([value], dtype=dtype)
    threshold = {
        "float": v.item(),
        "tensor32": v.float()[0],
        "tensor64": v.double()[0],
    }[threshold_type]
    if float(threshold) < v.abs().item():  # float32 rounding moved it below |v|
        return
    assert prox.group_lasso(v, threshold, dim=0).eq(0).all()
    assert prox.l1(v, threshold).eq(0).all()


def test_group_lasso_at_the_reported_threshold_is_exactly_zero():
    v = torch.tensor([2.733564933062235], dtype=torch.float64)
    assert prox.group_lasso(v, 2.733564933062235, dim=0).item() == 0.0
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = prox.group_lasso(rows, 5.0 / math.sqrt(2), dim=0)
    assert out[0].eq(0).all() and out[1].eq(0).all()


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
@pytest.mark.parametrize("dim", [0, None])
def test_group_lasso_of_an_empty_leaf_is_the_empty_leaf(shape, dim):
    v = torch.empty(shape)
    out = prox.group_lasso({"v": v}, 0.5, dim=dim)["v"]
    assert out.shape == v.shape


@pytest.mark.parametrize("name", ["l1", "l2", "elastic_net", "group_lasso"])
def test_a_negative_cpu_tensor_threshold_is_refused(name):
    with pytest.raises(ValueError, match="threshold=-0.5"):
        getattr(prox, name)({"w": torch.ones(2, 2)}, torch.tensor(-0.5))
