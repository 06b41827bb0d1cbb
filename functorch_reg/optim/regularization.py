"""The regularization keywords that every update rule's factory takes (weight decay and
its decoupled variants, ``prox`` and its metric, ``mask``, ``skip_nonfinite``,
``clip_grad_norm``): checked once and turned into what :func:`.base.build` needs.

:func:`~functorch_reg.sgd`, :func:`~functorch_reg.adam`, :func:`~functorch_reg.lion`,
:func:`~functorch_reg.muon` and the Schedule-Free rules name these keywords in their
signatures (for documentation and ``vmap``-able per-call overrides) and hand them here
as a whole, so each option is read, validated and forwarded in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._checks import NON_NEGATIVE, Interval, Scalar
from ..select import Where
from .base import FusedStep, LeafRule, LeafTable, Optimizer, Prox, build, check_prox_metric
from .clipping import with_clipping
from .decay import INTERVALS as DECAY_INTERVALS
from .decay import References, check_decay_factor, decay_options

__all__ = ["INTERVALS", "Regularization", "regularization"]

INTERVALS: dict[str, Interval] = {
    "lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "prox_strength": NON_NEGATIVE,
    **DECAY_INTERVALS,
}
"""Per-call bounds of the hyperparameters every rule has (a rule adds its own)."""


@dataclass(frozen=True)
class Regularization:
    """A factory's regularization keywords, checked (see :func:`regularization`).

    Attributes:
        name: the optimizer's name, for messages (``"adamw"``).
        hyperparams: the hyperparameters these keywords add, in order:
            ``weight_decay`` (left out when ``decay_timescale`` gives the decay),
            ``prox_strength``, then ``decay_timescale`` and ``decay_reference_lr``
            where they apply.
        scaling: the ``decay_scaling`` the rule applies.
        in_metric: whether the prox is taken in the rule's metric
            (``prox_metric="preconditioned"``).
        references: the per-leaf lookup of ``decay_to``, or ``None``.
        check: the check of the resolved decay factor, or ``None``.
        mask, prox, skip_nonfinite, clip_grad_norm: the factory's arguments.
    """

    name: str
    hyperparams: dict[str, Any]
    scaling: str
    in_metric: bool
    references: References | None
    check: Callable[[Mapping[str, Scalar]], None] | None
    mask: Where
    prox: Prox | None
    skip_nonfinite: bool
    clip_grad_norm: Scalar | None

    def build(
        self,
        own: Mapping[str, Any],
        state_type: type[Any],
        init_slots: Callable[[Tensor], tuple[Tensor | None, ...]],
        rule: LeafRule,
        intervals: Mapping[str, Interval],
        *,
        table: LeafTable | None = None,
        fused: FusedStep | None = None,
        skip_nonfinite: bool | None = None,
    ) -> Optimizer:
        """:func:`.base.build` of ``rule``, with the rule's ``own`` hyperparameters
        (in their order; a ``weight_decay`` there keeps its place) followed by
        :attr:`hyperparams`, and ``intervals`` over :data:`INTERVALS`. Without
        clipping (see :meth:`finish`); ``skip_nonfinite`` overrides the keyword's."""
        return build(
            self.name,
            state_type=state_type,
            init_slots=init_slots,
            rule=rule,
            hyperparams={**own, **self.hyperparams},
            intervals={**INTERVALS, **intervals},
            check=self.check,
            mask=self.mask,
            prox=self.prox,
            skip_nonfinite=self.skip_nonfinite if skip_nonfinite is None else skip_nonfinite,
            table=table,
            references=self.references,
            fused=fused,
        )

    def finish(self, optimizer: Optimizer) -> Optimizer:
        """``optimizer`` with the ``clip_grad_norm`` option (unchanged without it)."""
        return with_clipping(self.name, optimizer, self.clip_grad_norm)


def regularization(
    name: str,
    arguments: Mapping[str, Any],
    *,
    decoupled: bool | None = None,
    decay_scaling: str | None = None,
    check_factor: bool = False,
) -> Regularization:
    """Check a factory's regularization keywords and prepare them for :func:`.base.build`.

    Args:
        name: the optimizer's name, for messages.
        arguments: the factory's arguments by name (its ``locals()``: the keywords
            are written once, in the signature, not forwarded one by one). ``lr``,
            ``weight_decay``, ``prox_strength``, ``mask``, ``prox``,
            ``skip_nonfinite`` and ``clip_grad_norm`` are read, and, where the
            factory has them, ``decoupled``, ``decay_scaling``,
            ``decay_reference_lr``, ``decay_timescale``, ``cautious_decay``,
            ``decay_to`` and ``prox_metric``.
        decoupled: the decay's form when the factory has no ``decoupled`` keyword
            (Lion, Muon and the Schedule-Free rules decay decoupled only).
        decay_scaling: the scaling when the factory resolves it itself (Lion's
            ``decoupled_weight_decay``).
        check_factor: refuse, at each step, a decay factor :math:`1 - c \\le 0` under
            the scalings that divide by the reference lr (see
            :func:`.decay.check_decay_factor`).

    Raises:
        ValueError: as :func:`.decay.decay_options` (decay options that do not fit
            together) and :func:`.base.check_prox_metric`.
    """
    get = arguments.get
    prox: Prox | None = get("prox")
    in_metric = check_prox_metric(name, get("prox_metric", "euclidean"), prox)
    is_decoupled = bool(get("decoupled")) if decoupled is None else decoupled
    scaling = get("decay_scaling", "lr") if decay_scaling is None else decay_scaling
    timescale = get("decay_timescale")
    extra, references = decay_options(
        name,
        lr=arguments["lr"],
        decoupled=is_decoupled,
        decay_scaling=scaling,
        decay_reference_lr=get("decay_reference_lr"),
        cautious_decay=get("cautious_decay", False),
        decay_to=get("decay_to"),
        weight_decay=arguments["weight_decay"],
        decay_timescale=timescale,
    )
    decay = {} if timescale is not None else {"weight_decay": arguments["weight_decay"]}
    check = functools.partial(check_decay_factor, name, scaling=scaling) if check_factor else None
    return Regularization(
        name=name,
        hyperparams={**decay, "prox_strength": arguments["prox_strength"], **extra},
        scaling=scaling,
        in_metric=in_metric,
        references=references,
        check=check,
        mask=arguments["mask"],
        prox=prox,
        skip_nonfinite=arguments["skip_nonfinite"],
        clip_grad_norm=arguments["clip_grad_norm"],
    )
