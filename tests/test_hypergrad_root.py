"""fr.hypergrad.implicit as one root VJP over an optimality map: damping in the smooth and
the prox case against dense references (H + damping I, and (1 + damping) I - dT), and
tune's settings checked before any forward pass."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import functorch_reg as fr

F64 = torch.float64


@functools.cache
def lasso(seed: int = 0):
    """A two-strength lasso at a fixed point of its proximal-gradient map."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 6, generator=generator, dtype=F64)
    y = X @ torch.tensor([2.0, -1.0, 0.0, 0.5, 0.0, 0.0], dtype=F64)
    y = y + 0.1 * torch.randn(40, generator=generator, dtype=F64)
    X_val = torch.randn(30, 6, generator=generator, dtype=F64)
    y_val = torch.randn(30, generator=generator, dtype=F64)

    def smooth(w, lam):
        return (X @ w - y).square().mean() / 2

    def val(w):
        return (X_val @ w - y_val).square().mean()

    def prox(w, threshold):
        return torch.cat([fr.prox.l1(w[:3], threshold[0]), fr.prox.l1(w[3:], threshold[1])])

    lam, eta = torch.tensor([0.05, 0.2], dtype=F64), 0.1

    def fixed_point_map(w, lam):  # T(w) = prox(w - eta grad, eta lam), grad by hand
        return prox(w - eta * X.T @ (X @ w - y) / 40, eta * lam)

    w = torch.zeros(6, dtype=F64)
    for _ in range(2000):
        w = fixed_point_map(w, lam)
    return smooth, val, prox, fixed_point_map, w, lam, eta


def ridge():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=generator, dtype=F64)
    y = torch.randn(30, generator=generator, dtype=F64)
    X_val = torch.randn(20, 4, generator=generator, dtype=F64)
    y_val = torch.randn(20, generator=generator, dtype=F64)

    def train(w, lam):
        return (
            (X @ w - y).square().mean()
            + lam[0] * w[:2].square().sum()
            + lam[1] * w[2:].square().sum()
        )

    def val(w):
        return (X_val @ w - y_val).square().mean()

    lam = torch.tensor([0.1, 0.4], dtype=F64)
    ridge_diagonal = torch.cat([lam[0].expand(2), lam[1].expand(2)])
    hessian = 2 * X.T @ X / 30 + 2 * torch.diag(ridge_diagonal)
    w = torch.linalg.solve(hessian, 2 * X.T @ y / 30)
    return train, val, w, lam


