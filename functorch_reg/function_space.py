r"""Function-space penalties: norms of a model's derivatives and of its weight matrices.

Like :mod:`functorch_reg.penalties` they are pure functions at unit strength, built on
``torch.func`` so that they can themselves be differentiated w.r.t. the parameters
(double backward), vmapped over ensembles and compiled::

    def objective(params, x, y):
        def loss_of_input(x):
            return loss_fn(torch.func.functional_call(model, params, (x,)), y)

        return loss_of_input(x) + lam * fr.function_space.input_gradient_norm(loss_of_input, x)

    grads = torch.func.grad(objective)(params, x, y)

* :func:`input_gradient_norm`: :math:`\|\nabla_x L\|^2` (gradient penalty);
* :func:`jacobian_frobenius`: Hutchinson estimate of :math:`\|\partial f / \partial x\|_F^2`,
  :func:`jacobian_frobenius_exact` its exact value for small inputs;
* :func:`init_spectral_norm` and :func:`spectral_norm`: largest singular values of the
  weight matrices by power iteration, the vectors carried in a functional state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from .select import Where, selected, weights
from .tree import Params, flatten, spec_names

__all__ = [
    "SpectralNormState",
    "init_spectral_norm",
    "input_gradient_norm",
    "jacobian_frobenius",
    "jacobian_frobenius_exact",
    "spectral_norm",
]

# Below this norm a power-iteration vector is treated as zero (as in torch's spectral_norm).
_EPS = 1e-12


def input_gradient_norm(loss_of_input: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Squared norm of the gradient of a scalar loss w.r.t. the input,
    :math:`\sum_i (\partial L / \partial x_i)^2`, summed over every entry of ``x``.

    ``x`` is the whole tensor given to ``loss_of_input``, batch included: with a loss
    that averages over a batch of ``B`` samples, each sample's gradient carries a factor
    ``1/B``. For a per-sample penalty (e.g. WGAN-GP's) vmap over the samples instead.
    The gradient is taken with ``torch.func.vjp``, so the result is differentiable
    w.r.t. anything ``loss_of_input`` closes over (the parameters, inside
    ``torch.func.grad``).

    The penalty of double backpropagation (Drucker & LeCun, "Improving generalization
    performance using double backpropagation", IEEE TNN 1992); WGAN-GP (Gulrajani et
    al., 2017) penalizes the per-sample norm instead.

    Args:
        loss_of_input: maps ``x`` to a 0-d loss, typically
            ``lambda x: loss_fn(functional_call(model, params, (x,)), y)``.
        x: the input, a floating-point tensor of any shape (batch included).

    Returns:
        A 0-d tensor in ``x``'s dtype, absolute (a sum over every entry of ``x``, not
        per sample), at unit strength.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``loss_of_input`` does not return a 0-d tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> w = torch.tensor([1.0, 2.0, 2.0])
        >>> loss_of_input = lambda x: (x @ w).sum()
        >>> fr.function_space.input_gradient_norm(loss_of_input, torch.ones(4, 3))  # 4 ||w||^2
        tensor(36.)
    """
    _check_input("input_gradient_norm", x)
    # torch types vjp/jvp as a 2- or 3-tuple (no overload on has_aux).
    loss, vjp_fn = vjp(loss_of_input, x)  # type: ignore[misc]
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"input_gradient_norm: loss_of_input must return a 0-d tensor, got {got}")
    gradient: Tensor
    (gradient,) = vjp_fn(torch.ones_like(loss))
    return gradient.square().sum()


