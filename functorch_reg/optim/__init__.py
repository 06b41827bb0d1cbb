"""Update rules as pure ``init``/``step`` functions."""

from . import schedules
from .adam import AdamState, adam, adamw
from .base import Optimizer, Prox
from .checkpoint import load_state_dict, state_dict
from .decay import convert_timescale
from .lion import LionState, lion
from .muon import MuonState, muon
from .schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval,
    schedule_free_eval_,
    schedule_free_point,
    schedule_free_sgd,
    schedule_free_train,
    schedule_free_train_,
)
from .sgd import SGDState, sgd

__all__ = [
    "AdamState",
    "LionState",
    "MuonState",
    "Optimizer",
    "Prox",
    "SGDState",
    "ScheduleFreeState",
    "adam",
    "adamw",
    "convert_timescale",
    "lion",
    "load_state_dict",
    "muon",
    "schedule_free_adamw",
    "schedule_free_eval",
    "schedule_free_eval_",
    "schedule_free_point",
    "schedule_free_sgd",
    "schedule_free_train",
    "schedule_free_train_",
    "schedules",
    "sgd",
    "state_dict",
]
