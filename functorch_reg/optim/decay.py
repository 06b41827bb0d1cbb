r"""Decoupled weight decay variants shared by the update rules.

With the step direction :math:`u` (the update subtracted as :math:`w \leftarrow w -
\eta u`, e.g. Adam's bias-corrected :math:`\hat m / (\sqrt{\hat v} + \epsilon)`
scaled to its step), decoupled decay moves each selected weight by

.. math::
    w \leftarrow w - c\, \kappa \odot (w - w_\text{ref}), \qquad
    c = \begin{cases}
        \eta \lambda & \text{decay\_scaling="lr" (torch.optim.AdamW)} \\
        (\eta / \eta_0) \lambda & \text{"schedule" (Loshchilov \& Hutter's AdamW)} \\
        \lambda & \text{"none"}
    \end{cases}

with :math:`w_\text{ref} = 0` unless ``decay_to`` gives a reference, and the
cautious mask :math:`\kappa = \mathbb{1}[\operatorname{sign}(u)
\operatorname{sign}(w - w_\text{ref}) \ge 0]` with ``cautious_decay`` (else
:math:`\kappa = 1`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import optree
import torch
from torch import Tensor

from .._checks import NON_NEGATIVE, Interval, Scalar, check_scalars
from ..tree import Params, flatten, is_float, leaf_names, spec_names

__all__ = ["DecayScaling", "decay_coefficient", "decay_options", "decayed"]

DecayScaling = Literal["lr", "schedule", "none"]
SCALINGS: tuple[str, ...] = ("lr", "schedule", "none")

INTERVALS = {"decay_reference_lr": NON_NEGATIVE}
"""Per-call bounds of the hyperparameters this module adds."""

# Positivity of the reference lr is checked with its own message.
_FINITE = Interval(low=-math.inf)

References = Callable[[Sequence[Any], optree.PyTreeSpec, Sequence[bool]], list[Tensor | None]]
"""``references(leaves, spec, decays) -> per-leaf reference`` (``None`` where unused)."""


def decay_options(
    name: str,
    *,
    lr: Scalar,
    decoupled: bool,
    decay_scaling: str,
    decay_reference_lr: Scalar | None,
    cautious_decay: bool,
    decay_to: Params | None,
) -> tuple[dict[str, Scalar], References | None]:
    """Check the decay options of optimizer ``name`` and prepare them.

    Returns:
        The hyperparameters to add (``decay_reference_lr`` with ``"schedule"``), and
        the per-leaf lookup of ``decay_to`` (``None`` without a reference).

    Raises:
        ValueError: an unknown ``decay_scaling``, a decoupled-only option on coupled
            decay, ``decay_reference_lr`` without ``"schedule"``, or a reference lr
            that is not positive.
    """
    if decay_scaling not in SCALINGS:
        raise ValueError(
            f"{name}: decay_scaling must be one of {', '.join(map(repr, SCALINGS))}, "
            f"got {decay_scaling!r}"
        )
    if not decoupled:
        coupled_only = {
            "decay_scaling": decay_scaling != "lr",
            "cautious_decay": cautious_decay,
            "decay_to": decay_to is not None,
        }
        bad = [option for option, used in coupled_only.items() if used]
        if bad:
            raise ValueError(
                f"{name}: {bad[0]} applies to decoupled decay only; coupled decay "
                "(g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True "
                "(or use adamw)"
            )
    if decay_reference_lr is not None and decay_scaling != "schedule":
        raise ValueError(f"{name}: decay_reference_lr needs decay_scaling='schedule'")
    extra: dict[str, Scalar] = {}
    if decay_scaling == "schedule":
        reference_lr = lr if decay_reference_lr is None else decay_reference_lr
        check_scalars(name, {"decay_reference_lr": reference_lr}, {"decay_reference_lr": _FINITE})
        positive = (
            float(reference_lr) > 0
            if not isinstance(reference_lr, Tensor)
            else bool(reference_lr.detach().cpu() > 0)
        )
        if not positive:
            raise ValueError(
                f"{name}: decay_scaling='schedule' divides by the initial lr, which must be "
                f"positive; got {float(reference_lr)!r} (pass decay_reference_lr=)"
            )
        # A copy: a schedule that writes lr in place must not move the reference.
        extra["decay_reference_lr"] = (
            reference_lr.detach().clone() if isinstance(reference_lr, Tensor) else reference_lr
        )
    references = None if decay_to is None else _reference_lookup(name, decay_to)
    return extra, references


def decay_coefficient(h: Mapping[str, Scalar], weight_decay: Scalar, scaling: str) -> Scalar:
    """The decay coefficient :math:`c` of the module docstring for this step."""
    if scaling == "lr":
        return h["lr"] * weight_decay
    if scaling == "schedule":
        return h["lr"] / h["decay_reference_lr"] * weight_decay
    return weight_decay


def decayed(
    p: Tensor,
    coefficient: Scalar,
    direction: Tensor,
    *,
    reference: Tensor | None = None,
    cautious: bool = False,
) -> Tensor:
    """``p`` after decoupled decay, before the step ``p - step_size * direction``.

    Args:
        p: the weight :math:`w`.
        coefficient: :math:`c`, from :func:`decay_coefficient`.
        direction: the step direction :math:`u` (any positive multiple of it), used
            only by the cautious mask.
        reference: :math:`w_\\text{ref}`, or ``None`` for zero.
        cautious: apply the decay only where ``sign(u) * sign(w - w_ref) >= 0``.
    """
    if reference is None and not cautious:
        # torch.optim's form, kept to the bit so that parity with it holds exactly.
        return p * (1 - coefficient)
    offset = p if reference is None else p - reference
    if cautious:
        # Signs rather than the product u * offset, which can overflow or underflow.
        agree = torch.sign(direction) * torch.sign(offset) >= 0
        offset = torch.where(agree, offset, torch.zeros_like(offset))
    return p - coefficient * offset


def _reference_lookup(name: str, decay_to: Params) -> References:
    """Per-leaf references of ``decay_to``, found by leaf name."""
    leaves, _ = flatten(decay_to)
    by_name = {
        leaf_name: leaf
        for leaf_name, leaf in zip(leaf_names(decay_to), leaves, strict=True)
        if leaf is not None
    }
    for leaf_name, leaf in by_name.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{name}: decay_to leaf {leaf_name!r} must be a tensor, got {type(leaf).__name__}"
            )

    def references(
        params: Sequence[Any], spec: optree.PyTreeSpec, decays: Sequence[bool]
    ) -> list[Tensor | None]:
        found: list[Tensor | None] = []
        for leaf_name, p, decay in zip(spec_names(spec), params, decays, strict=True):
            if not (decay and is_float(p)):
                found.append(None)
                continue
            reference = by_name.get(leaf_name)
            if reference is None:
                raise ValueError(
                    f"{name}: decay_to has no leaf {leaf_name!r}, which mask selects for decay"
                )
            if reference.shape != p.shape or reference.dtype != p.dtype:
                raise ValueError(
                    f"{name}: decay_to leaf {leaf_name!r} is {reference.dtype} "
                    f"{tuple(reference.shape)}, the param is {p.dtype} {tuple(p.shape)}"
                )
            if p.device.type == "meta":
                # Optimizer.validate(params) steps meta copies of the params.
                reference = reference.to("meta")
            elif reference.device != p.device:
                raise ValueError(
                    f"{name}: decay_to leaf {leaf_name!r} is on {reference.device}, "
                    f"the param on {p.device}"
                )
            found.append(reference)
        return found

    return references