def jacobian_frobenius(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    projections: int | Tensor = 1,
    *,
    mode: Literal["vjp", "jvp"] = "vjp",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Hutchinson estimate of the squared Frobenius norm of the Jacobian
    :math:`J = \partial\, \mathrm{fn}(x) / \partial x`.

    With projections :math:`v_1, \dots, v_k`:

    .. math::
        \widehat{\|J\|_F^2} = \frac{1}{k} \sum_{j=1}^k \|J^T v_j\|^2 \ \text{(vjp)}
        \quad\text{or}\quad \frac{1}{k} \sum_{j=1}^k \|J v_j\|^2 \ \text{(jvp)}.

    It is unbiased whenever :math:`E[v v^T] = I`, as for the default standard Gaussian
    draws, and exact whenever :math:`\frac{1}{k}\sum_j v_j v_j^T = I`, e.g. an
    orthonormal basis scaled by :math:`\sqrt{\dim v}`. With Gaussian draws its variance
    is :math:`2\|J J^T\|_F^2 / k = 2 \sum_i \sigma_i^4 / k` in both modes, so its
    relative standard deviation is at most :math:`\sqrt{2/k}` (reached when ``J`` has
    rank one).

    ``J`` is the Jacobian of the whole map ``x -> fn(x)``, batch included, and nothing is
    normalized per sample: when ``fn`` treats the samples of a batch independently, ``J``
    is block diagonal and the estimate is of the *sum* over samples of each sample's
    :math:`\|J_b\|_F^2`; divide by the batch size for the mean. A projection of the
    batch's shape holds an independent vector per sample, so over ``B`` alike samples the
    relative standard deviation is about :math:`\sqrt{2/(kB)}`.

    ``"vjp"`` (reverse mode; :math:`v` has the output's shape) runs ``fn`` forward once;
    ``"jvp"`` (forward mode; :math:`v` has the input's shape) runs it once per projection
    but keeps no activations for a backward pass. Both are differentiable w.r.t. what
    ``fn`` closes over.

    Hutchinson's trace estimator (Hutchinson, 1989) applied to :math:`J^T J`, as in the
    Jacobian regularizer of Hoffman, Roberts & Yaida, "Robust Learning with Jacobian
    Regularization" (2019), which uses the vjp form.

    Args:
        fn: maps ``x`` to a floating-point tensor, typically
            ``lambda x: functional_call(model, params, (x,))``.
        x: the input, a floating-point tensor.
        projections: how many standard Gaussian vectors to draw, or the vectors
            themselves as a tensor of shape ``(k, *fn(x).shape)`` (vjp) or
            ``(k, *x.shape)`` (jvp). Passing the vectors makes the result reproducible
            under any transform; drawing them inside ``vmap`` needs
            ``randomness="different"`` (or ``"same"``).
        mode: ``"vjp"`` or ``"jvp"``.
        generator: the random generator for the draws (on ``x``'s device). Leave it
            ``None`` under ``torch.compile``, which cannot trace a generator.

    Returns:
        A 0-d tensor in ``x``'s dtype: the sum over the batch (absolute, not per
        sample), at unit strength.

    Raises:
        ValueError: ``mode`` is not ``"vjp"`` or ``"jvp"``; ``projections`` is an int
            below 1, or a tensor of the wrong shape or with no vector, or is a tensor
            given with a ``generator``.
        TypeError: ``x`` is not a floating-point tensor; ``projections`` is neither an
            int nor a tensor; with ``mode="jvp"``, ``fn`` returns a non-floating tensor
            (with ``"vjp"``, ``torch.func.vjp`` raises its own ``RuntimeError``).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> x = torch.zeros(4)
        >>> basis = 2.0 * torch.eye(4)  # orthonormal, scaled by sqrt(4): exact
        >>> fr.function_space.jacobian_frobenius(lambda x: 3 * x, x, basis)  # 9 * 4
        tensor(36.)
        >>> estimate = fr.function_space.jacobian_frobenius(
        ...     torch.tanh, x, 1000, generator=torch.Generator().manual_seed(0)
        ... )
        >>> abs(estimate.item() - 4.0) < 0.5  # J = I, std sqrt(2 * 4 / 1000) = 0.09
        True
    """
    _check_input("jacobian_frobenius", x)
    products: Tensor
    if mode == "vjp":
        # torch types vjp/jvp as a 2- or 3-tuple (no overload on has_aux).
        out, vjp_fn = vjp(fn, x)  # type: ignore[misc]
        _check_output("jacobian_frobenius", out)
        vectors = _projections(projections, out, generator, "fn(x)")
        (products,) = vmap(vjp_fn)(vectors)
    elif mode == "jvp":
        vectors = _projections(projections, x, generator, "x")
        products = vmap(functools.partial(_jvp_output, fn, x))(vectors)
    else:
        raise ValueError(f'jacobian_frobenius: mode must be "vjp" or "jvp", got {mode!r}')
    return products.square().sum() / vectors.shape[0]


def _jvp_output(fn: Callable[[Tensor], Tensor], x: Tensor, vector: Tensor) -> Tensor:
    tangent: Tensor
    # torch types vjp/jvp as a 2- or 3-tuple (no overload on has_aux).
    out, tangent = jvp(fn, (x,), (vector,))  # type: ignore[misc]
    _check_output("jacobian_frobenius", out)
    return tangent


def _projections(
    projections: int | Tensor, like: Tensor, generator: torch.Generator | None, of: str
) -> Tensor:
    if isinstance(projections, Tensor):
        if generator is not None:
            raise ValueError(
                "jacobian_frobenius: a generator is only used to draw projections; "
                "pass a number of projections, not a tensor, with it"
            )
        if projections.ndim != like.ndim + 1 or projections.shape[1:] != like.shape:
            raise ValueError(
                f"jacobian_frobenius: projections must have shape (k, *{of}.shape) = "
                f"(k, {', '.join(map(str, like.shape))}), got {tuple(projections.shape)}"
            )
        if projections.shape[0] == 0:
            raise ValueError("jacobian_frobenius: projections holds no vector (k = 0)")
        return projections.to(like.dtype)
    if isinstance(projections, bool) or not isinstance(projections, int):
        raise TypeError(
            f"jacobian_frobenius: projections must be an int or a tensor, got {projections!r}"
        )
    if projections < 1:
        raise ValueError(f"jacobian_frobenius: projections={projections} must be at least 1")
    return torch.randn(
        (projections, *like.shape), generator=generator, dtype=like.dtype, device=like.device
    )


def jacobian_frobenius_exact(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Exact :math:`\|J\|_F^2 = \sum_{i,j} (\partial\, \mathrm{fn}(x)_i / \partial x_j)^2`.

    The same quantity as :func:`jacobian_frobenius` estimates (the whole map, batch
    included), from the full Jacobian built by ``torch.func.jacrev``: it takes one
    backward pass per output entry and memory ``fn(x).numel() * x.numel()``, so it
    suits small inputs, tests and checking the estimator.

    Args:
        fn: maps ``x`` to a floating-point tensor of any shape.
        x: the input, a floating-point tensor of any shape (batch included).

    Returns:
        A 0-d tensor in the output's dtype, the sum over the batch, at unit strength.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``fn`` returns a
            non-floating one.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> fr.function_space.jacobian_frobenius_exact(lambda x: x.sum().expand(2),
        ...                                            torch.zeros(3))  # 2 * 3 ones
        tensor(6.)
    """
    _check_input("jacobian_frobenius_exact", x)
    jacobian: Tensor = jacrev(functools.partial(_checked_output, fn))(x)
    return jacobian.square().sum()


def _checked_output(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = fn(x)
    _check_output("jacobian_frobenius_exact", out)
    return out


def _check_input(owner: str, x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{owner}: x must be a floating-point tensor, got {got}")


def _check_output(owner: str, out: object) -> None:
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"{owner}: fn must return a floating-point tensor, got {got}")


class SpectralNormState(NamedTuple):
    """State of :func:`spectral_norm`.

    Attributes:
        u: for each penalized matrix, keyed by its leaf name (``"0.weight"``), a unit
            vector of length ``shape[0]``: its left singular vector estimate. A flat dict
            of tensors holds no ``None``, so the state can be the auxiliary output of
            ``torch.func.grad(..., has_aux=True)``, be vmapped, stacked and saved.
            Each vector has the matrix's dtype and device, shape ``(shape[0],)``.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.function_space.init_spectral_norm({"w": torch.ones(3, 2)})
        >>> state.u["w"].shape
        torch.Size([3])
    """

    u: dict[str, Tensor]


def init_spectral_norm(
    params: Params, *, where: Where = None, generator: torch.Generator | None = None
) -> SpectralNormState:
    """A random unit vector for each matrix that ``where`` selects.

    Each leaf is viewed as a matrix ``(shape[0], -1)`` (a conv kernel's output channels
    by the rest). By default (``where=None``) the selection is every leaf with
    ``ndim >= 2``; selecting a leaf with fewer dims is an error. For an ensemble, init
    each member and :func:`functorch_reg.stack` the states.

    Args:
        params: the parameter pytree.
        where: which leaves to penalize (see :mod:`functorch_reg.select`).
        generator: the random generator for the vectors (on the params' device).

    Returns:
        A :class:`SpectralNormState`, one vector of shape ``(shape[0],)`` per matrix,
        in its dtype and on its device.

    Raises:
        ValueError: a selected leaf has fewer than 2 dims; no floating matrix is
            selected; ``where`` is a glob that matches no leaf.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)}
        >>> list(fr.function_space.init_spectral_norm(params).u)  # biases are skipped
        ['0.weight']
    """
    leaves, spec = flatten(params)
    chosen = selected(params, weights() if where is None else where)
    vectors = {}
    for name, leaf, is_chosen in zip(spec_names(spec), leaves, chosen, strict=True):
        if not is_chosen:
            continue
        if leaf.ndim < 2:
            raise ValueError(
                f"init_spectral_norm needs matrices, got leaf {name!r} of shape "
                f"{tuple(leaf.shape)}; choose the leaves with where="
            )
        draw = torch.randn(leaf.shape[0], generator=generator, dtype=leaf.dtype, device=leaf.device)
        vectors[name] = torch.nn.functional.normalize(draw, dim=0, eps=_EPS)
    if not vectors:
        raise ValueError(
            f"init_spectral_norm: no floating-point matrix selected among {spec_names(spec)}"
        )
    return SpectralNormState(vectors)


def spectral_norm(
    params: Params, state: SpectralNormState, n_power_iterations: int = 1
) -> tuple[Tensor, SpectralNormState]:
    r"""Sum of the largest singular values of the matrices in ``state``, by power iteration.

    For each matrix :math:`W` (a leaf viewed as ``(shape[0], -1)``) with a vector
    :math:`u` in ``state``, each iteration computes, without gradient,

    .. math::
        v \leftarrow W^T u / \|W^T u\|, \qquad u \leftarrow W v / \|W v\|,

    and the penalty is :math:`\sum_W u^T W v`, an estimate of :math:`\sum_W \sigma_{\max}(W)`
    from below. The vectors converge geometrically, their error shrinking by
    :math:`(\sigma_2 / \sigma_1)^2` per iteration, and the estimate's error is of the
    order of the square of theirs. Its gradient
    w.r.t. :math:`W` is :math:`u v^T` (the vectors are constants, as in
    ``torch.nn.utils.parametrizations.spectral_norm``), which at convergence is the
    gradient of :math:`\sigma_{\max}(W)`. Carrying the returned state to the next call
    continues the iteration, so one iteration per training step usually suffices; ``n``
    calls with one iteration each give the same as one call with ``n``. A zero matrix
    keeps its vector (and contributes 0) rather than losing it for good; what counts
    as zero is relative to the matrix's largest entry, so the result scales with the
    matrix however small or large its entries.

    Args:
        params: the parameter pytree; only the leaves named in ``state.u`` count.
        state: from :func:`init_spectral_norm` or a previous call; not modified.
        n_power_iterations: iterations to run, at least 1.

    The spectral norm regularization of Yoshida & Miyato, "Spectral Norm Regularization
    for Improving the Generalizability of Deep Learning" (2017), with their 1/2 and
    square left out; the power iteration is that of Miyato et al. (ICLR 2018) and
    ``torch.nn.utils.parametrizations.spectral_norm``.

    Returns:
        ``(penalty, new_state)``: a 0-d tensor in the promoted dtype of the matrices,
        and the updated vectors.

    Raises:
        TypeError: ``n_power_iterations`` is not an int; ``state`` is not a
            :class:`SpectralNormState`.
        ValueError: ``n_power_iterations`` is below 1; ``state`` holds no vector, or
            one for a leaf that ``params`` lack or of another length or dtype.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.diag(torch.tensor([3.0, 1.0])), "b": torch.zeros(2)}
        >>> state = fr.function_space.init_spectral_norm(
        ...     params, generator=torch.Generator().manual_seed(0))
        >>> penalty, state = fr.function_space.spectral_norm(params, state, n_power_iterations=20)
        >>> round(penalty.item(), 4), list(state.u)
        (3.0, ['w'])
    """
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
        raise TypeError(
            f"spectral_norm: n_power_iterations must be an int, got {n_power_iterations!r}"
        )
    if n_power_iterations < 1:
        raise ValueError(
            f"spectral_norm: n_power_iterations={n_power_iterations} must be at least 1"
        )
    if not isinstance(state, SpectralNormState) or not isinstance(state.u, dict):
        raise TypeError(
            "spectral_norm: state must be a SpectralNormState from init_spectral_norm, "
            f"got {type(state).__name__}"
        )
    if not state.u:
        raise ValueError("spectral_norm: state holds no vector; build it with init_spectral_norm")
    leaves, spec = flatten(params)
    by_name = dict(zip(spec_names(spec), leaves, strict=True))
    for name, u in state.u.items():
        if name not in by_name:
            raise ValueError(
                f"spectral_norm: state.u has a vector for {name!r}, which params lack; "
                f"leaf names are {list(by_name)}"
            )
        leaf = by_name[name]
        if not _fits(leaf, u):
            raise ValueError(
                f"spectral_norm: state.u does not match params at leaf {name!r}: "
                f"{_describe(u)} for a leaf of {_describe(leaf)}; a matrix (ndim >= 2) needs "
                "a vector of its shape[0] and dtype, as init_spectral_norm builds"
            )
    sigmas, new_vectors = [], {}
    for name, u in state.u.items():
        matrix = by_name[name].reshape(by_name[name].shape[0], -1)
        new_vectors[name], v = _power_iteration(matrix.detach(), u.detach(), n_power_iterations)
        sigmas.append(torch.dot(new_vectors[name], torch.mv(matrix, v)))
    dtype = functools.reduce(torch.promote_types, [sigma.dtype for sigma in sigmas])
    penalty = torch.stack([sigma.to(dtype) for sigma in sigmas]).sum()
    return penalty, SpectralNormState(new_vectors)


def _power_iteration(matrix: Tensor, u: Tensor, n: int) -> tuple[Tensor, Tensor]:
    # The vectors do not depend on the matrix's scale: iterating on the matrix divided
    # by its largest entry makes the cutoff for a degenerate (zero) vector relative,
    # so that a matrix of 1e-13 entries is not taken for a zero one.
    largest = matrix.abs().amax()
    matrix = matrix / torch.where(largest > 0, largest, torch.ones_like(largest))
    for _ in range(n):
        v = torch.nn.functional.normalize(torch.mv(matrix.T, u), dim=0, eps=_EPS)
        wv = torch.mv(matrix, v)
        norm = torch.linalg.vector_norm(wv)
        # torch's spectral_norm would set u to zero here for good (e.g. on a LoRA B
        # matrix initialized at zero); keeping the old u resumes once W is nonzero.
        u = torch.where(norm > _EPS, wv / norm, u)
    return u, v


def _fits(leaf: object, u: Tensor) -> bool:
    return (
        isinstance(leaf, Tensor)
        and isinstance(u, Tensor)
        and leaf.ndim >= 2
        and u.shape == leaf.shape[:1]
        and u.dtype == leaf.dtype
    )


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
