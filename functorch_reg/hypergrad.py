r"""Hypergradients: derivatives of a validation loss with respect to regularization strengths.

A grid sweep spends one training per strength and cannot search a strength per layer.
A hypergradient :math:`\frac{d}{d\lambda} L_{val}(w^*(\lambda))` tunes many strengths at
the cost of a few trainings. Two forms:

- :func:`implicit` differentiates the optimality condition at trained parameters
  (implicit function theorem; Pedregosa 2016, Lorraine et al. 2020). Without a prox,
  :math:`\nabla_w L(w^*, \lambda) = 0` gives

  .. math:: \frac{d L_{val}}{d\lambda} = -\left(\partial_\lambda \nabla_w L\right)^\top
            H^{-1} \nabla_w L_{val}, \qquad H = \nabla^2_w L,

  solved by conjugate gradients on Hessian-vector products (``H`` is never formed).
  With a prox, :math:`w^*` is a fixed point of the proximal-gradient map
  :math:`T(w) = \operatorname{prox}(w - \eta \nabla_w L(w, \lambda), \eta\lambda)`, and
  :math:`dw^*/d\lambda = (I - \partial_w T)^{-1} \partial_\lambda T`.
- :func:`unrolled` differentiates through ``steps`` optimizer steps (Franceschi et al.
  2017), optionally recomputing each step in the backward pass so that activations
  are not stored for every step.

:func:`tune` alternates training steps with steps on :math:`\log\lambda`, tuning
per-layer strengths within one training run.

:func:`cg` and :func:`normal_cg` are the linear solvers behind ``implicit``'s
``solver="cg"`` and ``"normal_cg"``, for a ``solver=`` callable of one's own.

``train_loss(params, strengths)`` is the training objective, penalties included, and
``val_loss(params)`` the validation loss; both return a 0-d tensor. ``strengths`` is a
floating 0-d tensor or a vector (e.g. one strength per layer), and the hypergradient
has its shape. Only floating-point leaves of ``params`` are differentiated.

Second derivatives through attention: the fused kernels of
``torch.nn.functional.scaled_dot_product_attention`` (flash, memory-efficient, cuDNN,
and the CPU flash kernel) have no double backward, so the hypergradients' passes run
under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, the backend that has one
(``transformers``' and timm's default attention go through it). This costs the math
backend's memory for those passes only; training outside them is unaffected.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from . import _plot
from ._checks import check_positive_int
from ._linear_solve import cg, norm, normal_cg
from .optim import Optimizer, adam
from .tree import Params, flatten, is_float, spec_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TuneHistory", "TuneResult", "cg", "implicit", "normal_cg", "tune", "unrolled"]

Leaves = tuple[Tensor, ...]
TrainLoss = Callable[[Params, Tensor], Tensor]
ValLoss = Callable[[Params], Tensor]
Solver = Literal["cg", "normal_cg"] | Callable[[Callable[[Leaves], Leaves], Leaves], Leaves]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _math_attention(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with SDPA restricted to the math backend (see the module doc)."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if torch.compiler.is_compiling():  # compiled graphs take no double backward anyway
            return function(*args, **kwargs)
        with sdpa_kernel(SDPBackend.MATH):
            return function(*args, **kwargs)

    return wrapper


def implicit(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Params,
    strengths: Tensor,
    *,
    prox: Callable[[Params, Tensor], Params] | None = None,
    step_size: float | Tensor | None = None,
    solver: Solver = "cg",
    maxiter: int = 100,
    tol: float = 1e-10,
    damping: float = 0.0,
    stationary_tol: float = 1e-4,
) -> Tensor:
    r"""Hypergradient :math:`d L_{val}(w^*(\lambda)) / d\lambda` by implicit differentiation.

    ``params`` must be (near) a minimizer of ``train_loss(., strengths)``, or with
    ``prox`` a fixed point of
    :math:`T(w) = \operatorname{prox}(w - \eta \nabla_w L(w, \lambda), \eta\lambda)`,
    :math:`\eta` = ``step_size``, the map that ``fr.sgd(lr=step_size, prox=prox)`` iterates;
    ``train_loss`` is then the smooth part only. ``prox(params, threshold)`` gets
    ``threshold = step_size * strengths``; for a vector of strengths, write a prox that
    applies ``threshold[i]`` to its own leaves (``fr.prox.l1(p, threshold[i], where=...)``).
    The optimizers built with ``prox_metric="preconditioned"`` (Adam, SGD with momentum)
    converge to these same fixed points, the solutions of ``train_loss + lam * P``, so
    params they trained take the same ``prox`` here; with the Euclidean prox, Adam's and
    momentum's fixed points are not :math:`T`'s.

    Solvers, all on matrix-free products with a fixed number of iterations (``maxiter``),
    frozen once converged, keeping the best iterate (an indefinite Hessian makes the
    residual non-monotone):

    - ``"cg"``: conjugate gradients on :math:`(H + \text{damping}\, I) u = \nabla L_{val}`.
      With a prox whose Jacobian is 0 or 1 per entry (``fr.prox.l1``, and any prox on
      the leaves its ``where=`` leaves out), the system is restricted to the support (the
      entries the prox leaves nonzero), where :math:`I - \partial_w T = \eta H` is
      symmetric; the zeros stay zero, their derivative is 0. A prox with another Jacobian
      (``group_lasso``, ``l2``) makes :math:`I - \partial_w T` non-symmetric, for which
      plain CG is wrong: that is an error, use ``"normal_cg"``.
    - ``"normal_cg"``: CG on the normal equations :math:`M M^\top u = M v`, with
      :math:`M^\top = I - \partial_w T^\top`; correct for any prox, at two products
      (a JVP and a VJP) per iteration and a squared condition number.

    Convergence means a relative residual :math:`\|A u - b\| / \|b\|` at most
    ``max(tol, 64 * eps)`` of the dtype; otherwise a ``RuntimeWarning`` reports the
    residual. A ``RuntimeWarning`` also reports a stationarity residual
    (:math:`\|\nabla_w L\|`, or :math:`\|T(w) - w\| / \eta` with a prox) above
    ``stationary_tol``. CG stopped by non-positive curvature (the Hessian is not positive
    definite: params are a saddle point or a maximum) warns so, and names the ways out:
    ``damping=``, or ``solver="normal_cg"``, which solves :math:`H^2 u = H v` and is exact
    for any nonsingular :math:`H`. A NaN in the solve (the gradient of ``val_loss`` or a
    Hessian-vector product) gives a NaN hypergradient, with a warning. Under
    ``torch.compile`` the loop runs all ``maxiter`` iterations and nothing is read back: no
    warnings or value checks, and no check of the prox's Jacobian for ``"cg"`` (run it
    once eagerly first).

    Args:
        train_loss: ``train_loss(params, strengths) -> 0-d tensor``.
        val_loss: ``val_loss(params) -> 0-d tensor``.
        params: the trained parameters (a pytree).
        strengths: floating 0-d tensor or vector.
        prox: a proximal operator ``prox(params, threshold) -> params``.
        step_size: :math:`\eta` of the proximal-gradient map; required with ``prox``.
        solver: ``"cg"``, ``"normal_cg"``, or a callable ``solve(matvec, b) -> x`` that
            solves :math:`M^\top u = v` given ``matvec(x) -> M^T x`` on a tuple of leaves
            shaped like the float params and ``b = v`` (the gradient of ``val_loss``); here
            :math:`M^\top` is :math:`H + \text{damping}\, I` without a prox (symmetric) and
            :math:`(1 + \text{damping}) I - \partial_w T^\top` with one (not symmetric in
            general, and not restricted to the support); ``maxiter`` does not apply to it,
            ``tol`` only sets when the residual warning fires. For example
            ``functools.partial(fr.hypergrad.cg, maxiter=50, tol=1e-8)``, or a wrapper
            of it that counts products.
        maxiter: iterations of the solver (matrix-vector products).
        tol: relative residual at which the solver stops.
        damping: added to the Hessian (``H + damping * I``), for non-convex losses;
            with a prox, to :math:`I - \partial_w T` (which is :math:`\eta H` on the
            support).
        stationary_tol: warn when the stationarity residual is above this.

    Returns:
        The hypergradient, shaped like ``strengths``.

    Raises:
        TypeError: ``strengths`` is not a floating tensor.
        ValueError: ``strengths`` or a params leaf is non-finite or on the meta device,
            they are on different devices, ``step_size`` is not positive and finite, or
            a solver setting is bad; the message names the leaf or argument.

    Example:
        Ridge regression, ``L = |Xw - y|^2 / n + lam |w|^2``:

        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> lam = torch.tensor(0.1, dtype=torch.float64)
        >>> train = lambda w, lam: (X @ w - y).square().mean() + lam * w.square().sum()
        >>> val = lambda w: (X @ w - 1).square().mean()
        >>> H = 2 * X.T @ X / 20 + 2 * lam * torch.eye(3, dtype=torch.float64)
        >>> w = torch.linalg.solve(H, 2 * X.T @ y / 20)
        >>> dw = -torch.linalg.solve(H, 2 * w)
        >>> exact = torch.func.grad(val)(w) @ dw
        >>> torch.allclose(implicit(train, val, w, lam), exact)
        True
    """
    hypergradient, _ = _implicit(
        train_loss,
        val_loss,
        params,
        strengths,
        prox=prox,
        step_size=step_size,
        solver=solver,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        stationary_tol=stationary_tol,
        warn=True,
    )
    return hypergradient


def unrolled(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Params,
    strengths: Tensor,
    optimizer: Optimizer,
    steps: int,
    *,
    checkpoint: bool = False,
) -> tuple[Tensor, Params]:
    r"""Hypergradient through ``steps`` optimizer steps, and the trained parameters.

    Runs, from ``optimizer.init(params)``, exactly
    ``params, state = optimizer.step(params, torch.func.grad(train_loss)(params, strengths),
    state)`` ``steps`` times and differentiates ``val_loss`` of the result with respect
    to ``strengths``. The pure ``step`` keeps every step differentiable (``step_``
    would not).

    Memory: without ``checkpoint`` the autograd graph of every step is kept, so memory
    grows with ``steps`` times the activations. With ``checkpoint=True`` the forward
    pass keeps only each step's input parameters and optimizer state, and the backward
    pass recomputes one step at a time (a VJP per step), so activations are held for one
    step only; the stored trajectory (parameters and state per step) still grows with
    ``steps``. Both give the same hypergradient.

    Adam: :math:`\sqrt{v}` has an infinite derivative at :math:`v = 0`, which Adam's
    state reaches wherever a gradient entry is exactly zero (a dead unit, an
    always-zero input) and the second derivative is then NaN. A non-finite
    hypergradient warns with this explanation; use SGD, or a loss whose gradient has no
    exact zeros (an L2 penalty on the affected weights), for such models.

    Args:
        train_loss: ``train_loss(params, strengths) -> 0-d tensor``.
        val_loss: ``val_loss(params) -> 0-d tensor``.
        params: initial parameters.
        strengths: floating 0-d tensor or vector.
        optimizer: a functional optimizer, e.g. ``fr.sgd(lr=0.1, momentum=0.9)`` (not a
            ``torch.optim`` one, whose in-place update cannot be differentiated).
        steps: number of optimizer steps (a positive int).
        checkpoint: recompute each step in the backward pass instead of storing it.

    Returns:
        ``(hypergradient, trained_params)``; the hypergradient is shaped like
        ``strengths``, and ``trained_params`` are detached.

    Raises:
        TypeError: ``strengths`` is not a floating tensor; ``optimizer`` is not a
            functorch_reg ``Optimizer`` (e.g. a ``torch.optim`` one).
        ValueError: ``strengths`` or a params leaf is not finite; ``steps`` is not a
            positive int.

    Example:
        >>> from functorch_reg import sgd
        >>> w0 = torch.zeros(2, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64)
        >>> train = lambda w, lam: (w - 1).square().sum() + lam * w.square().sum()
        >>> val = lambda w: (w - 2).square().sum()
        >>> hyper, w = unrolled(train, val, w0, lam, sgd(lr=0.1), steps=3)
        >>> hyper_ckpt, _ = unrolled(train, val, w0, lam, sgd(lr=0.1), 3, checkpoint=True)
        >>> torch.allclose(hyper, hyper_ckpt)
        True
    """
    _check_strengths("unrolled", strengths)
    check_positive_int("hypergrad.unrolled", "steps", steps)
    _check_optimizer("unrolled", optimizer)
    split = _Split(params)
    _check_params("unrolled", split, strengths, finite=True)
    hypergradient, trained, _ = _unroll(
        train_loss, val_loss, split, strengths, optimizer, None, steps, checkpoint
    )
    _warn_if_nonfinite(hypergradient)
    return hypergradient, trained


@dataclass(frozen=True)
class TuneHistory:
    """What :func:`tune` recorded before its first round and after each round.

    Attributes:
        train_steps: training steps done so far, shape ``(rounds + 1,)``.
        strengths: the strengths, shape ``(rounds + 1, *strengths.shape)``.
        val_loss: the validation loss, shape ``(rounds + 1,)``.
        hypergradient: the hypergradient of each round, shape
            ``(rounds, *strengths.shape)``.
    """

    train_steps: Tensor
    strengths: Tensor
    val_loss: Tensor
    hypergradient: Tensor


@dataclass(frozen=True)
class TuneResult:
    """The outcome of :func:`tune`.

    Attributes:
        params: the trained parameters (detached).
        strengths: the final strengths.
        train_steps: training steps run in all (optimizer steps on the parameters).
        history: per-round record, see :class:`TuneHistory`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> def train(w, lam):
        ...     return (w - 1).square().sum() + lam * w.square().sum()
        >>> result = fr.hypergrad.tune(train, lambda w: (w - 1).square().sum(),
        ...                            torch.zeros(2), torch.tensor(1.0), fr.sgd(lr=0.1),
        ...                            rounds=3, steps_per_round=2, progress=False)
        >>> result.train_steps, result.history.val_loss.shape
        (6, torch.Size([4]))
    """

    params: Params
    strengths: Tensor
    train_steps: int
    history: TuneHistory

    def plot(
        self,
        path: str | None = None,
        *,
        title: str | None = None,
        names: Sequence[str] | None = None,
    ) -> Figure:
        """Strengths (log scale) and validation loss against training steps.

        Args:
            path: where to save the figure (format from the suffix), or ``None``.
            title: the figure's title; by default, how many strengths were tuned in how
                many rounds and training steps.
            names: one legend name per strength (e.g. the layer each one regularizes), in
                the order of the strengths vector; by default ``"strength i"``.

        Returns:
            A ``matplotlib.figure.Figure`` (not registered with pyplot; the backend is
            left alone: in a notebook, make it the cell's value to show it).

        Raises:
            ValueError: ``names`` does not have one entry per strength.
            ImportError: matplotlib is not installed.
        """
        return _plot.tune_figure(self, path, title, names)


def tune(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Params,
    strengths: Tensor,
    optimizer: Optimizer,
    *,
    rounds: int,
    steps_per_round: int,
    hyper_lr: float = 0.1,
    method: Literal["implicit", "unrolled"] = "implicit",
    maxiter: int = 20,
    damping: float = 0.0,
    progress: bool = True,
) -> TuneResult:
    r"""Tune strengths during one training run, by hypergradient steps on :math:`\log\lambda`.

    Each round runs ``steps_per_round`` optimizer steps on the parameters (the optimizer
    state carries over), then one Adam step (learning rate ``hyper_lr``) on
    :math:`\log\lambda` along :math:`\lambda \odot dL_{val}/d\lambda`, which keeps every
    strength positive and moves strengths of different scales alike. The hypergradient
    is

    - ``"implicit"``: :func:`implicit` at the current parameters, as if they were
      trained (Lorraine et al. 2020), with ``maxiter`` CG iterations and ``damping``; the
      optimizer's prox is not modelled, so use penalties in ``train_loss``.
    - ``"unrolled"``: through this round's steps (:func:`unrolled` from the round's
      starting point and optimizer state): exact for the round, but greedy, which
      favours small strengths (short-horizon bias).

    Non-finite values stop the run: when a round's training diverges (a params leaf or
    the validation loss becomes NaN or inf) or its hypergradient is not finite, ``tune``
    warns (``RuntimeWarning``, saying which) and returns the state before that round:
    its params, strengths and history, and ``train_steps`` counts the steps kept.

    Args:
        train_loss: ``train_loss(params, strengths) -> 0-d tensor``.
        val_loss: ``val_loss(params) -> 0-d tensor``.
        params: initial parameters.
        strengths: initial strengths, positive and finite (0-d or a vector).
        optimizer: the functional optimizer that trains ``params`` (``fr.sgd(...)``,
            ``fr.adam(...)``; a ``torch.optim`` optimizer is refused).
        rounds: number of hypergradient steps.
        steps_per_round: optimizer steps between hypergradient steps.
        hyper_lr: Adam learning rate on :math:`\log\lambda`.
        method: ``"implicit"`` or ``"unrolled"``.
        maxiter: CG iterations per implicit hypergradient.
        damping: Hessian damping of the implicit hypergradient.
        progress: show a progress bar.

    Returns:
        A :class:`TuneResult` with the trained parameters, the final strengths and the
        history to plot.

    Raises:
        TypeError: ``strengths`` is not a floating tensor; ``optimizer`` is not a
            functorch_reg ``Optimizer``.
        ValueError: before any forward pass, ``strengths`` not positive and finite, a
            params leaf not finite, ``rounds``, ``steps_per_round`` or ``maxiter`` not a
            positive int, an unknown ``method``, ``hyper_lr`` not positive and finite,
            ``damping`` negative or not finite.

    Example:
        Noise-free targets: less regularization is better, and the strength falls.

        >>> from functorch_reg import sgd
        >>> X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
        >>> y = X @ torch.tensor([1.0, -1.0, 0.5])
        >>> def train(w, lam):
        ...     return (X[:20] @ w - y[:20]).square().mean() + lam * w.square().sum()
        >>> def val(w):
        ...     return (X[20:] @ w - y[20:]).square().mean()
        >>> result = tune(train, val, torch.zeros(3), torch.tensor(1.0), sgd(lr=0.1),
        ...               rounds=10, steps_per_round=5, progress=False)
        >>> result.train_steps, bool(result.strengths < 0.5)
        (50, True)
    """
    _check_tune_arguments(
        strengths, optimizer, rounds, steps_per_round, method, hyper_lr, maxiter, damping
    )
    split = _Split(params)
    _check_params("tune", split, strengths, finite=True)
    hyper_optimizer = adam(lr=hyper_lr)
    log_strengths = strengths.detach().log()
    hyper_state = hyper_optimizer.init(log_strengths)
    state = optimizer.init(params)
    done = 0
    record_steps, record_strengths, record_val, record_hyper = [0], [strengths.detach()], [], []
    record_val.append(_value(val_loss, split.tree(split.floats)).detach())
    bar = tqdm(range(rounds), desc="tune strengths", disable=not progress)
    for round_index in bar:
        current = log_strengths.exp()
        trained, state, hyper = _tune_round(
            train_loss, val_loss, split, current, optimizer, state, steps_per_round, method,
            maxiter, damping,
        )  # fmt: skip
        val = _value(val_loss, trained.tree(trained.floats)).detach()
        problem = _nonfinite_round(trained, val, hyper, method)
        if problem is not None:
            warnings.warn(
                f"hypergrad.tune: stopped at round {round_index + 1} of {rounds} (after "
                f"{done + steps_per_round} training steps): {problem}. The result keeps the "
                f"last finite state, after {done} steps; lower the optimizer's lr or "
                "hyper_lr, or bound the strengths",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        split = trained
        done += steps_per_round
        log_strengths, hyper_state = hyper_optimizer.step(
            log_strengths, hyper * current, hyper_state
        )
        record_steps.append(done)
        record_strengths.append(log_strengths.exp())
        record_val.append(val)
        record_hyper.append(hyper)
        bar.set_postfix(val_loss=f"{val.item():.4g}")
    history = TuneHistory(
        train_steps=torch.tensor(record_steps),
        strengths=torch.stack(record_strengths),
        val_loss=torch.stack(record_val),
        hypergradient=(
            torch.stack(record_hyper)
            if record_hyper
            else strengths.detach().new_empty((0, *strengths.shape))
        ),
    )
    return TuneResult(
        params=split.tree(split.floats),
        strengths=log_strengths.exp(),
        train_steps=done,
        history=history,
    )


def _check_tune_arguments(
    strengths: Any,
    optimizer: Any,
    rounds: Any,
    steps_per_round: Any,
    method: Any,
    hyper_lr: Any,
    maxiter: Any,
    damping: Any,
) -> None:
    """Every argument of :func:`tune` but the params, before any forward pass."""
    _check_strengths("tune", strengths)
    check_positive_int("hypergrad.tune", "rounds", rounds)
    check_positive_int("hypergrad.tune", "steps_per_round", steps_per_round)
    _check_optimizer("tune", optimizer)
    if method not in ("implicit", "unrolled"):
        raise ValueError(f"tune: method must be 'implicit' or 'unrolled', got {method!r}")
    if not bool((strengths > 0).all()):
        raise ValueError(f"tune: strengths must be positive (tuned in log space), got {strengths}")
    if not _positive_finite(hyper_lr):
        raise ValueError(f"tune: hyper_lr must be a positive, finite float, got {hyper_lr!r}")
    _check_solver_settings("tune", maxiter, 1e-10, damping)


def _tune_round(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    split: _Split,
    strengths: Tensor,
    optimizer: Optimizer,
    state: Any,
    steps: int,
    method: str,
    maxiter: int,
    damping: float,
) -> tuple[_Split, Any, Tensor]:
    """One round of :func:`tune`: ``steps`` optimizer steps from ``(split, state)`` and
    the hypergradient; returns the trained params, the optimizer state and the
    hypergradient (detached)."""
    if method == "unrolled":
        hyper, trained, state = _unroll(
            train_loss, val_loss, split, strengths, optimizer, state, steps, False
        )
        return _Split(trained), state, hyper.detach()
    floats = split.floats
    for _ in range(steps):
        gradient = _train_grad(train_loss, split, floats, strengths)
        new_params, state = optimizer.step(split.tree(floats), split.grads_tree(gradient), state)
        floats = split.float_leaves(new_params)
    split = _Split(split.tree(floats))
    hyper, _ = _implicit_unchecked(split, strengths, train_loss, val_loss, maxiter, damping)
    return split, state, hyper.detach()


def _implicit_unchecked(
    split: _Split,
    strengths: Tensor,
    train_loss: TrainLoss,
    val_loss: ValLoss,
    maxiter: int,
    damping: float,
) -> tuple[Tensor, Tensor]:
    """:func:`implicit` as :func:`tune` calls it: silent, on params that may be non-finite
    (the caller checks the result)."""
    return _implicit(
        train_loss,
        val_loss,
        split.tree(split.floats),
        strengths,
        prox=None,
        step_size=None,
        solver="cg",
        maxiter=maxiter,
        tol=1e-10,
        damping=damping,
        stationary_tol=math.inf,
        warn=False,
        check_params=False,
    )


def _nonfinite_round(split: _Split, val: Tensor, hyper: Tensor, method: str) -> str | None:
    """What went non-finite in a round of :func:`tune`, in words, or ``None``."""
    names = spec_names(split.spec)
    for position, leaf in zip(split.positions, split.floats, strict=True):
        if not bool(torch.isfinite(leaf).all()):
            return f"training diverged: params leaf {names[position]!r} holds NaN or inf"
    if not bool(torch.isfinite(val)):
        return f"the validation loss is {float(val)}"
    if not bool(torch.isfinite(hyper).all()):
        reason = (
            " (with Adam: sqrt(v) at v = 0, a gradient entry exactly zero, has an infinite "
            "derivative; use SGD or method='implicit')"
            if method == "unrolled"
            else ""
        )
        return f"the hypergradient is not finite ({hyper.tolist()}){reason}"
    return None


# ----------------------------------------------------------------------------------------
# Implementation


class _Split:
    """A pytree's floating leaves (the differentiated ones) and how to rebuild it."""

    def __init__(self, params: Params) -> None:
        leaves, self.spec = flatten(params)
        self.leaves = leaves
        self.positions = [i for i, leaf in enumerate(leaves) if is_float(leaf)]
        if not self.positions:
            raise ValueError("hypergrad: params hold no floating-point tensor")
        self.floats: Leaves = tuple(leaves[i].detach() for i in self.positions)

    def tree(self, floats: Sequence[Tensor]) -> Params:
        leaves = list(self.leaves)
        for position, leaf in zip(self.positions, floats, strict=True):
            leaves[position] = leaf
        return self.spec.unflatten(leaves)

    def grads_tree(self, floats: Sequence[Tensor]) -> Params:
        """Gradients shaped like the params; ``None`` (frozen) for non-floating leaves."""
        leaves: list[Any] = [None] * len(self.leaves)
        for position, leaf in zip(self.positions, floats, strict=True):
            leaves[position] = leaf
        return self.spec.unflatten(leaves)

    def float_leaves(self, tree: Params) -> Leaves:
        leaves, spec = flatten(tree)
        if spec != self.spec:
            raise ValueError("hypergrad: prox returned a pytree with another structure than params")
        return tuple(leaves[i] for i in self.positions)


