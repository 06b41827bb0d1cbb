"""Function-space penalties against exact computations on small float64 inputs, and under
torch.func.grad, vmap and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, vmap

import functorch_reg as fr
from functorch_reg.function_space import (
    SpectralNormState,
    init_spectral_norm,
    input_gradient_norm,
    jacobian_frobenius,
    jacobian_frobenius_exact,
    spectral_norm,
)

MODEL = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def model_params(seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device)
        for name, p in MODEL.named_parameters()
    }


def data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100)
    x, y = (
        torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(4, 3), (4, 2)]
    )
    return x.to(device), y.to(device)


def output_of(params):
    return lambda x: functional_call(MODEL, params, (x,))


def loss_of(params, y):
    return lambda x: torch.nn.functional.mse_loss(output_of(params)(x), y)


def jacobian_matrix(fn, x):
    """The Jacobian as an (outputs, inputs) matrix, by torch.autograd."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return jac.reshape(fn(x).numel(), x.numel())


def scaled_orthonormal_basis(shape, seed):
    """m = prod(shape) rotated basis vectors times sqrt(m): (1/m) sum_k v_k v_k^T = I."""
    m = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64)).Q
    return math.sqrt(m) * q.reshape(m, *shape)


def leaves_requiring_grad(params):
    return {name: leaf.clone().requires_grad_() for name, leaf in params.items()}


def autograd_grads(value, leaves):
    grads = torch.autograd.grad(value, list(leaves.values()), materialize_grads=True)
    return dict(zip(leaves, grads, strict=True))


# Input-gradient norm


def test_input_gradient_norm_and_its_params_gradient_match_autograd_double_backward():
    params = model_params()
    x, y = data()
    leaves = leaves_requiring_grad(params)
    x_ = x.clone().requires_grad_()
    (x_grad,) = torch.autograd.grad(loss_of(leaves, y)(x_), x_, create_graph=True)
    reference = x_grad.square().sum()

    value = input_gradient_norm(loss_of(params, y), x)
    assert value.ndim == 0 and value.dtype == torch.float64
    torch.testing.assert_close(value, reference.detach(), rtol=1e-12, atol=0)

    func_grads = grad(lambda p: input_gradient_norm(loss_of(p, y), x))(params)
    expected = autograd_grads(reference, leaves)
    torch.testing.assert_close(func_grads, expected, rtol=1e-10, atol=1e-14)
    assert all(g.abs().sum() > 0 for g in expected.values())


def test_input_gradient_norm_sums_over_the_batch_and_vmaps_over_samples():
    """Summed loss: the batch's value is the sum of the per-sample ones (WGAN-GP style)."""
    params = model_params()
    x, y = data()

    def per_sample(xi, yi):
        return input_gradient_norm(lambda z: (output_of(params)(z) - yi).square().sum(), xi)

    summed = input_gradient_norm(lambda z: (output_of(params)(z) - y).square().sum(), x)
    torch.testing.assert_close(vmap(per_sample)(x, y).sum(), summed, rtol=1e-12, atol=0)


# Jacobian Frobenius norm


