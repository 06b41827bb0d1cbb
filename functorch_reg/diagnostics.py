r"""What weight decay does to each layer: norms, rotation, and their equilibrium.

A weight vector followed by a normalization layer (BatchNorm, LayerNorm) is
scale-invariant: the loss does not change with its norm, so its gradient is orthogonal
to it (:math:`\cos(g, w) = 0`) and only its direction matters. Weight decay then sets
how fast that direction turns. Kosson, Messmer & Jaggi ("Rotational Equilibrium: How
Weight Decay Balances Learning Across Neural Networks", arXiv 2305.17212) show that the
norm settles where the decay's shrink balances the updates' growth, and the angular
update per step then settles at

.. math::
    \hat\eta_r = \sqrt{2 \eta \lambda \frac{1 - \beta}{1 + \beta}}
    \quad\text{(AdamW, decoupled SGD)}, \qquad
    \hat\eta_r = \sqrt{\frac{2 \eta \lambda}{1 + \beta}}
    \quad\text{(SGD with L2 decay through the momentum)},

with :math:`\beta` Adam's :math:`\beta_1` or SGD's momentum (both
:math:`\sqrt{2\eta\lambda}` without momentum), in their random-walk model (gradient
noise dominates). :math:`1 / (\eta\lambda)` steps is the decay's timescale (Wang &
Aitchison, arXiv 2405.13698).

:func:`report` measures, per leaf, from the weights before and after one step and the
step's gradient: ``weight_norm`` :math:`\|w\|`, ``update_ratio``
:math:`\|w' - w\| / \|w\|`, ``angular_update`` (the angle between :math:`w` and
:math:`w'`, radians), ``grad_cosine`` :math:`\cos(g, w)`, and, from the
hyperparameters, ``timescale`` :math:`1 / (\eta\lambda)` (steps) and
``predicted_angular_update`` :math:`\hat\eta_r`. It is pure tensor code (no host
reads), cheap enough to call every few steps, and compiles; :func:`rows` reads a report
to floats, :func:`plot` draws a history of them per layer.
``functorch_reg.TorchOptimizer.step_and_report`` gives the same report from a
``torch.optim``-style loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ._checks import Scalar
from .tree import Params, flatten, is_float, leaf_names, matching_leaves

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["METRICS", "plot", "predicted_angular_update", "report", "rows"]

METRICS = (
    "weight_norm",
    "update_ratio",
    "angular_update",
    "predicted_angular_update",
    "grad_cosine",
    "timescale",
)
"""The entries of each leaf's report, in order."""

Decay = Literal["decoupled", "coupled"]
Report = dict[str, dict[str, Tensor]]
"""``{leaf name: {metric: 0-d tensor}}``, the metrics of :data:`METRICS`."""


def predicted_angular_update(
    lr: Scalar, weight_decay: Scalar, momentum: Scalar = 0.0, decay: Decay = "decoupled"
) -> Scalar:
    r"""The equilibrium angular update per step :math:`\hat\eta_r` (module docstring).

    :math:`\sqrt{2\eta\lambda(1 - \beta)/(1 + \beta)}` for decoupled decay and
    :math:`\sqrt{2\eta\lambda/(1 + \beta)}` for coupled decay (Kosson, Messmer & Jaggi,
    arXiv 2305.17212), in radians per step.

    Args:
        lr: :math:`\eta`.
        weight_decay: :math:`\lambda`; :math:`\eta\lambda` is the shrink per step.
        momentum: Adam's :math:`\beta_1` or SGD's momentum.
        decay: ``"decoupled"`` (AdamW, ``sgd(decoupled=True)``) or ``"coupled"`` (SGD's
            L2 decay, which the momentum amplifies).

    Returns:
        Radians per step: a float, or a tensor when an argument is one.

    Raises:
        ValueError: ``decay`` is neither ``"decoupled"`` nor ``"coupled"``.

    Example:
        >>> import functorch_reg as fr
        >>> round(fr.diagnostics.predicted_angular_update(1e-3, 0.1, momentum=0.9), 6)
        0.003244
    """
    if decay not in ("decoupled", "coupled"):
        raise ValueError(f"diagnostics: decay must be 'decoupled' or 'coupled', got {decay!r}")
    shrink = lr * weight_decay
    factor = (1 - momentum) / (1 + momentum) if decay == "decoupled" else 1 / (1 + momentum)
    value = 2 * shrink * factor
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