def _scalar(owner: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"hypergrad: {owner} must return a floating 0-d tensor, got {shape}")
    return value


def _value(val_loss: ValLoss, params: Params) -> Tensor:
    with torch.no_grad():
        return _scalar("val_loss", val_loss(params))


def _train_grad(train_loss: TrainLoss, split: _Split, floats: Leaves, strengths: Tensor) -> Leaves:
    def objective(floats: Leaves, strengths: Tensor) -> Tensor:
        return _scalar("train_loss", train_loss(split.tree(floats), strengths))

    gradient: Leaves = grad(objective)(floats, strengths)
    return gradient


def _check_strengths(owner: str, strengths: Any) -> None:
    if not isinstance(strengths, Tensor) or not strengths.is_floating_point():
        kind = strengths.dtype if isinstance(strengths, Tensor) else type(strengths).__name__
        raise TypeError(
            f"hypergrad.{owner}: strengths must be a floating-point tensor (0-d or a "
            f"vector), got {kind}"
        )
    if strengths.is_meta:
        raise ValueError(
            f"hypergrad.{owner}: strengths is on the meta device (it holds no values); "
            "create it on the params' device, e.g. torch.tensor(0.1, device=device)"
        )
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(strengths).all()):
        raise ValueError(
            f"hypergrad.{owner}: strengths must be finite, got {strengths.tolist()}; "
            "a NaN or inf strength has no derivative"
        )


