r"""Decoupled weight decay variants shared by the update rules.

With the step direction :math:`u` (the update subtracted as :math:`w \leftarrow w -
\eta u`, e.g. Adam's bias-corrected :math:`\hat m / (\sqrt{\hat v} + \epsilon)`
scaled to its step), decoupled decay moves each selected weight by

.. math::
    w \leftarrow w - c\, \kappa \odot (w - w_\text{ref}), \qquad
    c = \begin{cases}
        \eta \lambda & \text{decay\_scaling="lr" (torch.optim.AdamW)} \\
        (\eta / \eta_0) \lambda & \text{"schedule" (Loshchilov \& Hutter's AdamW)} \\
        (\eta^2 / \eta_0) \lambda & \text{"corrected" (AdamC, arXiv 2506.02285)} \\
        \lambda & \text{"none"}
    \end{cases}

with :math:`w_\text{ref} = 0` unless ``decay_to`` gives a reference, and the
cautious mask :math:`\kappa = \mathbb{1}[\operatorname{sign}(u)
\operatorname{sign}(w - w_\text{ref}) \ge 0]` with ``cautious_decay`` (else
:math:`\kappa = 1`). :math:`\eta_0` is ``decay_reference_lr`` (default: the
constructed ``lr``), the peak of the schedule. ``"corrected"`` equals ``"lr"`` at
:math:`\eta = \eta_0` (bit for bit) and decays less as the schedule falls, by
:math:`\eta / \eta_0` (Defazio et al.'s correction of the steady-state gradient norm
under a schedule; timm's ``corrected_weight_decay``).

``decay_timescale`` :math:`\tau` (in steps) gives the decay instead of ``weight_decay``:
the EMA timescale :math:`\tau = 1 / (\eta_0 \lambda)` of Wang & Aitchison ("How to set
AdamW's weight decay as you scale model and dataset size", arXiv 2405.13698), i.e.
:math:`\lambda = 1 / (\eta_0 \tau)` under ``"lr"`` and ``"corrected"`` and
:math:`\lambda = 1 / \tau` under ``"schedule"`` and ``"none"``, so that at the peak lr
each step shrinks by :math:`c = 1 / \tau` whatever the peak lr. The timescale, not
:math:`\lambda`, is what transfers across lr, batch and data size; convert it between
steps, epochs and fractions of training with :func:`convert_timescale`.
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

__all__ = [
    "DecayScaling",
    "check_decay_factor",
    "convert_timescale",
    "decay_coefficient",
    "decay_options",
    "decay_rate",
    "decayed",
]

DecayScaling = Literal["lr", "schedule", "corrected", "none"]
SCALINGS: tuple[str, ...] = ("lr", "schedule", "corrected", "none")
_REFERENCED = ("schedule", "corrected")
"""The scalings that divide by the reference lr."""

INTERVALS = {"decay_reference_lr": NON_NEGATIVE, "decay_timescale": Interval(low=1.0)}
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
    weight_decay: Scalar = 0.0,
    decay_timescale: Scalar | None = None,
) -> tuple[dict[str, Scalar], References | None]:
    """Check the decay options of optimizer ``name`` and prepare them.

    Returns:
        The hyperparameters to add (``decay_reference_lr`` with ``"schedule"``,
        ``"corrected"`` or a timescale; ``decay_timescale``), and the per-leaf lookup
        of ``decay_to`` (``None`` without a reference). With a timescale, the
        optimizer's hyperparameters hold ``decay_timescale`` instead of
        ``weight_decay``.

    Raises:
        ValueError: an unknown ``decay_scaling``, a decoupled-only option on coupled
            decay, ``decay_reference_lr`` where nothing divides by it, a reference lr
            that is not positive, both ``weight_decay`` and ``decay_timescale``, or a
            timescale below one step.
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
            "decay_timescale": decay_timescale is not None,
        }
        bad = [option for option, used in coupled_only.items() if used]
        if bad:
            raise ValueError(
                f"{name}: {bad[0]} applies to decoupled decay only; coupled decay "
                "(g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True "
                "(or use adamw)"
            )
    referenced = decay_scaling in _REFERENCED or (
        decay_timescale is not None and decay_scaling != "none"
    )
    if decay_reference_lr is not None and not referenced:
        raise ValueError(
            f"{name}: decay_reference_lr needs decay_scaling='schedule' or 'corrected', or a "
            "decay_timescale (with 'lr' scaling)"
        )
    extra: dict[str, Scalar] = {}
    if decay_timescale is not None:
        if not _is_zero_literal(weight_decay):
            raise ValueError(
                f"{name}: pass either weight_decay or decay_timescale (which sets the "
                f"decay as 1 / (lr * weight_decay) = decay_timescale steps), got both"
            )
        check_scalars(name, {"decay_timescale": decay_timescale}, INTERVALS)
        extra["decay_timescale"] = _copied(decay_timescale)
    if referenced:
        reference_lr = lr if decay_reference_lr is None else decay_reference_lr
        check_scalars(name, {"decay_reference_lr": reference_lr}, {"decay_reference_lr": _FINITE})
        positive = (
            float(reference_lr) > 0
            if not isinstance(reference_lr, Tensor)
            else bool(reference_lr.detach().cpu() > 0)
        )
        if not positive:
            raise ValueError(
                f"{name}: decay_scaling={decay_scaling!r} divides by the initial lr, which "
                f"must be positive; got {float(reference_lr)!r} (pass decay_reference_lr=)"
            )
        # A copy: a schedule that writes lr in place must not move the reference.
        extra["decay_reference_lr"] = _copied(reference_lr)
    references = None if decay_to is None else _reference_lookup(name, decay_to)
    return extra, references


