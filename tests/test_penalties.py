"""Each penalty against a naive per-element reference and autograd (float64 gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

import functorch_reg as fr
from functorch_reg import penalties

from .conftest import mlp_params


def naive_l1(params):
    return sum(abs(x) for leaf in params.values() for x in leaf.flatten().tolist())


def naive_l2(params):
    return sum(x * x for leaf in params.values() for x in leaf.flatten().tolist())


def naive_group_lasso(params, dim):
    total = 0.0
    for leaf in params.values():
        groups = [leaf.flatten()] if dim is None else list(leaf.movedim(dim, 0))
        for group in groups:
            entries = group.flatten().tolist()
            total += math.sqrt(len(entries)) * math.sqrt(sum(x * x for x in entries))
    return total


def naive_orthogonal(params):
    total = 0.0
    for leaf in params.values():
        rows = leaf.reshape(leaf.shape[0], -1).tolist()
        if len(rows) > len(rows[0]):
            rows = [list(column) for column in zip(*rows)]
        for i, row_i in enumerate(rows):
            for j, row_j in enumerate(rows):
                dot = sum(a * b for a, b in zip(row_i, row_j))
                total += (dot - (1.0 if i == j else 0.0)) ** 2
    return total


def weights_of(params):
    return {name: leaf for name, leaf in params.items() if leaf.ndim >= 2}


CASES = {
    "l1": (penalties.l1, {}, naive_l1),
    "l2": (penalties.l2, {}, naive_l2),
    "elastic_net": (
        penalties.elastic_net,
        {"l1_ratio": 0.3},
        lambda p: 0.3 * naive_l1(p) + 0.7 / 2 * naive_l2(p),
    ),
    "group_lasso_rows": (penalties.group_lasso, {}, lambda p: naive_group_lasso(p, 0)),
    "group_lasso_whole": (
        penalties.group_lasso,
        {"dim": None},
        lambda p: naive_group_lasso(p, None),
    ),
    "l2_sp": (
        lambda p, where=None: penalties.l2_sp(p, mlp_params(torch.float64, seed=1), where=where),
        {},
        lambda p: naive_l2({k: v - mlp_params(torch.float64, seed=1)[k] for k, v in p.items()}),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_penalty_matches_naive_reference(case):
    penalty, kwargs, reference = CASES[case]
    params = mlp_params(torch.float64)
    value = penalty(params, **kwargs)
    assert value.ndim == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(reference(params), rel=1e-12)


def test_orthogonal_matches_naive_reference_on_wide_tall_and_conv_weights():
    params = {
        "tall": torch.randn(7, 3, dtype=torch.float64),
        "wide": torch.randn(2, 5, dtype=torch.float64),
        "conv": torch.randn(4, 2, 3, 3, dtype=torch.float64),
        "bias": torch.randn(4, dtype=torch.float64),
    }
    value = penalties.orthogonal(params)
    assert value.item() == pytest.approx(naive_orthogonal(weights_of(params)), rel=1e-12)
    orthonormal = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64)).Q
    assert penalties.orthogonal({"q": orthonormal}).item() == pytest.approx(0.0, abs=1e-24)


@pytest.mark.parametrize("case", [*CASES, "orthogonal"])
def test_penalty_gradient_passes_float64_gradcheck(case):
    penalty, kwargs = (penalties.orthogonal, {}) if case == "orthogonal" else CASES[case][:2]
    params = mlp_params(torch.float64)
    names = list(params)

    def as_function_of_leaves(*leaves):
        return penalty(dict(zip(names, leaves, strict=True)), **kwargs)

    leaves = tuple(leaf.clone().requires_grad_() for leaf in params.values())
    assert torch.autograd.gradcheck(as_function_of_leaves, leaves)


def test_torch_func_grad_equals_autograd():
    params = mlp_params(torch.float64)
    func_grads = grad(lambda p: penalties.group_lasso(p) + penalties.l1(p))(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    (penalties.group_lasso(leaves) + penalties.l1(leaves)).backward()
    torch.testing.assert_close(func_grads, {k: v.grad for k, v in leaves.items()})


def test_where_restricts_the_sum():
    params = mlp_params(torch.float64)
    only_weights = penalties.l1(params, where=fr.select.weights())
    assert only_weights.item() == pytest.approx(naive_l1(weights_of(params)))
    assert penalties.l2(params, where="0.*").item() == pytest.approx(
        naive_l2({"a": params["0.weight"], "b": params["0.bias"]})
    )


def test_non_floating_leaves_are_ignored_and_dtype_is_the_params():
    params = {**mlp_params(torch.float32), "steps": torch.tensor([5, 6])}
    value = penalties.l2(params)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(naive_l2(mlp_params(torch.float32)), rel=1e-5)


def test_mixed_dtypes_promote():
    params = {"a": torch.ones(2, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float64)}
    assert penalties.l1(params).dtype == torch.float64


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: penalties.l1({"n": torch.tensor([1, 2])}), ValueError, "no floating-point leaf"),
        (lambda: penalties.l1(mlp_params(), where="head.*"), ValueError, "matches no"),
        (
            lambda: penalties.l1(
                {"n": torch.tensor([1]), "w": torch.ones(2)}, where={"n": True, "w": True}
            ),
            ValueError,
            "not a floating-point tensor",
        ),
        (lambda: penalties.elastic_net(mlp_params(), l1_ratio=1.5), ValueError, "l1_ratio=1.5"),
        (lambda: penalties.group_lasso(mlp_params(), dim=1), ValueError, "group dim=1"),
        (
            lambda: penalties.orthogonal(mlp_params(), where="0.bias"),
            ValueError,
            "orthogonal needs matrices",
        ),
        (
            lambda: penalties.l2_sp(mlp_params(), {"0.weight": torch.ones(6, 4)}),
            ValueError,
            "reference do not match params",
        ),
    ],
)
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def pytrees(draw):
    leaf_shapes = draw(st.lists(shapes, min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}": torch.randn(shape, generator=generator, dtype=torch.float64)
        for i, shape in enumerate(leaf_shapes)
    }


@given(pytrees(), st.floats(0.0, 1.0))
def test_elastic_net_interpolates_l1_and_half_l2(params, ratio):
    expected = ratio * penalties.l1(params) + (1 - ratio) / 2 * penalties.l2(params)
    torch.testing.assert_close(penalties.elastic_net(params, ratio), expected)


@given(pytrees())
def test_group_lasso_bounds(params):
    """sqrt(n) * ||w||_2 (one group) >= rows-grouped >= ... and every group of size 1 is l1."""
    whole = penalties.group_lasso(params, dim=None)
    manual = sum(math.sqrt(w.numel()) * w.norm().item() for w in params.values())
    assert whole.item() == pytest.approx(manual, rel=1e-12)
    vectors = {k: v.flatten() for k, v in params.items()}
    torch.testing.assert_close(penalties.group_lasso(vectors, dim=0), penalties.l1(vectors))


@given(pytrees())
def test_penalties_are_nonnegative_and_zero_at_zero(params):
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    for penalty in (penalties.l1, penalties.l2, penalties.group_lasso):
        assert penalty(params).item() >= 0
        assert penalty(zeros).item() == 0


def test_vmap_over_strengths_equals_a_loop():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 4), torch.randn(16, 3)

    def objective(params, lam):
        loss = torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)
        return loss + lam * penalties.l1(params, where=fr.select.weights())

    lams = torch.linspace(0.0, 1.0, 5)
    batched = vmap(grad(objective), in_dims=(None, 0))(params, lams)
    for i, lam in enumerate(lams):
        torch.testing.assert_close(
            {k: v[i] for k, v in batched.items()}, grad(objective)(params, lam)
        )


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_group_lasso_neither_overflows_nor_underflows_in_float32(scale, dim):
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * scale
    exact = penalties.group_lasso({"w": w.double()}, dim=dim)
    value = penalties.group_lasso({"w": w}, dim=dim)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), exact, rtol=1e-6, atol=0)
    gradient = grad(lambda p: penalties.group_lasso(p, dim=dim))({"w": w})["w"]
    exact_gradient = grad(lambda p: penalties.group_lasso(p, dim=dim))({"w": w.double()})["w"]
    assert torch.isfinite(gradient).all()
    torch.testing.assert_close(gradient.double(), exact_gradient, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
@pytest.mark.parametrize("dim", [0, None])
def test_group_lasso_of_an_empty_leaf_is_zero(shape, dim):
    params = {"w": torch.empty(shape), "b": torch.ones(2)}
    expected = penalties.group_lasso({"b": torch.ones(2)}, dim=dim)
    assert penalties.group_lasso(params, dim=dim) == expected