def _check_params(owner: str, split: _Split, strengths: Tensor, *, finite: bool) -> None:
    """Every differentiated leaf holds values on the strengths' device (and, with
    ``finite``, only finite ones: NaN params would give a NaN hypergradient)."""
    names = spec_names(split.spec)
    for position, leaf in zip(split.positions, split.floats, strict=True):
        name = names[position]
        if leaf.is_meta:
            raise ValueError(
                f"hypergrad.{owner}: params leaf {name!r} is on the meta device (it holds "
                "no values); materialize the model first (model.to_empty(device=...) and "
                "initialize it)"
            )
        if leaf.device != strengths.device and not (
            strengths.ndim == 0 and strengths.device.type == "cpu"  # torch mixes these
        ):
            raise ValueError(
                f"hypergrad.{owner}: params leaf {name!r} is on {leaf.device}, strengths "
                f"on {strengths.device}; move strengths with strengths.to({str(leaf.device)!r})"
            )
        if finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(leaf).all()):
            raise ValueError(
                f"hypergrad.{owner}: params leaf {name!r} holds NaN or inf values (did "
                "training diverge? lower the learning rate); the hypergradient at such "
                "params is not finite"
            )


def _check_optimizer(owner: str, optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"hypergrad.{owner}: optimizer must be a functorch_reg Optimizer, got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}; a torch.optim "
            "optimizer updates .grad in place and cannot be differentiated through: pass "
            "the same rule from functorch_reg, e.g. fr.sgd(lr=0.1, momentum=0.9) or "
            "fr.adam(lr=1e-3)"
        )


