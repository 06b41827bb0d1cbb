"""Kept so that ``import functorch_reg.sweep_step`` goes on working: the vmapped member
step and its helpers moved into :mod:`functorch_reg.ensemble` (``vmapped_step`` is
:func:`functorch_reg.ensemble.member_step`). Re-exports only; new code imports from
:mod:`functorch_reg.ensemble`.
"""

from .ensemble.grid import Probe, probe
from .ensemble.loop import eval_mode, evaluate, evaluate_folds, train
from .ensemble.members import (
    ModelParts,
    Randomness,
    Samples,
    check_randomness,
    forward,
    model_parts,
    seeded,
    stacked,
)
from .ensemble.members import member_step as vmapped_step

__all__ = [
    "ModelParts",
    "Probe",
    "Randomness",
    "Samples",
    "check_randomness",
    "eval_mode",
    "evaluate",
    "evaluate_folds",
    "forward",
    "model_parts",
    "probe",
    "seeded",
    "stacked",
    "train",
    "vmapped_step",
]
