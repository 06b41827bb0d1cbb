"""functorch_reg._linear_solve: CG and normal CG against torch.linalg.solve, the curvature
report, the vmapped (masked) loop against the eager one, and a callable solver through
fr.hypergrad.implicit."""

from __future__ import annotations

import functools

import pytest
import torch

import functorch_reg as fr
from functorch_reg._linear_solve import cg, normal_cg

DT = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    return a @ a.T + n * torch.eye(n, dtype=DT)


def _split_matvec(a: torch.Tensor, sizes: tuple[int, ...]):
    """A as an operator on a tuple of leaves of the given sizes (a 2-leaf tree)."""

    def matvec(x):
        flat = torch.cat([leaf.reshape(-1) for leaf in x])
        return tuple((a @ flat).split(sizes))

    return matvec


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cg_matches_linalg_solve_on_spd_systems_over_several_leaves(seed):
    a = _spd(7, seed)
    b = torch.randn(7, generator=torch.Generator().manual_seed(10 + seed), dtype=DT)
    x = cg(_split_matvec(a, (3, 4)), list(b.split((3, 4))), maxiter=50, tol=1e-13)
    assert isinstance(x, tuple) and [t.shape for t in x] == [(3,), (4,)]
    torch.testing.assert_close(torch.cat(x), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_normal_cg_solves_a_non_symmetric_system_plain_cg_does_not():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=DT) + 4 * torch.eye(6, dtype=DT)
    a[0, 1] += 3.0  # clearly non-symmetric
    b = torch.randn(6, generator=g, dtype=DT)
    exact = torch.linalg.solve(a, b)
    (x,) = normal_cg(
        lambda v: (a @ v[0],), (b,), rmatvec=lambda v: (a.T @ v[0],), maxiter=100, tol=1e-14
    )
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)
    (wrong,) = cg(lambda v: (a @ v[0],), (b,), maxiter=6, tol=1e-14)
    assert not torch.allclose(wrong, exact, rtol=1e-4)


def test_cg_reports_non_positive_curvature_and_stops():
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=DT))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=DT)
    products = 0

    def matvec(v):
        nonlocal products
        products += 1
        return (a @ v[0],)

    report: dict[str, float] = {}
    (x,) = cg(matvec, (b,), maxiter=20, tol=1e-12, report=report)
    # p = b: p.Ap = 2 - 1 + 3 = 4 > 0; the second direction meets negative curvature
    assert set(report) == {"iteration", "curvature"}
    assert report["curvature"] <= 0 and report["iteration"] >= 1
    assert products == report["iteration"] + 1 < 20
    assert torch.isfinite(x).all()

    quiet: dict[str, float] = {}
    cg(lambda v: (_spd(3, 0) @ v[0],), (b,), maxiter=20, tol=1e-12, report=quiet)
    assert quiet == {}  # converged: nothing to report


def test_cg_zero_rhs_returns_zero_without_products():
    def matvec(v):
        raise AssertionError("no product needed")

    (x,) = cg(matvec, (torch.zeros(4, dtype=DT),), maxiter=5, tol=1e-10)
    assert torch.equal(x, torch.zeros(4, dtype=DT))


def test_cg_under_vmap_runs_the_masked_loop_and_matches_eager_per_rhs():
    a = _spd(5, 4)
    bs = torch.randn(3, 5, generator=torch.Generator().manual_seed(5), dtype=DT)
    solve = functools.partial(cg, lambda v: (a @ v[0],), maxiter=30, tol=1e-12)
    batched = torch.func.vmap(lambda b: solve((b,))[0])(bs)
    for row, b in zip(batched, bs, strict=True):
        torch.testing.assert_close(row, solve((b,))[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(row, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-11)


def _ridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, generator=g, dtype=DT)
    lam = torch.tensor(0.3, dtype=DT)

    def train(w, lam):
        return (x @ w - y).square().mean() + lam * w.square().sum()

    def val(w):
        return (x @ w - 1).square().mean()

    hessian = 2 * x.T @ x / 30 + 2 * lam * torch.eye(4, dtype=DT)
    w = torch.linalg.solve(hessian, 2 * x.T @ y / 30)
    return train, val, w, lam


def test_callable_solver_through_implicit_equals_the_string_solver_bit_for_bit():
    train, val, w, lam = _ridge()
    expected = fr.hypergrad.implicit(train, val, w, lam, solver="cg", maxiter=50, tol=1e-12)
    products = 0

    def counting(matvec, b):
        def product(v):
            nonlocal products
            products += 1
            return matvec(v)

        return cg(product, b, maxiter=50, tol=1e-12)

    got = fr.hypergrad.implicit(train, val, w, lam, solver=counting, maxiter=50, tol=1e-12)
    assert torch.equal(got, expected)
    assert 1 <= products <= 5  # a 4x4 SPD system: at most 4 CG steps (+ rounding)


@pytest.mark.slow
def test_a_dense_callable_solver_with_an_l1_prox_matches_cg_on_the_support():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=DT)
    y = x[:, :2] @ torch.tensor([2.0, -1.5], dtype=DT) + 0.1 * torch.randn(
        40, generator=g, dtype=DT
    )
    lam = torch.tensor(0.2, dtype=DT)

    def train(w, lam):
        return (x @ w - y).square().mean() / 2

    def val(w):
        return (x @ w - y - 0.5).square().mean()

    eta = 0.1
    w = torch.zeros(6, dtype=DT)
    for _ in range(3000):  # proximal gradient to the lasso fixed point
        w = fr.prox.l1(w - eta * torch.func.grad(train)(w, lam), eta * lam)
    assert 0 < int((w != 0).sum()) < 6

    def dense(matvec, b):
        (v,) = b
        columns = [matvec((e,))[0] for e in torch.eye(v.numel(), dtype=DT)]
        return (torch.linalg.solve(torch.stack(columns, dim=1), v),)

    kwargs = dict(prox=fr.prox.l1, step_size=eta, maxiter=100, tol=1e-12)
    exact = fr.hypergrad.implicit(train, val, w, lam, solver=dense, **kwargs)
    by_cg = fr.hypergrad.implicit(train, val, w, lam, solver="cg", **kwargs)
    torch.testing.assert_close(exact, by_cg, rtol=1e-8, atol=1e-10)


def test_a_bad_solver_names_the_callable_form():
    train, val, w, lam = _ridge()
    with pytest.raises(ValueError, match="or a callable solve"):
        fr.hypergrad.implicit(train, val, w, lam, solver="gmres")  # type: ignore[arg-type]
