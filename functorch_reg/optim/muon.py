r"""Muon, as ``torch.optim.Muon``, with an AdamW part for the leaves that are not
matrices: orthogonalized momentum on ``ndim >= 2`` leaves (as ``[out, -1]`` matrices)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import optree
import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, Scalar
from ..select import Where, selected
from ..tree import Params, flatten, is_float, matching_leaves, spec_names
from .adam import AdamState
from .base import (
    DISABLED,
    Optimizer,
    Prox,
    State,
    _check_writable,
    _Update,
    check_optimizer,
    enabled,
    is_zero,
    step_on_meta,
)
from .decay import DecayScaling, decay_coefficient, decayed
from .regularization import regularization

__all__ = ["MuonState", "muon", "newton_schulz", "polar"]

# torch.optim.Muon's constants (Keller Jordan's Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7

_INTERVALS = {"momentum": NON_NEGATIVE}


class MuonState(NamedTuple):
    """State of :func:`muon`.

    Attributes:
        momentum_buffer: per-leaf first moment: Muon's momentum buffer on the matrix
            leaves (``torch.optim.Muon``'s ``momentum_buffer``), the AdamW part's
            ``exp_avg`` on the others; a pytree like the params (same leaf names,
            shapes, dtypes and devices).
        exp_avg_sq: the AdamW part's second moment; on Muon's leaves an empty tensor
            of shape ``(0,)`` (how a step tells the parts apart, decided at ``init``);
            ``()`` without an AdamW part.
        max_exp_avg_sq: the AdamW part's ``amsgrad`` maximum (markers likewise), else
            ``()``.
        beta_powers: the AdamW part's ``[n_leaves, 2]`` table (see
            :class:`~functorch_reg.AdamState`), else ``()``.
        skipped: steps skipped for a non-finite gradient (``skip_nonfinite=True``), a
            0-d int64 tensor.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> state = fr.muon(adam=fr.adamw()).init({"w": torch.ones(2, 3), "b": torch.zeros(3)})
        >>> state.exp_avg_sq["w"].shape, state.exp_avg_sq["b"].shape
        (torch.Size([0]), torch.Size([3]))
    """

    momentum_buffer: Params
    exp_avg_sq: Params | tuple[()]
    max_exp_avg_sq: Params | tuple[()]
    beta_powers: Tensor | tuple[()]
    skipped: Tensor

    @classmethod
    def leaf_table_field(cls) -> str:
        """The AdamW part's leaf table (see :class:`~functorch_reg.optim.base.LeafTable`)."""
        return "beta_powers"


_PER_LEAF = ("momentum_buffer", "exp_avg_sq", "max_exp_avg_sq")


class _MatrixState(NamedTuple):
    momentum_buffer: Params
    skipped: Tensor


