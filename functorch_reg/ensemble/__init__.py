"""Ensembles over regularization strength: one vmapped, compiled step trains a whole grid.

:func:`~functorch_reg.sweep` trains one member per strength (or grid point, or fold) of a
model, all at once, and reports per-member validation metrics;
:func:`~functorch_reg.ensemble_step` is its step, for loops of one's own. The linear path
is in :mod:`functorch_reg.paths`. This package only re-exports; its rooms are:

- :mod:`~functorch_reg.ensemble.members`: K members of one model (``init_ensemble``,
  ``member_step``, ``ensemble_step``);
- :mod:`~functorch_reg.ensemble.grid`: what a sweep was asked, resolved and checked once
  (``plan`` -> ``SweepPlan``);
- :mod:`~functorch_reg.ensemble.loop`: running a plan (batches, progress, evaluation,
  ``refit(plan, index)``);
- :mod:`~functorch_reg.ensemble.search`: ``sweep`` and ``SweepResult``.
"""

from .grid import Folding, Select, Strengths, SweepPlan, plan
from .loop import refit
from .members import (
    ModelParts,
    Randomness,
    ensemble_step,
    first_member_dtype,
    init_ensemble,
    member_step,
    model_parts,
)
from .search import SweepResult, sweep

__all__ = [
    "Folding",
    "ModelParts",
    "Randomness",
    "Select",
    "Strengths",
    "SweepPlan",
    "SweepResult",
    "ensemble_step",
    "first_member_dtype",
    "init_ensemble",
    "member_step",
    "model_parts",
    "plan",
    "refit",
    "sweep",
]
