"""Update rules as pure ``init``/``step`` functions."""

from . import schedules
from .adam import AdamState, adam, adamw
from .base import Optimizer, Prox, load_state_dict, state_dict
from .sgd import SGDState, sgd

__all__ = [
    "AdamState",
    "Optimizer",
    "Prox",
    "SGDState",
    "adam",
    "adamw",
    "load_state_dict",
    "schedules",
    "sgd",
    "state_dict",
]