def check_decay_factor(name: str, h: Mapping[str, Any], scaling: str) -> None:
    """Refuse a step whose decay factor :math:`1 - c` is not positive under a scaling
    that divides by the reference lr (``"schedule"``, ``"corrected"``) or ``"none"``:
    it would zero the weights or flip their signs (a param group at 10x the reference
    lr and ``weight_decay=0.1``). ``"lr"`` keeps torch.optim.AdamW's behaviour. Read
    where the values are readable (Python numbers, CPU tensors outside
    ``torch.compile`` and ``vmap``)."""
    if scaling == "lr" or torch.compiler.is_compiling():
        return
    names = ["lr", "decay_reference_lr", "weight_decay", "decay_timescale"]
    values = {key: h[key] for key in names if key in h}
    if any(
        isinstance(v, Tensor)
        and (v.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(v))
        for v in values.values()
    ):
        return
    floats: dict[str, Scalar] = {key: float(v) for key, v in values.items()}
    if float(floats.get("decay_reference_lr", 1.0)) <= 0:
        return  # refused by its own check
    if float(floats.get("decay_timescale", 1.0)) <= 0:
        return
    coefficient = float(decay_coefficient(floats, decay_rate(floats, scaling), scaling))
    if 1 - coefficient <= 0:
        shown = ", ".join(f"{key}={value!r}" for key, value in floats.items())
        raise ValueError(
            f"{name}: decay_scaling={scaling!r} shrinks the weights by 1 - c = "
            f"{1 - coefficient!r} <= 0 ({shown}), which zeroes them or flips their signs; "
            "lower weight_decay or lr, or set decay_reference_lr to this group's initial lr"
        )


def _copied(value: Scalar) -> Scalar:
    return value.detach().clone() if isinstance(value, Tensor) else value


def _is_zero_literal(value: Scalar) -> bool:
    """A Python zero (a tensor, even a zero one, counts as given)."""
    return not isinstance(value, Tensor) and value == 0