def _positive_finite(value: Any) -> bool:
    """Whether ``value`` (a number or a one-element tensor) is finite and positive; a
    tensor is taken on trust under ``torch.compile``."""
    if isinstance(value, Tensor):
        if torch.compiler.is_compiling():
            return True
        return value.numel() == 1 and not value.is_meta and 0 < float(value) < math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 < value < math.inf


def _check_solver_settings(owner: str, maxiter: Any, tol: Any, damping: Any) -> None:
    """``maxiter``, ``tol`` and ``damping`` of an implicit hypergradient, checked before
    any forward pass."""
    check_positive_int(f"hypergrad.{owner}", "maxiter", maxiter)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"hypergrad.{owner}: tol must be finite and >= 0, got {tol!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"hypergrad.{owner}: damping must be finite and >= 0, got {damping!r}")


def _check_implicit_arguments(
    strengths: Any,
    prox: Callable[[Params, Tensor], Params] | None,
    step_size: float | Tensor | None,
    solver: Any,
    maxiter: Any,
    tol: Any,
    damping: Any,
) -> None:
    """Every argument of :func:`implicit` but the params, in the order the errors name them."""
    _check_strengths("implicit", strengths)
    if not callable(solver) and solver not in ("cg", "normal_cg"):
        raise ValueError(
            "hypergrad.implicit: solver must be 'cg', 'normal_cg' or a callable "
            f"solve(matvec, b) -> x, got {solver!r}"
        )
    _check_solver_settings("implicit", maxiter, tol, damping)
    if prox is not None and step_size is None:
        raise ValueError(
            "hypergrad.implicit: prox needs step_size, the step of the proximal-gradient "
            "map w -> prox(w - step_size * grad, step_size * strengths)"
        )
    if step_size is not None and not _positive_finite(step_size):
        raise ValueError(
            f"hypergrad.implicit: step_size must be a positive, finite number (the "
            f"learning rate of the proximal-gradient map), got {step_size!r}"
        )


