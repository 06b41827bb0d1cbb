"""Conjugate gradients on tuples of tensors: the linear solvers behind ``hypergrad``.

One job: solve ``A x = b`` for a matrix-free ``A`` (a function ``matvec(x) -> A x`` on a
tuple of leaves), by conjugate gradients (Hestenes and Stiefel, 1952; Nocedal and Wright,
*Numerical Optimization*, 2nd ed., algorithm 5.2) for a symmetric positive definite ``A``
(:func:`cg`), or on the normal equations ``A^T A x = A^T b`` for any nonsingular ``A``
(:func:`normal_cg`). Both have the signature of a ``solver=`` callable of
``fr.hypergrad.implicit`` once ``maxiter`` and ``tol`` are bound (``functools.partial``);
the public names are ``fr.hypergrad.cg`` and ``fr.hypergrad.normal_cg``.

The loop has two forms with the same iterates: eager mode leaves it at convergence or at
non-positive curvature and records why in ``report``; under ``torch.compile`` or
``torch.func.vmap`` (no data-dependent exit there) it runs all ``maxiter`` iterations and
freezes the state with ``torch.where`` once stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["cg", "normal_cg"]

Leaves = tuple[Tensor, ...]
Matvec = Callable[[Leaves], Leaves]


def cg(
    matvec: Matvec,
    b: Sequence[Tensor],
    *,
    maxiter: int,
    tol: float,
    report: dict[str, float] | None = None,
) -> Leaves:
    r"""Solve ``A x = b`` by conjugate gradients, for a symmetric positive (semi-)definite ``A``.

    Starting at ``x = 0``, at most ``maxiter`` products ``matvec(p)``. It stops when the
    recursive residual reaches ``tol`` relative to ``b``
    (:math:`\|r_k\| \le \text{tol}\,\|b\|`), or at non-positive curvature
    :math:`p^\top A p \le 0` (``A`` is indefinite, or a NaN entered), and returns the iterate
    with the smallest recursive residual (not the last one: with an indefinite or
    ill-conditioned ``A`` that residual is not monotone).

    Args:
        matvec: ``matvec(x) -> A x`` on a tuple of tensors shaped like ``b``.
        b: the right-hand side, a tuple or list of floating tensors.
        maxiter: the most products with ``A`` (a positive int).
        tol: relative residual at which to stop (``>= 0``).
        report: a dict that, in eager mode, receives ``iteration`` and ``curvature`` when a
            non-positive (or NaN) curvature stopped the loop; untouched otherwise.

    Returns:
        ``x`` as a tuple of tensors shaped like ``b``.

    Example:
        >>> import functorch_reg as fr
        >>> cg = fr.hypergrad.cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> (x,) = cg(lambda v: (A @ v[0],), (b,), maxiter=10, tol=1e-12)
        >>> torch.allclose(x, torch.linalg.solve(A, b))
        True
    """
    rhs = tuple(b)
    if torch.compiler.is_compiling() or any(
        torch._C._functorch.is_batchedtensor(leaf) for leaf in rhs
    ):
        return _cg_masked(matvec, rhs, maxiter, tol)
    return _cg_eager(matvec, rhs, maxiter, tol, report)


def normal_cg(
    matvec: Matvec,
    b: Sequence[Tensor],
    *,
    rmatvec: Matvec,
    maxiter: int,
    tol: float,
    report: dict[str, float] | None = None,
) -> Leaves:
    r"""Solve ``A x = b`` for any nonsingular ``A`` by :func:`cg` on ``A^T A x = A^T b``.

    Two products per iteration (``matvec`` then ``rmatvec``) and the condition number
    squared; ``tol`` is relative to :math:`\|A^\top b\|`.

    Args:
        matvec: ``matvec(x) -> A x``.
        b: the right-hand side, a tuple or list of floating tensors.
        rmatvec: ``rmatvec(y) -> A^T y``.
        maxiter: the most iterations (each one ``matvec`` and one ``rmatvec``).
        tol: relative residual of the normal equations at which to stop.
        report: as in :func:`cg`.

    Returns:
        ``x`` as a tuple of tensors shaped like ``b``.

    Example:
        >>> import functorch_reg as fr
        >>> normal_cg = fr.hypergrad.normal_cg
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> (x,) = normal_cg(lambda v: (A @ v[0],), (b,), rmatvec=lambda v: (A.T @ v[0],),
        ...                  maxiter=10, tol=1e-12)
        >>> torch.allclose(A @ x, b)
        True
    """
    return cg(
        lambda x: rmatvec(matvec(x)), rmatvec(tuple(b)), maxiter=maxiter, tol=tol, report=report
    )


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two tuples of tensors, a 0-d tensor."""
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def norm(a: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of a tuple of tensors, a 0-d tensor."""
    return dot(a, a).sqrt()


def _combine(a: Leaves, scale: Tensor, b: Leaves) -> Leaves:
    """``a + scale * b``."""
    return tuple(x + scale * y for x, y in zip(a, b, strict=True))


def _select(keep: Tensor, old: Leaves, new: Leaves) -> Leaves:
    return tuple(torch.where(keep, x, y) for x, y in zip(old, new, strict=True))


def _cg_masked(matvec: Matvec, rhs: Leaves, maxiter: int, tolerance: float) -> Leaves:
    """:func:`cg` without a data-dependent exit: all ``maxiter`` iterations, frozen once done."""
    x = tuple(torch.zeros_like(b) for b in rhs)
    residual = rhs
    direction = rhs
    squared = dot(rhs, rhs)
    threshold = tolerance**2 * squared
    done = squared <= threshold
    best, best_squared = x, squared
    for _ in range(maxiter):
        product = matvec(direction)
        curvature = dot(direction, product)
        breakdown = ~(curvature > 0)
        done = done | breakdown
        alpha = torch.where(breakdown, torch.zeros_like(curvature), squared / curvature)
        x = _select(done, x, _combine(x, alpha, direction))
        new_residual = _combine(residual, -alpha, product)
        new_squared = dot(new_residual, new_residual)
        beta = new_squared / torch.where(done, torch.ones_like(squared), squared)
        residual = _select(done, residual, new_residual)
        direction = _select(done, direction, _combine(new_residual, beta, direction))
        squared = torch.where(done, squared, new_squared)
        improved = squared < best_squared
        best = _select(improved, x, best)
        best_squared = torch.where(improved, squared, best_squared)
        done = done | (squared <= threshold)
    return best


def _cg_eager(
    matvec: Matvec,
    rhs: Leaves,
    maxiter: int,
    tolerance: float,
    report: dict[str, float] | None,
) -> Leaves:
    """:func:`cg` with early exits and foreach updates: the iterates of :func:`_cg_masked`."""
    x = tuple(torch.zeros_like(b) for b in rhs)
    squared = float(dot(rhs, rhs))
    threshold = tolerance**2 * squared
    best, best_squared = x, squared
    if squared <= threshold:
        return x
    residual, direction = rhs, rhs
    for iteration in range(maxiter):
        product = matvec(direction)
        curvature = float(dot(direction, product))
        if not curvature > 0:
            if report is not None:
                report.update(iteration=iteration, curvature=curvature)
            break
        alpha = squared / curvature
        x = tuple(torch._foreach_add(list(x), list(direction), alpha=alpha))
        residual = tuple(torch._foreach_add(list(residual), list(product), alpha=-alpha))
        new_squared = float(dot(residual, residual))
        if new_squared < best_squared:
            best, best_squared = x, new_squared
        if new_squared <= threshold:
            break
        beta = new_squared / squared
        direction = tuple(torch._foreach_add(list(residual), list(direction), alpha=beta))
        squared = new_squared
    return best