def decay_rate(h: Mapping[str, Scalar], scaling: str) -> Scalar:
    """:math:`\\lambda` for this step: ``weight_decay``, or from ``decay_timescale``."""
    if "decay_timescale" not in h:
        return h["weight_decay"]
    if scaling in ("lr", "corrected"):
        return 1 / (h["decay_reference_lr"] * h["decay_timescale"])
    return 1 / h["decay_timescale"]


def decay_coefficient(h: Mapping[str, Scalar], weight_decay: Scalar, scaling: str) -> Scalar:
    """The decay coefficient :math:`c` of the module docstring for this step."""
    if scaling == "lr":
        return h["lr"] * weight_decay
    if scaling == "schedule":
        return h["lr"] / h["decay_reference_lr"] * weight_decay
    if scaling == "corrected":
        # lr * (lr / lr_0) * wd: at lr == lr_0 the ratio is exactly 1, so this is
        # "lr"'s lr * wd to the bit.
        return h["lr"] * (h["lr"] / h["decay_reference_lr"]) * weight_decay
    return weight_decay


TimescaleUnit = Literal["steps", "epochs", "fraction"]


def convert_timescale(
    value: float,
    from_unit: TimescaleUnit,
    to_unit: TimescaleUnit,
    *,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
) -> float:
    """Convert a decay timescale between steps, epochs and fractions of training.

    ``tau_epochs = tau_steps / steps_per_epoch`` and ``tau_fraction = tau_steps /
    total_steps`` (Wang & Aitchison, arXiv 2405.13698, who find the fraction of
    training transfers across model and data size). The optimizers take steps
    (``decay_timescale=``).

    Args:
        value: the timescale in ``from_unit``, positive.
        from_unit: ``"steps"``, ``"epochs"`` or ``"fraction"``.
        to_unit: likewise.
        steps_per_epoch: needed when either unit is ``"epochs"``.
        total_steps: needed when either unit is ``"fraction"``.

    Raises:
        ValueError: an unknown unit, a missing or non-positive count, or a
            non-positive value.

    Example:
        >>> import functorch_reg as fr
        >>> fr.convert_timescale(0.2, "fraction", "steps", total_steps=5000)
        1000.0
        >>> fr.convert_timescale(1000, "steps", "epochs", steps_per_epoch=250)
        4.0
    """
    per_unit = {"steps": 1, "epochs": steps_per_epoch, "fraction": total_steps}
    names = {"epochs": "steps_per_epoch", "fraction": "total_steps"}
    for unit in (from_unit, to_unit):
        if unit not in per_unit:
            raise ValueError(
                f"convert_timescale: units are 'steps', 'epochs' or 'fraction', got {unit!r}"
            )
        count = per_unit[unit]
        if count is None or isinstance(count, bool) or not count > 0:
            raise ValueError(
                f"convert_timescale: unit {unit!r} needs a positive {names[unit]}=, got {count!r}"
            )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"convert_timescale: value must be positive, got {value!r}")
    return float(value) * float(per_unit[from_unit] or 1) / float(per_unit[to_unit] or 1)


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
    """Per-leaf references of ``decay_to``, found by leaf name.

    The references are copied (as ``decay_reference_lr`` is): given the live params
    (``dict(model.named_parameters())``, the natural call), a reference would move with
    each in-place step and decay nothing."""
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
    by_name = {leaf_name: leaf.detach().clone() for leaf_name, leaf in by_name.items()}

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
            found.append(_on_device_of(p, reference, f"{name}: decay_to leaf {leaf_name!r}"))
        return found

    return references


def _on_device_of(p: Tensor, reference: Tensor, label: str) -> Tensor:
    """``reference`` where ``p`` is: a param on the meta device holds shapes and dtypes
    only, and so does its reference; elsewhere the two devices must agree."""
    if p.is_meta:
        return reference.to("meta")
    if reference.device != p.device:
        raise ValueError(f"{label} is on {reference.device}, the param on {p.device}")
    return reference