@pytest.mark.parametrize("solver", ["cg", "normal_cg"])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_damping_without_prox_solves_the_damped_hessian(solver, damping):
    train, val, w, lam = ridge()
    hessian = torch.func.hessian(train)(w, lam)
    mixed = jacobian(lambda lam: torch.func.grad(train)(w, lam), lam)  # d grad / d lam
    u = torch.linalg.solve(hessian + damping * torch.eye(4, dtype=F64), torch.func.grad(val)(w))
    expected = -mixed.T @ u
    got = fr.hypergrad.implicit(train, val, w, lam, solver=solver, damping=damping, tol=1e-13)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_damping_with_prox_solves_the_damped_fixed_point_system(damping):
    smooth, val, prox, fixed_point_map, w, lam, eta = lasso()
    support = (w != 0).nonzero().squeeze(1)
    assert 0 < len(support) < 6  # a real support: some coordinates are zero
    jac_w = jacobian(lambda v: fixed_point_map(v, lam), w)
    jac_lam = jacobian(lambda s: fixed_point_map(w, s), lam)
    system = (1 + damping) * torch.eye(6, dtype=F64) - jac_w
    v = torch.func.grad(val)(w)
    # normal_cg solves the whole system; cg the one restricted to the support.
    whole = jac_lam.T @ torch.linalg.solve(system.T, v)
    on_support = system[support][:, support]
    restricted = jac_lam[support].T @ torch.linalg.solve(on_support.T, v[support])
    kwargs = {"prox": prox, "step_size": eta, "damping": damping, "tol": 1e-13, "maxiter": 200}
    got_normal = fr.hypergrad.implicit(smooth, val, w, lam, solver="normal_cg", **kwargs)
    got_cg = fr.hypergrad.implicit(smooth, val, w, lam, solver="cg", **kwargs)
    torch.testing.assert_close(got_normal, whole, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(got_cg, restricted, rtol=1e-8, atol=1e-11)
    if damping == 0:  # off the support, dT is 0: both systems give the same answer
        torch.testing.assert_close(got_cg, got_normal, rtol=1e-8, atol=1e-11)


def test_a_callable_solver_gets_the_transposed_fixed_point_system():
    smooth, val, prox, fixed_point_map, w, lam, eta = lasso()
    seen = []

    def dense_solve(matvec, b):
        (rhs,) = b
        columns = [matvec((column,))[0] for column in torch.eye(6, dtype=F64)]
        seen.append(torch.stack(columns, dim=1))
        return (torch.linalg.solve(seen[-1], rhs),)

    got = fr.hypergrad.implicit(
        smooth, val, w, lam, prox=prox, step_size=eta, solver=dense_solve, damping=0.5
    )
    jac_w = jacobian(lambda v: fixed_point_map(v, lam), w)
    torch.testing.assert_close(seen[0], (1.5 * torch.eye(6, dtype=F64) - jac_w).T)
    expected = fr.hypergrad.implicit(
        smooth, val, w, lam, prox=prox, step_size=eta, solver="normal_cg", damping=0.5,
        tol=1e-13, maxiter=200,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"maxiter": 0}, "tune: maxiter must be a positive int"),
        ({"maxiter": 2.5}, "tune: maxiter must be a positive int"),
        ({"damping": -1.0}, "tune: damping must be finite and >= 0"),
        ({"damping": math.inf}, "tune: damping must be finite and >= 0"),
    ],
)
def test_tune_checks_solver_settings_before_any_forward_pass(method, kwargs, match):
    # Before: maxiter and damping were checked at the first implicit hypergradient,
    # after a round of training steps.
    train, val, w, lam = ridge()
    calls = []

    def counted_train(w, lam):
        calls.append("train")
        return train(w, lam)

    def counted_val(w):
        calls.append("val")
        return val(w)

    start = w.clone()
    with pytest.raises(ValueError, match=match):
        fr.hypergrad.tune(
            counted_train, counted_val, w, lam, fr.sgd(lr=0.1), rounds=2, steps_per_round=2,
            method=method, progress=False, **kwargs,
        )  # fmt: skip
    assert calls == []
    assert torch.equal(w, start)


def test_implicit_checks_settings_before_any_forward_pass():
    train, val, w, lam = ridge()
    calls = []

    def counted(w, lam):
        calls.append("train")
        return train(w, lam)

    bad_prox = functools.partial(fr.prox.l1)
    with pytest.raises(ValueError, match="prox needs step_size"):
        fr.hypergrad.implicit(counted, val, w, lam, prox=bad_prox)
    with pytest.raises(ValueError, match="damping must be"):
        fr.hypergrad.implicit(counted, val, w, lam, damping=-0.1)
    assert calls == []


def test_the_public_solvers_through_the_solver_seam_equal_the_named_solvers():
    train, val, w, lam = ridge()
    cg = functools.partial(fr.hypergrad.cg, maxiter=30, tol=1e-10)

    def normal_cg(matvec, b):  # the Hessian is symmetric: A^T is A
        return fr.hypergrad.normal_cg(matvec, b, rmatvec=matvec, maxiter=30, tol=1e-10)

    for name, given in [("cg", cg), ("normal_cg", normal_cg)]:
        got = fr.hypergrad.implicit(train, val, w, lam, solver=given, maxiter=30)
        expected = fr.hypergrad.implicit(train, val, w, lam, solver=name, maxiter=30)
        assert torch.equal(got, expected), name