@_math_attention
def _implicit(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Params,
    strengths: Tensor,
    *,
    prox: Callable[[Params, Tensor], Params] | None,
    step_size: float | Tensor | None,
    solver: Solver,
    maxiter: int,
    tol: float,
    damping: float,
    stationary_tol: float,
    warn: bool,
    check_params: bool = True,
) -> tuple[Tensor, Tensor]:
    """The hypergradient and the relative residual of the linear solve: the optimality
    map of the case (the gradient, or the proximal-gradient map's fixed point) handed to
    :func:`_root_vjp`."""
    _check_implicit_arguments(strengths, prox, step_size, solver, maxiter, tol, damping)
    split = _Split(params)
    _check_params("implicit", split, strengths, finite=check_params)
    w = split.floats
    strengths = strengths.detach()

    def val_objective(floats: Leaves) -> Tensor:
        return _scalar("val_loss", val_loss(split.tree(floats)))

    val_grad: Leaves = grad(val_objective)(w)
    support: Leaves | None = None
    if prox is None:
        optimality = _gradient_map(train_loss, split)
    else:
        assert step_size is not None
        optimality = _proximal_gradient_map(train_loss, split, prox, step_size)
        if solver == "cg":
            support = _identity_support(split, prox, w, step_size, strengths, train_loss)
    tolerance = max(tol, 64 * torch.finfo(w[0].dtype).eps)
    report: dict[str, float] = {}
    solve = _solve(solver, maxiter, tolerance, report)
    root = _root_vjp(optimality, w, strengths, val_grad, solve, damping=damping, support=support)
    hypergradient = root.hypergradient
    # A NaN in the solve stops CG at its first step with the zero iterate: say NaN.
    broken = not torch.compiler.is_compiling() and not (
        math.isfinite(report.get("curvature", 0.0)) and bool(root.rhs_norm.isfinite())
    )
    if broken:
        hypergradient = torch.full_like(hypergradient, math.nan)
    if warn and not torch.compiler.is_compiling():
        if prox is None:
            stationarity = norm(root.value)
        else:
            assert step_size is not None
            stationarity = norm(tuple(t - x for t, x in zip(root.value, w, strict=True)))
            stationarity = stationarity / step_size
        _warn_implicit(
            stationarity=float(stationarity),
            stationary_tol=stationary_tol,
            smooth=prox is None,
            broken=broken,
            report=report,
            residual=float(root.residual),
            tolerance=tolerance,
            hypergradient=hypergradient,
            solver=solver,
            maxiter=maxiter,
        )
    return hypergradient.detach(), root.residual.detach()


