"""Plot helpers shared by the sweep and the linear path (matplotlib is optional)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_strength_axis(axis: Any, strengths: Tensor) -> None:
    positive = strengths[strengths > 0]
    if len(positive) == len(strengths):
        axis.set_xscale("log")
    elif len(positive):
        axis.set_xscale("symlog", linthresh=positive.min().item())


def finish(figure: Figure, path: str | None) -> Figure:
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # matplotlib is an optional extra
        raise ImportError(
            'plot() needs matplotlib: pip install "functorch_reg[examples]"'
        ) from error
    return plt