def report(
    params: Params,
    new_params: Params,
    grads: Params,
    *,
    lr: Scalar,
    weight_decay: Scalar | Mapping[str, Scalar],
    momentum: Scalar = 0.0,
    decay: Decay = "decoupled",
) -> Report:
    r"""The decay diagnostics of one step, per floating-point leaf with a gradient.

    Args:
        params: the weights before the step (a pytree).
        new_params: the weights after it, same structure.
        grads: the step's gradients, same structure (``None`` leaves are skipped).
        lr: the step's learning rate :math:`\eta`.
        weight_decay: :math:`\lambda`, a scalar or ``{leaf name: scalar}`` (a leaf it
            leaves out has no decay: infinite timescale, zero prediction). With
            ``decay_scaling`` other than ``"lr"`` or a ``decay_timescale``, pass the
            :math:`\lambda` whose :math:`\eta\lambda` is the step's shrink.
        momentum: Adam's :math:`\beta_1` or SGD's momentum.
        decay: ``"decoupled"`` or ``"coupled"`` (see :func:`predicted_angular_update`).

    Returns:
        ``{leaf name: {metric: 0-d tensor}}`` (:data:`METRICS`). A zero weight has zero
        ``update_ratio``, ``angular_update`` and ``grad_cosine``. Units:
        ``weight_norm`` absolute (L2 over the leaf); ``update_ratio`` relative,
        :math:`\|w' - w\| / \|w\|` per step; ``angular_update`` and its prediction in
        radians per step; ``grad_cosine`` in ``[-1, 1]``; ``timescale`` in steps.

    Raises:
        ValueError: ``new_params`` or ``grads`` differ from ``params`` in leaf names
            or shapes; an unknown ``decay``.

    Example:
        >>> import functorch_reg as fr
        >>> w, g = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> new = {"w": torch.tensor([1.0, 0.1])}
        >>> r = fr.diagnostics.report(w, new, g, lr=0.1, weight_decay=0.5)
        >>> row = fr.diagnostics.rows(r)["w"]
        >>> round(row["angular_update"], 4), round(row["update_ratio"], 4), row["timescale"]
        (0.0997, 0.1, 20.0)
    """
    leaves, spec = flatten(params)
    new_leaves = matching_leaves(leaves, spec, new_params, other_name="new_params")
    grad_leaves = matching_leaves(leaves, spec, grads)
    out: Report = {}
    for name, w, new, g in zip(leaf_names(params), leaves, new_leaves, grad_leaves, strict=True):
        if g is None or not is_float(w):
            continue
        rate = weight_decay.get(name, 0.0) if isinstance(weight_decay, Mapping) else weight_decay
        out[name] = _leaf_report(w, new, g, lr, rate, momentum, decay)
    return out


def _leaf_report(
    w: Tensor, new: Tensor, g: Tensor, lr: Scalar, rate: Scalar, momentum: Scalar, decay: Decay
) -> dict[str, Tensor]:
    tiny = torch.finfo(w.dtype).tiny
    w, new, g = w.detach(), new.detach(), g.detach()
    norm = torch.linalg.vector_norm(w)
    new_norm = torch.linalg.vector_norm(new)
    safe = norm.clamp_min(tiny)
    unit, new_unit = w / safe, new / new_norm.clamp_min(tiny)
    # The angle from the chord between unit vectors: accurate for small angles, where
    # arccos of the cosine is not.
    angle = 2 * torch.atan2(
        torch.linalg.vector_norm(unit - new_unit), torch.linalg.vector_norm(unit + new_unit)
    )
    live = (norm > 0) & (new_norm > 0)
    grad_norm = torch.linalg.vector_norm(g)
    cosine = (w * g).sum() / (safe * grad_norm.clamp_min(tiny))
    shrink = torch.as_tensor(lr * rate, dtype=w.dtype, device=w.device)
    return {
        "weight_norm": norm,
        "update_ratio": torch.linalg.vector_norm(new - w) / safe * (norm > 0),
        "angular_update": torch.where(live, angle, 0),
        "predicted_angular_update": torch.as_tensor(
            predicted_angular_update(lr, rate, momentum, decay), dtype=w.dtype, device=w.device
        ),
        "grad_cosine": torch.where(norm > 0, cosine, 0),
        "timescale": torch.where(shrink > 0, 1 / shrink, math.inf),
    }