Optimality = Callable[[Leaves, Tensor], Leaves]
"""``fun(w, strengths) -> leaves shaped like w``, the map an optimality condition is made of."""

Matvec = Callable[[Leaves], Leaves]

Solve = Callable[[Matvec, Leaves, Matvec], Leaves]
"""``solve(matvec, b, rmatvec) -> x`` with ``matvec(x) = A x`` and ``rmatvec(y) = A^T y``."""


class _OptimalityMap(NamedTuple):
    r"""An optimality condition :math:`F(w^*, \lambda) = 0` that defines :math:`w^*(\lambda)`.

    ``F = fun`` (a root condition, e.g. the gradient of the training loss), or with
    ``fixed_point`` the fixed-point residual ``F(w, lam) = w - fun(w, lam)`` of a map
    ``fun`` (e.g. the proximal-gradient map). ``symmetric``: :math:`\partial_w F` is
    symmetric (``fun`` is a gradient: its Jacobian is a Hessian).
    """

    fun: Optimality
    fixed_point: bool
    symmetric: bool


class _RootVJP(NamedTuple):
    """What :func:`_root_vjp` returns: the hypergradient, the relative residual of the
    linear solve, the norm of its right-hand side and ``fun(w, strengths)``."""

    hypergradient: Tensor
    residual: Tensor
    rhs_norm: Tensor
    value: Leaves


def _gradient_map(train_loss: TrainLoss, split: _Split) -> _OptimalityMap:
    r"""Without a prox, :math:`F(w, \lambda) = \nabla_w L(w, \lambda)`, zero at a minimizer;
    :math:`\partial_w F = H`, the Hessian."""

    def gradient(floats: Leaves, lam: Tensor) -> Leaves:
        return _train_grad(train_loss, split, floats, lam)

    return _OptimalityMap(gradient, fixed_point=False, symmetric=True)


def _proximal_gradient_map(
    train_loss: TrainLoss,
    split: _Split,
    prox: Callable[[Params, Tensor], Params],
    eta: float | Tensor,
) -> _OptimalityMap:
    r"""With a prox, the fixed points of
    :math:`T(w) = \operatorname{prox}(w - \eta \nabla_w L(w, \lambda), \eta\lambda)`:
    :math:`F = w - T(w)`, whose Jacobian is not symmetric in general."""

    def proximal_gradient(floats: Leaves, lam: Tensor) -> Leaves:
        gradient = _train_grad(train_loss, split, floats, lam)
        moved = tuple(x - eta * g for x, g in zip(floats, gradient, strict=True))
        return split.float_leaves(prox(split.tree(moved), eta * lam))

    return _OptimalityMap(proximal_gradient, fixed_point=True, symmetric=False)


