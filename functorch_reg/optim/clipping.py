"""The ``clip_grad_norm=`` option of the update rules: clip, then step, in one call."""

from __future__ import annotations

from typing import Any

from .._checks import NON_NEGATIVE, Scalar, check_scalars
from ..transforms import clip_by_global_norm
from ..tree import Params
from .base import Optimizer, State, check_optimizer

__all__ = ["with_clipping"]


def with_clipping(name: str, optimizer: Optimizer, clip_grad_norm: Scalar | None) -> Optimizer:
    """``optimizer`` stepping on ``clip_by_global_norm(grads, clip_grad_norm)``.

    ``clip_grad_norm`` becomes a hyperparameter like the others, overridable per call
    (a float or a tensor); ``None`` returns ``optimizer`` unchanged. The norm is
    global over the tree passed to ``step`` (with ``TorchOptimizer``: over each param
    group).
    """
    if clip_grad_norm is None:
        return optimizer
    hyperparams = {**optimizer.hyperparams, "clip_grad_norm": clip_grad_norm}
    check_scalars(name, {"clip_grad_norm": clip_grad_norm}, {"clip_grad_norm": NON_NEGATIVE})

    def clipped(grads: Params, overrides: dict[str, Any]) -> Params:
        max_norm = overrides.pop("clip_grad_norm", clip_grad_norm)
        check_scalars(name, {"clip_grad_norm": max_norm}, {"clip_grad_norm": NON_NEGATIVE})
        return clip_by_global_norm(grads, max_norm)[0]

    def step(params: Params, grads: Params, state: State, **overrides: Any) -> tuple[Params, State]:
        return optimizer.step(params, clipped(grads, overrides), state, **overrides)

    def step_(params: Params, grads: Params, state: State, **overrides: Any) -> None:
        optimizer.step_(params, clipped(grads, overrides), state, **overrides)

    def validate(params: Params | None = None, **overrides: Any) -> None:
        check_scalars(
            name,
            {"clip_grad_norm": overrides.pop("clip_grad_norm", clip_grad_norm)},
            {"clip_grad_norm": NON_NEGATIVE},
        )
        check_optimizer(optimizer, params, **overrides)

    step.__doc__ = optimizer.step.__doc__
    step_.__doc__ = optimizer.step_.__doc__

    def for_flat(flat: Any) -> Optimizer:
        inner = optimizer if optimizer.for_flat is None else optimizer.for_flat(flat)
        return with_clipping(name, inner, clip_grad_norm)

    return Optimizer(optimizer.init, step, step_, hyperparams, validate, for_flat)
