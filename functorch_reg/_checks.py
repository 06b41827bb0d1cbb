"""Validation of arguments, shared by every module: scalar hyperparameters (a float
or a 0-d tensor inside an interval) and counts (a positive int)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Scalar = float | Tensor
"""A hyperparameter: a Python number or a 0-d floating-point tensor."""


@dataclass(frozen=True)
class Interval:
    """Allowed values ``low <= x <= high`` (``x < high`` when ``high_open``)."""

    low: float = 0.0
    high: float = math.inf
    high_open: bool = False

    def __str__(self) -> str:
        return f"[{self.low}, {self.high}{')' if self.high_open else ']'}"

    def holds(self, value: float) -> bool:
        below_high = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and self.low <= value and below_high


NON_NEGATIVE = Interval()
UNIT = Interval(0.0, 1.0)
UNIT_OPEN = Interval(0.0, 1.0, high_open=True)


def check_scalars(
    owner: str,
    values: Mapping[str, object],
    intervals: Mapping[str, Interval],
    *,
    read_tensors: bool = True,
) -> None:
    """Raise a clear error unless every named value is a finite scalar inside its interval.

    A scalar is a Python or NumPy real number, or a 0-d floating-point tensor.

    Types and shapes are always checked. Values are checked for Python numbers and,
    with ``read_tensors``, for tensors (one host sync for all of them), except where
    they cannot be read without breaking the program: under ``torch.compile`` (which
    may trace a float as symbolic) and, for tensors, inside ``vmap``.
    """
    compiling = torch.compiler.is_compiling()
    tensors = {}
    for name, value in values.items():
        value = as_scalar(value)
        interval = intervals[name]
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                raise TypeError(
                    f"{owner}: {name} must be a floating-point tensor, got {value.dtype}"
                )
            if value.ndim != 0:
                raise ValueError(
                    f"{owner}: {name} must be a scalar (0-d) tensor, got shape "
                    f"{tuple(value.shape)}; to sweep it, vmap over its leading dim"
                )
            if read_tensors and _readable(value):
                if value.is_meta:
                    raise ValueError(
                        f"{owner}: {name} is a tensor on the meta device, which holds no "
                        "value; pass a float or a tensor on the params' device"
                    )
                tensors[name] = value
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name} must be a float or a tensor, got {value!r}")
        elif not compiling and not interval.holds(float(value)):
            raise ValueError(f"{owner}: {name}={value!r} is outside {interval} or not finite")
    if tensors and not _all_hold(tensors, intervals):
        bad = {
            name: value.item()
            for name, value in tensors.items()
            if not intervals[name].holds(value.item())
        }
        name, value = next(iter(bad.items()))
        raise ValueError(f"{owner}: {name}={value!r} is outside {intervals[name]} or not finite")


def _readable(value: Tensor) -> bool:
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_batchedtensor(value)


def _all_hold(tensors: Mapping[str, Tensor], intervals: Mapping[str, Interval]) -> bool:
    if all(value.device.type == "cpu" for value in tensors.values()):
        # No device to wait for: a number each, read at once (bounds 0 and 1 are
        # exact in every float dtype, so this compares as the tensors would).
        return all(intervals[name].holds(value.item()) for name, value in tensors.items())
    checks = []
    for name, value in tensors.items():
        interval = intervals[name]
        value = value.detach()
        below_high = value < interval.high if interval.high_open else value <= interval.high
        checks.append(torch.isfinite(value) & (value >= interval.low) & below_high)
    return bool(torch.stack([check.to(checks[0].device) for check in checks]).all())


def as_scalar(value: Any) -> Any:
    """A NumPy real scalar as the Python number it holds (which torch ops take as a
    weak scalar, never promoting a tensor); anything else as it is.

    ``np.float64`` subclasses ``float`` but ``torch.compile`` traces it as an array
    (it failed with "repr() on tensor"), and under ``torch.compile`` a NumPy scalar
    argument is seen as a 0-d ``np.ndarray``: both become a Python number here, so
    ``lr=np.float64(0.1)`` works on every path, eager or compiled."""
    if isinstance(value, (bool, Tensor)) or type(value) in (int, float):
        return value
    if isinstance(value, np.ndarray) and torch.compiler.is_compiling():
        return float(value)  # the compiler reads no array attribute; a scalar is a float
    if isinstance(value, (np.generic, np.ndarray)) and value.ndim == 0:
        kind = value.dtype.kind
        if kind == "f":
            return float(value)
        if kind in "iu":
            return int(value)
        return value
    if isinstance(value, numbers.Real):
        return value.item() if hasattr(value, "item") else float(value)
    return value


def check_positive_int(owner: str, name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an ``int`` of at least ``minimum`` (default 1), else raise.

    A ``bool`` is not a count, and neither is a float (``3.0``) or a NumPy integer.

    Args:
        owner: the function or object checking, for the message (``"sweep"``).
        name: the argument's name (``"steps"``).
        value: the value passed.
        minimum: the least value allowed.

    Returns:
        ``value``, typed as an ``int``.

    Raises:
        ValueError: ``value`` is not an int, or is less than ``minimum`` (the message
            names ``owner`` and ``name``).

    Example:
        >>> check_positive_int("sweep", "steps", 10)
        10
        >>> check_positive_int("sweep", "steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: sweep: steps must be a positive int, got 0
        >>> check_positive_int("sweep", "folds", 1, minimum=2)
        Traceback (most recent call last):
        ...
        ValueError: sweep: folds must be an int >= 2, got 1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {wanted}, got {value!r}")
    return value