def _root_vjp(
    optimality: _OptimalityMap,
    w: Leaves,
    strengths: Tensor,
    cotangent: Leaves,
    solve: Solve,
    *,
    damping: float = 0.0,
    support: Leaves | None = None,
) -> _RootVJP:
    r"""The VJP of the root :math:`w^*(\lambda)` of :math:`F(w, \lambda) = 0` with
    ``cotangent`` :math:`v` (implicit function theorem; jaxopt's ``root_vjp``): solve
    :math:`A^\top u = v`, :math:`A = \partial_w F + \text{damping}\, I`, and return
    :math:`-(\partial_\lambda F)^\top u`. With ``support`` (0/1 masks), the system is
    restricted to it: :math:`D A^\top D u = D v`."""
    value, fun_vjp = vjp(optimality.fun, w, strengths)  # type: ignore[misc]

    def damped(x: Leaves, product: Leaves) -> Leaves:  # (A x from fun's product with x)
        if optimality.fixed_point:  # (1 + damping) x - dfun x
            return tuple((1 + damping) * a - b for a, b in zip(x, product, strict=True))
        return tuple(p + damping * a for p, a in zip(product, x, strict=True))

    def transpose_matvec(x: Leaves) -> Leaves:
        return damped(x, fun_vjp(x)[0])

    def matvec(x: Leaves) -> Leaves:
        if optimality.symmetric:
            return transpose_matvec(x)
        return damped(x, jvp(lambda floats: optimality.fun(floats, strengths), (w,), (x,))[1])

    system: Matvec = transpose_matvec
    forward: Matvec = matvec
    rhs = cotangent
    if support is not None:
        system, forward = _restrict(transpose_matvec, support), _restrict(matvec, support)
        rhs = tuple(m * v for m, v in zip(support, cotangent, strict=True))
    u = solve(system, rhs, forward)
    strength_cotangent: Tensor = fun_vjp(u)[1]
    # -(dF/dlam)^T u: dF/dlam = dfun/dlam, or -dfun/dlam for a fixed-point residual.
    hypergradient = strength_cotangent if optimality.fixed_point else -strength_cotangent
    mismatch = tuple(a - b for a, b in zip(system(u), rhs, strict=True))
    rhs_norm = norm(rhs)
    residual = norm(mismatch) / rhs_norm.clamp_min(torch.finfo(w[0].dtype).tiny)
    return _RootVJP(hypergradient, residual, rhs_norm, value)


def _restrict(matvec: Matvec, mask: Leaves) -> Matvec:
    """``x -> D A D x`` for ``matvec = A`` and the 0/1 diagonal ``D`` of ``mask``."""

    def restricted(x: Leaves) -> Leaves:
        masked = tuple(m * a for m, a in zip(mask, x, strict=True))
        return tuple(m * a for m, a in zip(mask, matvec(masked), strict=True))

    return restricted


def _solve(solver: Solver, maxiter: int, tolerance: float, report: dict[str, float]) -> Solve:
    """``solver=`` as a :data:`Solve`; ``report`` receives CG's curvature breakdown."""
    if callable(solver):
        user_solver = solver
        return lambda matvec, b, rmatvec: tuple(user_solver(matvec, b))
    if solver == "normal_cg":  # A A^T x' = A b with A^T = rmatvec
        return lambda matvec, b, rmatvec: normal_cg(
            matvec, b, rmatvec=rmatvec, maxiter=maxiter, tol=tolerance, report=report
        )
    return lambda matvec, b, rmatvec: cg(matvec, b, maxiter=maxiter, tol=tolerance, report=report)


def _warn_implicit(
    *,
    stationarity: float,
    stationary_tol: float,
    smooth: bool,
    broken: bool,
    report: dict[str, float],
    residual: float,
    tolerance: float,
    hypergradient: Tensor,
    solver: Solver,
    maxiter: int,
) -> None:
    """The warnings of :func:`implicit`: params not stationary, a NaN in the solve,
    non-positive curvature, no convergence, a non-finite hypergradient."""
    if not stationarity <= stationary_tol:  # NaN included
        what = "the gradient norm" if smooth else "|T(w) - w| / step_size"
        warnings.warn(
            f"hypergrad.implicit: params are not a stationary point of train_loss: "
            f"{what} is {stationarity:.3g} > stationary_tol={stationary_tol:.3g}; "
            "the implicit hypergradient assumes trained parameters",
            RuntimeWarning,
            stacklevel=4,
        )
    if broken:
        warnings.warn(
            "hypergrad.implicit: the hypergradient is NaN: the gradient of val_loss or "
            "a Hessian-vector product of train_loss at params is not finite",
            RuntimeWarning,
            stacklevel=4,
        )
    elif "curvature" in report and not residual <= tolerance:
        where = "the Hessian" if smooth else "I - dT on the support"
        warnings.warn(
            f"hypergrad.implicit: {solver} did not converge: it stopped at negative "
            f"curvature (p.Ap = {report['curvature']:.3g} after "
            f"{int(report['iteration'])} CG iteration(s)), so {where} is not positive "
            "definite at params: a saddle point or a maximum of train_loss, not a "
            f"minimum; the result (relative residual {residual:.3g}) is not "
            "the hypergradient. Train to a minimum, pass damping= larger than the "
            "magnitude of the most negative eigenvalue (a regularized answer), or "
            "solver='normal_cg' (exact for a nonsingular indefinite matrix, slower)",
            RuntimeWarning,
            stacklevel=4,
        )
    elif not residual <= tolerance:
        warnings.warn(
            f"hypergrad.implicit: {_did_not_converge(solver, maxiter)}: relative "
            f"residual {residual:.3g} > {tolerance:.3g}",
            RuntimeWarning,
            stacklevel=4,
        )
    if not broken and not bool(torch.isfinite(hypergradient).all()):
        warnings.warn(
            f"hypergrad.implicit: the hypergradient is not finite ({hypergradient}): "
            "val_loss, train_loss or one of their derivatives is NaN or inf at params",
            RuntimeWarning,
            stacklevel=4,
        )


