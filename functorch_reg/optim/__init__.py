"""Update rules as pure ``init``/``step`` functions."""

from . import schedules
from .adam import AdamState, adam, adamw
from .base import Optimizer, Prox, load_state_dict, state_dict
from .decay import convert_timescale
from .sgd import SGDState, sgd

__all__ = [
    "AdamState",
    "Optimizer",
    "Prox",
    "SGDState",
    "adam",
    "adamw",
    "convert_timescale",
    "load_state_dict",
    "schedules",
    "sgd",
    "state_dict",
]