def rows(report: Report) -> dict[str, dict[str, float]]:
    """A report as Python floats, read with one host transfer.

    Args:
        report: a :func:`report`'s output.

    Returns:
        ``{leaf name: {metric: float}}`` with the metrics of :data:`METRICS`.

    Example:
        >>> import functorch_reg as fr
        >>> w = {"w": torch.ones(3)}
        >>> r = fr.diagnostics.report(w, w, w, lr=0.1, weight_decay=0.0)
        >>> row = fr.diagnostics.rows(r)["w"]
        >>> row["timescale"]
        inf
    """
    if not report:
        return {}
    values = torch.stack(
        [torch.stack([m[k].double().cpu() for k in METRICS]) for m in report.values()]
    ).tolist()
    return {
        name: dict(zip(METRICS, row, strict=True)) for name, row in zip(report, values, strict=True)
    }


def plot(
    history: Sequence[Report | Mapping[str, Mapping[str, float]]],
    steps: Sequence[int] | None = None,
    *,
    leaves: Sequence[str] | None = None,
    title: str | None = None,
    path: str | None = None,
) -> Figure:
    """One row per layer: angular update per step (measured, and the predicted
    equilibrium dashed), weight norm, and :math:`|\\cos(g, w)|`.

    Uses matplotlib's object API (``matplotlib.figure.Figure``), not pyplot's global
    state, so it is safe in threads and never opens a window.

    Args:
        history: reports (or their :func:`rows`), one per logged step.
        steps: the step of each report (default ``0, 1, ...``).
        leaves: which leaves to draw (default: every leaf of the first report).
        title: the figure's title.
        path: also save the figure there.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: ``history`` is empty; a name in ``leaves`` is not in the reports.
        ImportError: matplotlib is not installed.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> w = {"w": torch.ones(3)}
        >>> history = [fr.diagnostics.report(w, w, w, lr=0.1, weight_decay=0.1)] * 2
        >>> figure = fr.diagnostics.plot(history, steps=[0, 100], title="one layer")
        >>> len(figure.axes)  # angular update, weight norm, gradient cosine
        3
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is an optional extra
        raise ImportError(
            'diagnostics.plot needs matplotlib: pip install "functorch_reg[examples]"'
        ) from error
    if not history:
        raise ValueError("diagnostics.plot: history is empty; log some reports first")
    read = [entry if _is_rows(entry) else rows(entry) for entry in history]  # type: ignore[arg-type]
    names = list(read[0]) if leaves is None else list(leaves)
    missing = [name for name in names if name not in read[0]]
    if missing or not names:
        raise ValueError(
            f"diagnostics.plot: no leaf {missing[0] if missing else '(none)'!r} in the "
            f"reports, which have {sorted(read[0])}"
        )
    x = list(range(len(read))) if steps is None else list(steps)
    figure = Figure(figsize=(11, 2.2 * len(names) + 0.6))
    axes = figure.subplots(len(names), 3, squeeze=False)
    for row, name in zip(axes, names, strict=True):
        series = {metric: [float(entry[name][metric]) for entry in read] for metric in METRICS}
        row[0].plot(x, series["angular_update"], label="measured")
        row[0].plot(x, series["predicted_angular_update"], "--", label="equilibrium")
        row[0].set_ylabel(name, fontsize=8)
        row[1].plot(x, series["weight_norm"])
        row[2].semilogy(x, [abs(c) + 1e-300 for c in series["grad_cosine"]])
    axes[0][0].set_title("angular update per step (rad)")
    axes[0][0].legend(fontsize=7)
    axes[0][1].set_title("||w||")
    axes[0][2].set_title("|cos(grad, w)|")
    for axis in axes[-1]:
        axis.set_xlabel("step")
    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _is_rows(entry: object) -> bool:
    first = next(iter(entry.values()), None) if isinstance(entry, Mapping) else None
    return isinstance(first, Mapping) and not any(isinstance(v, Tensor) for v in first.values())