def newton_schulz(
    matrix: Tensor,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = NS_STEPS,
    eps: float = EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""The approximate orthogonalization of ``matrix`` by ``torch.optim.Muon``'s quintic
    Newton-Schulz iteration, in ``dtype`` (bfloat16, as torch).

    With :math:`X_0 = G / \max(\lVert G \rVert_F, \epsilon)` (transposed when tall),
    :math:`A = X X^\top`, :math:`X \leftarrow a X + (b A + c A^2) X`, ``ns_steps`` times.
    The singular values land near 1 (roughly in ``[0.7, 1.2]``), not exactly at 1; see
    :func:`polar` for the exact factor.

    Args:
        matrix: a 2-D tensor ``[A, B]``.
        ns_coefficients: :math:`(a, b, c)`.
        ns_steps: iterations, fewer than 100.
        eps: the floor of the normalizing norm.
        dtype: the dtype the iteration runs in.

    Returns:
        A ``[A, B]`` tensor of dtype ``dtype``.

    Example:
        >>> from functorch_reg.optim.muon import newton_schulz
        >>> newton_schulz(torch.eye(3) * 5).float().diag()
        tensor([0.6797, 0.6797, 0.6797])
    """
    a, b, c = ns_coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def polar(matrix: Tensor) -> Tensor:
    r"""The exact orthogonal polar factor :math:`U V^\top` of ``matrix`` (:math:`U S
    V^\top` its thin SVD): the limit that :func:`newton_schulz` approximates. Pass it
    as ``fr.muon(orthogonalize=polar)`` (slower; for tests and analysis).

    Example:
        >>> from functorch_reg.optim.muon import polar
        >>> polar(torch.tensor([[2.0, 0.0], [0.0, -3.0]]))
        tensor([[ 1.,  0.],
                [ 0., -1.]])
    """
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    factor: Tensor = u @ vh
    return factor


def adjusted_ratio(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """``torch.optim.Muon``'s lr factor for an ``[A, B]`` matrix (``B`` the product of
    the other dims for a conv weight)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def muon(
    lr: Scalar = 1e-3,
    weight_decay: Scalar = 0.1,
    momentum: Scalar = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = EPS,
    ns_steps: int = NS_STEPS,
    adjust_lr_fn: Literal["original", "match_rms_adamw"] | None = None,
    *,
    adam: Optimizer | None = None,
    where: Where = None,
    decay_lr: Literal["unadjusted", "adjusted"] = "unadjusted",
    orthogonalize: Callable[[Tensor], Tensor] | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    mask: Where = None,
    prox: Prox | None = None,
    prox_strength: Scalar = 0.0,
    skip_nonfinite: bool = False,
    decay_scaling: DecayScaling = "lr",
    decay_reference_lr: Scalar | None = None,
    cautious_decay: bool = False,
    decay_to: Params | None = None,
    clip_grad_norm: Scalar | None = None,
) -> Optimizer:
    r"""Muon (Jordan et al., 2024), matching ``torch.optim.Muon`` step for step, with an
    AdamW part for the leaves that are not matrices.

    Each float leaf with ``ndim >= 2`` that ``where`` selects (default: all) is a Muon
    leaf, seen as the ``[out, -1]`` matrix :math:`W` (conv weights included, which
    ``torch.optim.Muon`` refuses). With gradient :math:`G_t` (matrix-shaped likewise):

    .. math::
        B_t &= \mu B_{t-1} + (1 - \mu) G_t, \quad
            \tilde B_t = (1 - \mu) G_t + \mu B_t \text{ if nesterov else } B_t \\
        O_t &= \operatorname{NS}(\tilde B_t) \quad (\approx U V^\top) \\
        W &\leftarrow W - c\,(W - W_\text{ref}) \quad \text{(decoupled decay, on mask)} \\
        W_t &= W - \eta\, \alpha(A, B)\, O_t

    with :math:`\alpha = \sqrt{\max(1, A/B)}` (``adjust_lr_fn="original"`` or ``None``,
    Keller Jordan's) or :math:`0.2 \sqrt{\max(A, B)}` (``"match_rms_adamw"``,
    Moonshot's: then an exact :math:`U V^\top` has RMS :math:`1/\sqrt{\max(A, B)}`,
    so the update's RMS is exactly :math:`0.2\eta`, that of a typical AdamW step).
    The decay coefficient is :math:`c = \eta\lambda` with the **unadjusted** lr, as
    ``torch.optim.Muon`` does (``decay_lr="unadjusted"``); ``decay_lr="adjusted"`` uses
    :math:`\eta\alpha` instead, so decay and step scale together. ``decay_scaling``,
    ``decay_reference_lr``, ``cautious_decay`` (signs of :math:`O_t` and :math:`W -
    W_\text{ref}`) and ``decay_to`` act as in :func:`functorch_reg.adam`.

    The other leaves (biases, norm scales, 0-d and 1-d leaves, flat buffers, and the
    matrices ``where`` leaves out, e.g. embeddings and the output head) are stepped
    by ``adam``, an :func:`functorch_reg.adamw` (or :func:`functorch_reg.adam`) with
    its own lr, decay, mask and options. Its hyperparameters are this optimizer's,
    prefixed ``adam_`` (``adam_lr``, ``adam_weight_decay``, ``adam_betas``, ...), so
    they are per-call overrides and sweepable like Muon's. Without ``adam``, a
    non-matrix leaf with a gradient is an error: it is never stepped with a silent
    decay of 0. ``skip_nonfinite`` and ``clip_grad_norm`` here span both parts.

    Args:
        lr: learning rate :math:`\eta` of the Muon leaves.
        weight_decay: :math:`\lambda` of the Muon leaves (torch's default 0.1).
        momentum: :math:`\mu`.
        nesterov: use the Nesterov form :math:`\tilde B_t` (torch's default).
        ns_coefficients: the Newton-Schulz :math:`(a, b, c)`, see :func:`newton_schulz`.
        eps: the floor of the Newton-Schulz normalization.
        ns_steps: Newton-Schulz iterations.
        adjust_lr_fn: ``None`` / ``"original"`` or ``"match_rms_adamw"``.
        adam: the optimizer of the non-Muon leaves (``fr.adamw(...)``).
        where: which ``ndim >= 2`` leaves Muon steps (a ``where=`` selection, decided
            at ``init``); the rest go to ``adam``. ``fr.TorchOptimizer`` creates each
            param's state alone, named ``"0"``: there, select by the tensor (e.g.
            ``lambda name, w: w.shape[0] != vocab_size``), not by name.
        decay_lr: ``"unadjusted"`` (torch) or ``"adjusted"``, the lr in :math:`c`.
        orthogonalize: replaces Newton-Schulz: ``[A, B] -> [A, B]`` (e.g. :func:`polar`).
        ns_dtype: the dtype Newton-Schulz runs in (torch's bfloat16). Batched
            (``vmap``) and single bfloat16 matmuls round differently on some backends,
            so a sweep equals separate runs to bfloat16 accuracy; pass
            ``torch.float32`` for agreement to float32 accuracy.
        mask: which Muon leaves get decay and prox (default all).
        prox: an elementwise proximal operator (e.g. ``fr.prox.l1``), applied to the
            Muon leaves as ``prox(W, lr * prox_strength)``; a prox that couples
            entries (group lasso) is refused.
        prox_strength: :math:`\rho`.
        skip_nonfinite: leave params and state untouched on a non-finite gradient.
        decay_scaling: ``"lr"``, ``"schedule"`` or ``"none"``.
        decay_reference_lr: :math:`\eta_0` for ``"schedule"``.
        cautious_decay: decay only where :math:`O_t` and the weight agree in sign.
        decay_to: reference weights the decay pulls toward (by leaf name).
        clip_grad_norm: clip all gradients to this global norm first.

    Raises:
        ValueError: an unknown ``adjust_lr_fn`` or ``decay_lr``, ``ns_steps >= 100``, a
            prox that is not elementwise; at ``init``, a Muon leaf with no elements;
            at a step, a non-matrix leaf without ``adam``.
        TypeError: ``adam`` is not an ``fr.adam``/``fr.adamw`` optimizer.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"weight": torch.eye(3), "bias": torch.zeros(3)}
        >>> opt = fr.muon(lr=0.02, adam=fr.adamw(lr=1e-3, weight_decay=0.0))
        >>> state = opt.init(params)
        >>> grads = {"weight": torch.ones(3, 3), "bias": torch.ones(3)}
        >>> params, state = opt.step(params, grads, state)
        >>> params["bias"]
        tensor([-0.0010, -0.0010, -0.0010])
    """
    _check_options(adjust_lr_fn, decay_lr, ns_steps, ns_coefficients, prox)
    adam_state_fields = _check_adam(adam)
    # The keyword tail (decay, prox, mask, skip_nonfinite, clip), read by name.
    options = regularization("muon", locals(), decoupled=True)

    def orthogonalized(matrix: Tensor) -> Tensor:
        if orthogonalize is not None:
            return orthogonalize(matrix)
        return newton_schulz(matrix, ns_coefficients, ns_steps, eps, ns_dtype)

    def init_slots(p: Tensor) -> tuple[Tensor | None, ...]:
        return (torch.zeros_like(p),)

    def rule(
        p: Tensor,
        g: Tensor,
        slots: tuple[Tensor | None, ...],
        row: Tensor | None,
        h: Mapping[str, Scalar],
        decay: bool,
        reference: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        (buf,) = slots
        assert buf is not None
        mu = h["momentum"]
        weight = 1 - mu
        buf = torch.lerp(buf, g, weight.to(g.dtype) if isinstance(weight, Tensor) else weight)
        update = buf
        if nesterov:
            update = torch.lerp(g, buf, mu.to(g.dtype) if isinstance(mu, Tensor) else mu)
        matrix = update.reshape(update.shape[0], -1)
        direction = orthogonalized(matrix).reshape(p.shape).to(p.dtype)
        ratio = adjusted_ratio(p.shape, adjust_lr_fn)
        weight_decay = h["weight_decay"] if decay else 0.0
        if not is_zero(weight_decay):
            coefficient = decay_coefficient(h, weight_decay, decay_scaling)
            if decay_lr == "adjusted" and decay_scaling == "lr":
                coefficient = coefficient * ratio
            p = decayed(p, coefficient, direction, reference=reference, cautious=cautious_decay)
        return p - (h["lr"] * ratio) * direction, (buf,)

    matrices = options.build(
        {"lr": lr, "weight_decay": weight_decay, "momentum": momentum},
        _MatrixState,
        init_slots,
        rule,
        _INTERVALS,
        skip_nonfinite=False,  # the hybrid skips both parts at once
    )
    hybrid = _Hybrid(matrices, adam, adam_state_fields, where, skip_nonfinite)
    optimizer = Optimizer(
        hybrid.init, hybrid.step, hybrid.step_, hybrid.hyperparams(), hybrid.validate
    )
    return options.finish(optimizer)


def _check_options(
    adjust_lr_fn: str | None,
    decay_lr: str,
    ns_steps: int,
    ns_coefficients: Sequence[float],
    prox: Prox | None,
) -> None:
    """Refuse the options of :func:`muon` that torch's Muon does not know, and a prox
    that is not elementwise."""
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        raise ValueError(
            "muon: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got "
            f"{adjust_lr_fn!r}"
        )
    if decay_lr not in ("unadjusted", "adjusted"):
        raise ValueError(f"muon: decay_lr must be 'unadjusted' or 'adjusted', got {decay_lr!r}")
    if not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
        raise ValueError(f"muon: ns_steps must be an int in [0, 100), got {ns_steps!r}")
    if len(ns_coefficients) != 3:
        raise ValueError(f"muon: ns_coefficients must be three floats, got {ns_coefficients!r}")
    if prox is not None:
        _check_elementwise(prox)


def _check_adam(adam: Optimizer | None) -> bool:
    """Whether ``adam`` keeps ``max_exp_avg_sq`` (amsgrad); raises unless it is an
    ``fr.adam``/``fr.adamw`` optimizer."""
    if adam is None:
        return False
    if not isinstance(adam, Optimizer):
        raise TypeError(
            f"muon: adam must be a functional optimizer such as fr.adamw(lr=3e-4), got "
            f"{type(adam).__name__}"
        )
    template = adam.init([torch.zeros(1)])
    if not isinstance(template, AdamState):
        raise TypeError(
            f"muon: adam must be fr.adam(...) or fr.adamw(...) (its state an AdamState), "
            f"got an optimizer whose state is a {type(template).__name__}"
        )
    return enabled(template.max_exp_avg_sq)


def _check_elementwise(prox: Prox) -> None:
    """Refuse a prox that couples entries: compare it on a matrix and entry by entry
    (called as the optimizers call it, on a dict of named leaves)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    whole = prox({"probe": probe}, 0.3)["probe"]
    entries = torch.stack(
        [prox({"probe": x.reshape(1)}, 0.3)["probe"].reshape(()) for x in probe.reshape(-1)]
    )
    if not isinstance(whole, Tensor) or not torch.allclose(
        whole.reshape(-1), entries, rtol=1e-12, atol=1e-12
    ):
        raise ValueError(
            "muon: prox must act entry by entry (e.g. fr.prox.l1, fr.prox.l2, "
            "fr.prox.elastic_net); this one couples entries (e.g. group_lasso), which has no "
            "meaning for an orthogonalized update; apply it to the AdamW part "
            "(adam=fr.adamw(prox=...)) or as a penalty"
        )


def _with_markers(leaves: Sequence[Any], to_adam: Sequence[bool], adam_field: Params) -> Params:
    """An AdamW-part field for all leaves: the AdamW part's tensors on its leaves, and
    an empty tensor (shape ``(0,)``, the leaf's dtype and device) on Muon's float
    leaves, which marks them as Muon's. A marker rather than ``None``, so that ``vmap``
    takes the state."""
    values, spec = flatten(adam_field)
    return spec.unflatten(
        [
            v if a else (leaf.new_empty(0) if is_float(leaf) else None)
            for a, v, leaf in zip(to_adam, values, leaves, strict=True)
        ]
    )


def _merged(spec: Any, to_adam: Sequence[bool], new: Params, old: Params) -> Params:
    """``new``'s tensors on the AdamW part's leaves, ``old``'s markers elsewhere."""
    return spec.unflatten(
        [n if a else o for a, n, o in zip(to_adam, flatten(new)[0], flatten(old)[0], strict=True)]
    )


class _Hybrid:
    """Muon's matrix leaves and the AdamW part, stepped as one optimizer over one state."""

    def __init__(
        self,
        matrices: Optimizer,
        adam: Optimizer | None,
        amsgrad: bool,
        where: Where,
        skip_nonfinite: bool,
    ) -> None:
        self.matrices, self.adam, self.amsgrad = matrices, adam, amsgrad
        self.where, self.skip_nonfinite = where, skip_nonfinite

    def hyperparams(self) -> dict[str, Any]:
        adam = {} if self.adam is None else self.adam.hyperparams
        return {**self.matrices.hyperparams, **{f"adam_{k}": v for k, v in adam.items()}}

    def split(self, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        ours = {k: v for k, v in overrides.items() if not k.startswith("adam_")}
        theirs = {k[len("adam_") :]: v for k, v in overrides.items() if k.startswith("adam_")}
        if theirs and self.adam is None:
            raise TypeError(
                f"muon.step() got adam_{next(iter(theirs))}, but this muon has no AdamW "
                "part; pass adam=fr.adamw(...)"
            )
        return ours, theirs

    def validate(self, params: Params | None = None, **overrides: Any) -> None:
        ours, theirs = self.split(overrides)
        check_optimizer(self.matrices, None, **ours)
        if self.adam is not None:
            check_optimizer(self.adam, None, **theirs)
        if params is not None:
            step_on_meta(self.init, self.step, params, overrides)

    def init(self, params: Params) -> MuonState:
        # Checks the params (names, dtypes) and makes a zero first moment for every leaf.
        matrix_state = self.matrices.init(params)
        leaves, spec = flatten(params)
        chosen = selected(params, self.where)
        to_adam = []
        for leaf_name, leaf, pick in zip(spec_names(spec), leaves, chosen, strict=True):
            is_matrix = is_float(leaf) and leaf.ndim >= 2 and pick
            if is_matrix and leaf.numel() == 0:
                raise ValueError(
                    f"muon.init: leaf {leaf_name!r} has shape {tuple(leaf.shape)}, no "
                    "elements to orthogonalize; leave it out of the params (or of where=)"
                )
            to_adam.append(self.adam is not None and is_float(leaf) and not is_matrix)
        if self.adam is None:
            return MuonState(
                matrix_state.momentum_buffer, DISABLED, DISABLED, DISABLED, matrix_state.skipped
            )
        part = spec.unflatten([x if a else None for a, x in zip(to_adam, leaves, strict=True)])
        if any(to_adam):
            adam_state = self.adam.init(part)
            beta_powers = adam_state.beta_powers
            exp_avg_sq = _with_markers(leaves, to_adam, adam_state.exp_avg_sq)
            max_exp_avg_sq = (
                _with_markers(leaves, to_adam, adam_state.max_exp_avg_sq)
                if self.amsgrad
                else DISABLED
            )
        else:  # only matrices: the AdamW part's fields hold markers and its table
            exp_avg_sq = _with_markers(leaves, to_adam, part)
            max_exp_avg_sq = exp_avg_sq if self.amsgrad else DISABLED
            row = self.adam.init([matrix_state.skipped.new_zeros((), dtype=torch.float32)])
            beta_powers = row.beta_powers.expand(len(leaves), -1).clone()
        return MuonState(
            matrix_state.momentum_buffer,
            exp_avg_sq,
            max_exp_avg_sq,
            beta_powers,
            matrix_state.skipped,
        )

    def step(
        self, params: Params, grads: Params, state: State, **overrides: Any
    ) -> tuple[Params, MuonState]:
        if not isinstance(state, MuonState):
            raise TypeError(f"muon: state must be a MuonState, got {type(state).__name__}")
        ours, theirs = self.split(overrides)
        leaves, spec = flatten(params)
        grad_leaves = matching_leaves(leaves, spec, grads)
        firsts = matching_leaves(
            leaves, spec, state.momentum_buffer, other_name="state.momentum_buffer"
        )
        if self.adam is not None and enabled(state.exp_avg_sq):
            seconds = matching_leaves(
                leaves, spec, state.exp_avg_sq, other_name="state.exp_avg_sq", check_shapes=False
            )
            to_adam = [
                is_float(p) and isinstance(s, Tensor) and s.shape == p.shape
                for p, s in zip(leaves, seconds, strict=True)
            ]
        else:
            to_adam = [False] * len(leaves)
        self._check_matrices(spec, leaves, grad_leaves, to_adam)

        def part(values: Sequence[Any], adam: bool) -> Params:
            kept = [v if a == adam else None for a, v in zip(to_adam, values, strict=True)]
            return spec.unflatten(kept)

        new_matrices, matrix_state = self.matrices.step(
            part(leaves, False),
            part(grad_leaves, False),
            _MatrixState(part(firsts, False), state.skipped),
            **ours,
        )
        new_leaves = flatten(new_matrices)[0]
        new_firsts = flatten(matrix_state.momentum_buffer)[0]
        new_state = state
        if self.adam is not None and enabled(state.exp_avg_sq):
            adam_state = AdamState(
                part(firsts, True),
                part(seconds, True),
                part(flatten(state.max_exp_avg_sq)[0], True) if self.amsgrad else DISABLED,
                cast(Tensor, state.beta_powers),
                state.skipped,
            )
            new_adam, adam_state = self.adam.step(
                part(leaves, True), part(grad_leaves, True), adam_state, **theirs
            )
            for i, (a, p, m) in enumerate(
                zip(to_adam, flatten(new_adam)[0], flatten(adam_state.exp_avg)[0], strict=True)
            ):
                if a:
                    new_leaves[i], new_firsts[i] = p, m
            new_state = state._replace(
                exp_avg_sq=_merged(spec, to_adam, adam_state.exp_avg_sq, state.exp_avg_sq),
                max_exp_avg_sq=_merged(
                    spec, to_adam, adam_state.max_exp_avg_sq, state.max_exp_avg_sq
                )
                if self.amsgrad
                else DISABLED,
                beta_powers=adam_state.beta_powers,
            )
        new_state = new_state._replace(momentum_buffer=spec.unflatten(new_firsts))
        if self.skip_nonfinite:
            new = spec.unflatten(new_leaves)
            return self._unless_nonfinite(params, state, new, new_state, grad_leaves)
        return spec.unflatten(new_leaves), new_state

    def _check_matrices(
        self, spec: Any, leaves: Sequence[Any], grads: Sequence[Any], to_adam: Sequence[bool]
    ) -> None:
        for leaf_name, p, g, a in zip(spec_names(spec), leaves, grads, to_adam, strict=True):
            if a or g is None or not is_float(p):
                continue
            if p.ndim < 2:
                raise ValueError(
                    f"muon: leaf {leaf_name!r} has shape {tuple(p.shape)}; Muon orthogonalizes "
                    "matrices (ndim >= 2): pass adam=fr.adamw(lr=..., weight_decay=...) for "
                    "the other leaves, or freeze it (a None gradient)"
                )
            if p.numel() == 0:
                raise ValueError(
                    f"muon: leaf {leaf_name!r} has shape {tuple(p.shape)}, no elements to "
                    "orthogonalize; leave it out of the params"
                )

    def _unless_nonfinite(
        self,
        params: Params,
        state: MuonState,
        new_params: Params,
        new_state: MuonState,
        grads: Sequence[Any],
    ) -> tuple[Params, MuonState]:
        present = [g for g in grads if g is not None]
        if not present:
            return new_params, new_state
        finite = torch.stack([torch.isfinite(g).all() for g in present]).all()

        def keep(new: Any, old: Any) -> Any:
            if isinstance(new, Tensor) and isinstance(old, Tensor):
                return torch.where(finite, new, old)
            return new

        kept_params = optree.tree_map(keep, new_params, params, none_is_leaf=True)
        fields = [
            optree.tree_map(keep, new, old, none_is_leaf=True) if enabled(old) else old
            for new, old in zip(new_state[:-1], state[:-1], strict=True)
        ]
        skipped = state.skipped + (~finite).long()
        return kept_params, MuonState(*fields, skipped)  # type: ignore[arg-type,call-arg]

    def step_(self, params: Params, grads: Params, state: State, **overrides: Any) -> None:
        with torch.no_grad():
            new_params, new_state = self.step(params, grads, state, **overrides)
            leaves, spec = flatten(params)
            fields = [f for f in _PER_LEAF if enabled(getattr(state, f))]
            has_table = enabled(state.beta_powers)
            update = _Update(
                spec,
                [leaves] + [flatten(getattr(state, f))[0] for f in fields],
                [flatten(new_params)[0]] + [flatten(getattr(new_state, f))[0] for f in fields],
                cast(Tensor, state.beta_powers) if has_table else None,
                cast(Tensor, new_state.beta_powers) if has_table else None,
                new_state.skipped,
            )
            # As the other rules' step_: inference tensors, overlapping memory and
            # shared memory (tied weights) are refused before the first write.
            _check_writable("muon", fields, update, state.skipped)
            for column, new_column in zip(update.columns, update.new_columns, strict=True):
                for target, value in zip(column, new_column, strict=True):
                    if isinstance(target, Tensor) and value is not target:
                        target.copy_(value)
            if update.table is not None and update.new_table is not None:
                update.table.copy_(update.new_table)
            state.skipped.copy_(new_state.skipped)