def test_exact_jacobian_norm_matches_autograd_and_sums_per_sample_norms():
    params = model_params()
    x, _ = data()
    fn = output_of(params)
    exact = jacobian_frobenius_exact(fn, x)
    torch.testing.assert_close(exact, jacobian_matrix(fn, x).square().sum(), rtol=1e-12, atol=0)
    per_sample = sum(jacobian_matrix(fn, xi[None]).square().sum() for xi in x)
    torch.testing.assert_close(exact, per_sample, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_is_exact_with_a_scaled_orthonormal_basis(mode):
    params = model_params()
    x, _ = data()
    fn = output_of(params)
    basis = scaled_orthonormal_basis(fn(x).shape if mode == "vjp" else x.shape, seed=1)
    estimate = jacobian_frobenius(fn, x, basis, mode=mode)
    torch.testing.assert_close(estimate, jacobian_frobenius_exact(fn, x), rtol=1e-12, atol=0)
    # Half the basis is not isotropic: no longer exact, so the check above can fail.
    half = jacobian_frobenius(fn, x, basis[: len(basis) // 2], mode=mode)
    assert abs(half / estimate - 1) > 1e-3


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_is_unbiased_with_the_documented_variance(mode):
    """Each Gaussian draw gives q = v^T A v with A = J J^T (vjp) or J^T J (jvp), whose
    cumulants are kappa_r = 2^(r-1) (r-1)! tr(A^r): mean tr(A) = ||J||_F^2, variance
    2 tr(A^2). Over n draws the sample mean has standard error sqrt(2 tr(A^2) / n) and the
    sample variance sqrt((mu_4 - sigma^4) / n) = sqrt((48 tr(A^4) + 8 tr(A^2)^2) / n).
    With n = 50000 both are close to normal; 5 standard errors bound a false failure
    by 1e-6 (and the seed is fixed)."""
    params = model_params()
    x, _ = data()
    fn = output_of(params)
    n = 50_000
    shape = fn(x).shape if mode == "vjp" else x.shape
    draws = torch.randn((n, *shape), generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    values = vmap(lambda v: jacobian_frobenius(fn, x, v[None], mode=mode))(draws)
    torch.testing.assert_close(
        jacobian_frobenius(fn, x, draws, mode=mode), values.mean(), rtol=1e-12, atol=0
    )

    singular = torch.linalg.svdvals(jacobian_matrix(fn, x))
    tr_a, tr_a2, tr_a4 = ((singular**p).sum().item() for p in (2, 4, 8))
    assert tr_a == pytest.approx(jacobian_frobenius_exact(fn, x).item(), rel=1e-12)
    assert abs(values.mean().item() - tr_a) < 5 * math.sqrt(2 * tr_a2 / n)
    assert abs(values.var().item() - 2 * tr_a2) < 5 * math.sqrt((48 * tr_a4 + 8 * tr_a2**2) / n)
    assert 5 * math.sqrt(2 * tr_a2 / n) < 0.025 * tr_a, "the bound must be tight enough to fail"


def test_generator_makes_draws_reproducible():
    params = model_params()
    x, _ = data()
    fn = output_of(params)

    def draw(seed, mode):
        return jacobian_frobenius(
            fn, x, 3, mode=mode, generator=torch.Generator().manual_seed(seed)
        )

    for mode in ("vjp", "jvp"):
        assert torch.equal(draw(0, mode), draw(0, mode))
        assert not torch.equal(draw(0, mode), draw(1, mode))


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_params_gradient_equals_the_exact_one_and_autograd(mode):
    """With an isotropic basis the estimate is the exact norm as a function of params."""
    params = model_params()
    x, _ = data()
    basis = scaled_orthonormal_basis(output_of(params)(x).shape if mode == "vjp" else x.shape, 3)
    estimate_grads = grad(lambda p: jacobian_frobenius(output_of(p), x, basis, mode=mode))(params)
    exact_grads = grad(lambda p: jacobian_frobenius_exact(output_of(p), x))(params)
    torch.testing.assert_close(estimate_grads, exact_grads, rtol=1e-10, atol=1e-12)

    leaves = leaves_requiring_grad(params)
    jac = torch.autograd.functional.jacobian(output_of(leaves), x, create_graph=True)
    torch.testing.assert_close(
        exact_grads, autograd_grads(jac.square().sum(), leaves), rtol=1e-10, atol=1e-12
    )


# Spectral norm


def matrices():
    generator = torch.Generator().manual_seed(4)
    shapes = {"tall": (7, 3), "wide": (2, 5), "conv": (4, 2, 3, 3), "bias": (4,)}
    return {
        name: torch.randn(shape, generator=generator, dtype=torch.float64)
        for name, shape in shapes.items()
    }


def as_matrix(w):
    return w.reshape(w.shape[0], -1)


def test_spectral_norm_converges_to_the_largest_singular_values():
    params = matrices()
    state = init_spectral_norm(params, generator=torch.Generator().manual_seed(0))
    assert sorted(state.u) == ["conv", "tall", "wide"]
    penalty, state = spectral_norm(params, state, n_power_iterations=300)
    exact = sum(
        torch.linalg.matrix_norm(as_matrix(params[name]), ord=2)
        for name in ("conv", "tall", "wide")
    )
    torch.testing.assert_close(penalty, exact, rtol=1e-12, atol=0)
    for name, u in state.u.items():
        top_left = torch.linalg.svd(as_matrix(params[name])).U[:, 0]
        assert torch.dot(u, top_left).abs().item() == pytest.approx(1.0, abs=1e-12)


def test_spectral_norm_gradient_is_u_v_transpose_and_at_convergence_the_exact_one():
    params = matrices()
    state = init_spectral_norm(params, generator=torch.Generator().manual_seed(0))
    grads, new_state = grad(spectral_norm, has_aux=True)(params, state)
    for name in ("conv", "tall", "wide"):
        w = as_matrix(params[name])
        v = torch.nn.functional.normalize(w.T @ state.u[name], dim=0)
        expected = torch.outer(new_state.u[name], v).reshape(params[name].shape)
        torch.testing.assert_close(grads[name], expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(grads["bias"], torch.zeros(4, dtype=torch.float64))

    _, converged = spectral_norm(params, state, n_power_iterations=300)
    grads, _ = grad(spectral_norm, has_aux=True)(params, converged)
    exact = grad(lambda w: torch.linalg.matrix_norm(as_matrix(w), ord=2))(params["conv"])
    torch.testing.assert_close(grads["conv"], exact, rtol=1e-10, atol=1e-12)


def test_spectral_norm_is_pure_and_resumes_where_it_stopped():
    params = matrices()
    state = init_spectral_norm(params, where="tall", generator=torch.Generator().manual_seed(0))
    before = {name: u.clone() for name, u in state.u.items()}
    once, once_state = spectral_norm(params, state, n_power_iterations=3)
    assert list(once_state.u) == ["tall"]
    torch.testing.assert_close(state.u, before, rtol=0, atol=0)

    carried = state
    for _ in range(3):
        stepwise, carried = spectral_norm(params, carried)
    torch.testing.assert_close(stepwise, once, rtol=1e-14, atol=0)
    torch.testing.assert_close(carried.u, once_state.u, rtol=1e-14, atol=0)

    leaves = leaves_requiring_grad(params)
    penalty, new_state = spectral_norm(leaves, state)
    assert penalty.requires_grad and not new_state.u["tall"].requires_grad


def test_zero_matrix_keeps_its_vector_and_recovers():
    """A LoRA-style zero init must not leave the vector at zero for good."""
    state = init_spectral_norm({"b": torch.zeros(3, 2)}, generator=torch.Generator().manual_seed(0))
    penalty, zero_state = spectral_norm({"b": torch.zeros(3, 2)}, state)
    assert penalty.item() == 0
    torch.testing.assert_close(zero_state.u, state.u, rtol=0, atol=0)
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    penalty, _ = spectral_norm({"b": w}, zero_state, n_power_iterations=30)
    assert penalty.item() == pytest.approx(2.0, rel=1e-6)


# Ensembles under grad and vmap, and compiled


def ensemble(device: str):
    """A penalized objective over three members and three strengths, and its inputs."""
    x, y = data(device)
    generator = torch.Generator().manual_seed(5)
    out_probe = torch.randn((2, *y.shape), generator=generator, dtype=x.dtype).to(device)
    in_probe = torch.randn((2, *x.shape), generator=generator, dtype=x.dtype).to(device)

    def objective(params, state, lam):
        loss = loss_of(params, y)
        sigma, state = spectral_norm(params, state)
        penalty = (
            input_gradient_norm(loss, x)
            + jacobian_frobenius(output_of(params), x, out_probe)
            + jacobian_frobenius(output_of(params), x, in_probe, mode="jvp")
            + sigma
        )
        return loss(x) + lam * penalty, state

    members = [model_params(seed, device) for seed in range(3)]
    states = [
        init_spectral_norm(p, generator=torch.Generator(device).manual_seed(i))
        for i, p in enumerate(members)
    ]
    lams = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64, device=device)
    return grad(objective, has_aux=True), members, states, lams


def assert_member(stacked, i, expected):
    grads, state = stacked
    expected_grads, expected_state = expected
    torch.testing.assert_close({k: v[i] for k, v in grads.items()}, expected_grads)
    torch.testing.assert_close({k: v[i] for k, v in state.u.items()}, expected_state.u)


def test_vmap_over_members_and_strengths_equals_a_loop():
    step, members, states, lams = ensemble("cpu")
    stacked = vmap(step)(fr.stack(members), fr.stack(states), lams)
    assert isinstance(stacked[1], SpectralNormState)
    for i in range(len(members)):
        assert_member(stacked, i, step(members[i], states[i], lams[i]))


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_vmapped_step_equals_eager_and_compiles_once(device):
    step, members, states, lams = ensemble(device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(vmap(step), fullgraph=True, backend=counter)
    params = fr.stack(members)
    first = compiled(params, fr.stack(states), lams)
    second = compiled(params, first[1], 2 * lams)
    assert counter.frame_count == 1
    for i in range(len(members)):
        eager_first = step(members[i], states[i], lams[i])
        assert_member(first, i, eager_first)
        assert_member(second, i, step(members[i], eager_first[1], 2 * lams[i]))


# Bad input


def int_tensor():
    return torch.ones(2, 3, dtype=torch.int64)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: input_gradient_norm(lambda x: x.square(), torch.ones(3)),
            ValueError,
            r"must return a 0-d tensor, got \(3,\)",
        ),
        (lambda: input_gradient_norm(torch.sum, int_tensor()), TypeError, "floating-point"),
        (
            lambda: jacobian_frobenius(torch.tanh, torch.ones(2, 3), torch.ones(4, 3)),
            ValueError,
            r"projections must have shape \(k, \*fn\(x\).shape\) = \(k, 2, 3\)",
        ),
        (
            lambda: jacobian_frobenius(torch.tanh, torch.ones(2, 3), torch.ones(0, 2, 3)),
            ValueError,
            "k = 0",
        ),
        (lambda: jacobian_frobenius(torch.tanh, torch.ones(3), 0), ValueError, "at least 1"),
        (lambda: jacobian_frobenius(torch.tanh, torch.ones(3), 2.0), TypeError, "int or a"),
        (
            lambda: jacobian_frobenius(
                torch.tanh, torch.ones(3), torch.ones(1, 3), generator=torch.Generator()
            ),
            ValueError,
            "generator is only used to draw",
        ),
        (lambda: jacobian_frobenius(torch.tanh, torch.ones(3), mode="fd"), ValueError, "mode"),
        (
            lambda: jacobian_frobenius(lambda x: (x, x), torch.ones(3)),
            TypeError,
            "fn must return a floating-point tensor, got tuple",
        ),
        (
            lambda: jacobian_frobenius(lambda x: (x, x), torch.ones(3), mode="jvp"),
            TypeError,
            "fn must return a floating-point tensor, got tuple",
        ),
        (
            lambda: jacobian_frobenius_exact(lambda x: (x > 0).long(), torch.ones(3)),
            TypeError,
            "fn must return a floating-point tensor",
        ),
        (lambda: init_spectral_norm(matrices(), where="bias"), ValueError, "needs matrices"),
        (
            lambda: init_spectral_norm({"b": torch.ones(3), "n": int_tensor()}),
            ValueError,
            "no floating-point matrix selected",
        ),
        (
            lambda: spectral_norm(matrices(), init_spectral_norm(matrices()), 0),
            ValueError,
            "n_power_iterations=0 must be at least 1",
        ),
        (
            lambda: spectral_norm(matrices(), init_spectral_norm(matrices()), 2.0),
            TypeError,
            "must be an int",
        ),
        (
            lambda: spectral_norm(matrices(), {"tall": torch.ones(7)}),
            TypeError,
            "SpectralNormState",
        ),
        (lambda: spectral_norm(matrices(), SpectralNormState({})), ValueError, "no vector"),
        (
            lambda: spectral_norm(matrices(), SpectralNormState({"head": torch.ones(7)})),
            ValueError,
            "'head', which params lack",
        ),
        (
            lambda: spectral_norm(matrices(), SpectralNormState({"tall": torch.ones(3)})),
            ValueError,
            "does not match params at leaf 'tall'",
        ),
        (
            lambda: spectral_norm(matrices(), SpectralNormState({"bias": torch.ones(4)})),
            ValueError,
            "does not match params at leaf 'bias'",
        ),
        (
            lambda: spectral_norm(matrices(), fr.stack([init_spectral_norm(matrices())] * 2)),
            ValueError,
            "does not match params",
        ),
    ],
)
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("scale", [1e-13, 1e-30, 1e20])
def test_spectral_norm_is_scale_invariant_for_tiny_and_huge_matrices(scale):
    """The cutoff for a degenerate vector is relative to the matrix, not 1e-12."""
    base = {"w": torch.tensor([[3.0, 1.0], [0.5, 2.0], [0.0, 1.0]], dtype=torch.float64)}
    state = init_spectral_norm(base, generator=torch.Generator().manual_seed(0))
    reference, reference_state = spectral_norm(base, state, n_power_iterations=50)
    scaled = {"w": base["w"] * scale}
    penalty, new_state = spectral_norm(scaled, state, n_power_iterations=50)
    torch.testing.assert_close(penalty, reference * scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(new_state.u, reference_state.u, rtol=1e-12, atol=0)