def _did_not_converge(solver: Solver, maxiter: int) -> str:
    if callable(solver):
        return f"the solver {getattr(solver, '__name__', type(solver).__name__)} did not converge"
    return f"{solver} did not converge in maxiter={maxiter} iterations"


def _identity_support(
    split: _Split,
    prox: Callable[[Params, Tensor], Params],
    w: Leaves,
    eta: float | Tensor,
    strengths: Tensor,
    train_loss: TrainLoss,
) -> Leaves:
    """The prox's support at the fixed point, as 0/1 masks, after checking that the
    prox's Jacobian there is the 0/1 diagonal (as soft-thresholding's is)."""
    gradient = _train_grad(train_loss, split, w, strengths)
    moved = tuple(x - eta * g for x, g in zip(w, gradient, strict=True))
    threshold = eta * strengths

    def prox_floats(floats: Leaves) -> Leaves:
        return split.float_leaves(prox(split.tree(floats), threshold))

    ones = tuple(torch.ones_like(x) for x in moved)
    diagonal = jvp(prox_floats, (moved,), (ones,))[1]
    mask = tuple((d != 0).to(d.dtype) for d in diagonal)
    generator = torch.Generator().manual_seed(0)
    probe = tuple(
        torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) for x in moved
    )
    image = jvp(prox_floats, (moved,), (probe,))[1]
    expected = tuple(m * p for m, p in zip(mask, probe, strict=True))
    gap = norm(tuple(a - b for a, b in zip(image, expected, strict=True)))
    if not torch.compiler.is_compiling() and float(gap) > 1e-6 * float(norm(probe)):
        raise ValueError(
            "hypergrad.implicit: this prox's Jacobian is not 0/1 on its support (as "
            "group_lasso's or l2's is not), so I - dT is not symmetric and solver='cg' "
            "would be wrong; use solver='normal_cg'"
        )
    return mask


@_math_attention
def _unroll(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    split: _Split,
    strengths: Tensor,
    optimizer: Optimizer,
    state: Any,
    steps: int,
    checkpoint: bool,
) -> tuple[Tensor, Params, Any]:
    """Hypergradient through ``steps`` steps from ``state`` (fresh when ``None``); the
    trained params and the final state come back detached."""
    strengths = strengths.detach()
    start_state = optimizer.init(split.tree(split.floats)) if state is None else state
    state_leaves, state_spec = flatten(start_state)
    state_positions = [i for i, leaf in enumerate(state_leaves) if is_float(leaf)]

    def state_tree(floats: Sequence[Tensor], constants: list[Any]) -> Any:
        leaves = list(constants)
        for position, leaf in zip(state_positions, floats, strict=True):
            leaves[position] = leaf
        return state_spec.unflatten(leaves)

    def one_step(
        floats: Leaves, state_floats: Leaves, lam: Tensor, constants: list[Any]
    ) -> tuple[tuple[Leaves, Leaves], Any]:
        gradient = _train_grad(train_loss, split, floats, lam)
        new_params, new_state = optimizer.step(
            split.tree(floats), split.grads_tree(gradient), state_tree(state_floats, constants)
        )
        new_leaves, _ = flatten(new_state)
        new_floats = tuple(new_leaves[i] for i in state_positions)
        return (split.float_leaves(new_params), new_floats), new_leaves

    def val_objective(floats: Leaves) -> Tensor:
        return _scalar("val_loss", val_loss(split.tree(floats)))

    start_floats = tuple(state_leaves[i] for i in state_positions)
    if not checkpoint:
        final: list[Any] = []

        def run(lam: Tensor) -> tuple[Tensor, tuple[Leaves, Leaves]]:
            floats, state_floats, constants = split.floats, start_floats, state_leaves
            for _ in range(steps):
                (floats, state_floats), constants = one_step(floats, state_floats, lam, constants)
            # grad's aux takes tensors only: the state's other leaves (None for a
            # non-floating param's slot, Python numbers) go around it.
            final[:] = constants
            tensors = tuple(leaf for leaf in constants if isinstance(leaf, Tensor))
            return val_objective(floats), (floats, tensors)

        hypergradient, (floats, tensors) = grad(run, has_aux=True)(strengths)
        returned = iter(tensors)
        final_leaves = [next(returned) if isinstance(leaf, Tensor) else leaf for leaf in final]
    else:
        trajectory = []
        floats, state_floats, constants = split.floats, start_floats, state_leaves
        with torch.no_grad():
            for _ in range(steps):
                trajectory.append((floats, state_floats, constants))
                (floats, state_floats), constants = one_step(
                    floats, state_floats, strengths, constants
                )
        final_leaves = constants
        params_bar = grad(val_objective)(floats)
        state_bar = tuple(torch.zeros_like(x) for x in state_floats)
        hypergradient = torch.zeros_like(strengths)
        for start, start_state_floats, start_constants in reversed(trajectory):
            _, step_vjp = vjp(  # type: ignore[misc]
                lambda p, s, lam, c=start_constants: one_step(p, s, lam, c)[0],
                start,
                start_state_floats,
                strengths,
            )
            params_bar, state_bar, strengths_bar = step_vjp((params_bar, state_bar))
            hypergradient = hypergradient + strengths_bar
    return (
        hypergradient.detach(),
        split.tree(_detached(floats)),
        state_spec.unflatten([_detached(leaf) for leaf in final_leaves]),
    )


def _detached(tree: Any) -> Any:
    leaves, spec = flatten(tree)
    return spec.unflatten([leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in leaves])


def _warn_if_nonfinite(hypergradient: Tensor) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(hypergradient).all()):
        warnings.warn(
            f"hypergrad.unrolled: the hypergradient is not finite ({hypergradient}); with "
            "Adam this is sqrt(v) at v = 0 (a gradient entry exactly zero), whose "
            "derivative is infinite: use SGD, or keep every gradient entry nonzero",
            RuntimeWarning,
            stacklevel=3,
        )
