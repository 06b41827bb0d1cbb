"""Every figure and table of a result: the sweep's, the linear path's and tune's.

:class:`~functorch_reg.SweepResult`, :class:`~functorch_reg.LinearPath` and
:class:`~functorch_reg.hypergrad.TuneResult` keep their ``plot`` / ``table`` methods as
one-line delegations to this module. Figures use matplotlib's object API
(``matplotlib.figure.Figure``), never pyplot's global state or ``matplotlib.use``, so a
notebook keeps its backend and no figure is left open in pyplot. matplotlib is an
optional extra, imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .tree import flatten, is_float, spec_names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .ensemble import SweepResult
    from .hypergrad import TuneResult
    from .paths import LinearPath

PathLike = str | os.PathLike[str] | None

# Words for the grid axes sweep() names; any other axis is an optimizer hyperparameter.
AXIS_WORDS = {
    "penalty": "penalty strength",
    "prox_strength": "prox strength",
    "weight_decay": "weight-decay strength",
    "lr": "learning rate",
}


def format_strength(value: float) -> str:
    """A strength in text, at 3 significant digits: ``0.10000000149011612`` -> ``0.1``."""
    return f"{value:.3g}"


def strength_label(axis: str, names: Mapping[str, str] | None = None) -> str:
    """An axis label that says what the strength is and which argument it is:
    ``"group-lasso strength (prox_strength)"``; ``names`` maps an axis to its words."""
    words = (names or {}).get(axis, AXIS_WORDS.get(axis, axis))
    return words if words == axis else f"{words} ({axis})"


def new_figure(ncols: int, width: float, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    """A figure of ``ncols`` panels, not registered with pyplot (constrained layout, so
    legends placed outside the axes get room)."""
    try:
        import matplotlib  # noqa: F401  (the package first: a clear error when it is absent)
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is an optional extra
        raise ImportError(
            'plot() needs matplotlib: pip install "functorch_reg[examples]"'
        ) from error
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def finish(figure: Figure, path: PathLike) -> Figure:
    """Save ``figure`` to ``path`` when given (format from the suffix) and return it."""
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def log_strength_axis(axis: Axes, strengths: Tensor) -> None:
    """Log x for positive strengths; symlog (linear below the smallest positive one)
    when the grid includes 0."""
    positive = strengths[strengths > 0]
    if len(positive) == len(strengths):
        axis.set_xscale("log")
    elif len(positive):
        axis.set_xscale("symlog", linthresh=positive.min().item())


def log_if_decades(axis: Axes, values: Tensor) -> bool:
    """Log y when the finite values are positive and span at least a decade (e.g. a
    validation loss whose collapsed members sit far above the minimum); returns
    whether it did."""
    finite = values[torch.isfinite(values)]
    if len(finite) and (finite > 0).all() and finite.max() >= 10 * finite.min():
        axis.set_yscale("log")
        plain_log_labels(axis)
        return True
    return False


def plain_log_labels(axis: Axes) -> None:
    """Label a log y-axis's ticks ``0.2``, ``0.5``, ``2`` rather than ``2 x 10^-1``."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def legend_below(axis: Axes, handles: list[Any], labels: list[str]) -> None:
    """A legend under the axis, outside it, so it covers no data."""
    axis.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncols=2,
        fontsize="small",
        frameon=False,
    )


# --- SweepResult --------------------------------------------------------------------------


def sweep_axes(result: SweepResult) -> dict[str, Tensor]:
    """The grid axes of a result; ``{"strength": strengths}`` when it has none."""
    return dict(result.grid) or {"strength": result.strengths}


def sweep_table(result: SweepResult) -> str:
    """:meth:`SweepResult.table`: one row per member, strengths at 3 significant digits."""
    axes = sweep_axes(result)
    header = "  ".join(f"{axis:>13}" for axis in axes)
    header += f"  {'val loss':>9}  {'val acc':>7}  {'zeros':>6}  {'norm':>8}"
    rows = [header, "-" * len(header)]
    best = result.best_index if result.finite.any() else -1
    for i in range(len(result.val_loss)):
        accuracy = "" if result.val_accuracy is None else f"{result.val_accuracy[i].item():.3f}"
        mark = "  <- best" if i == best else ""
        if not result.finite[i]:
            mark = "  diverged"
        cells = "  ".join(f"{format_strength(v[i].item()):>13}" for v in axes.values())
        rows.append(
            f"{cells}  {result.val_loss[i].item():>9.4f}  {accuracy:>7}  "
            f"{result.sparsity[i].item():>6.1%}  {result.param_norm[i].item():>8.3f}{mark}"
        )
    return "\n".join(rows)


def sweep_title(result: SweepResult, axes: Mapping[str, Tensor]) -> str:
    """What was trained: ``"32 models (Linear 64->64, Linear 64->10), one per
    prox_strength"``, with the folds when cross-validated."""
    layers = dict.fromkeys(label.rpartition(" ")[0] or label for label in result.labels.values())
    model = f" ({', '.join(layers)})" if layers else ""
    count = len(result.val_loss)
    point = f"{next(iter(axes))} value" if len(axes) == 1 else f"({', '.join(axes)}) grid point"
    if result.fold_val_loss is None:
        return f"{count} models{model}, one per {point}"
    folds = result.fold_val_loss.shape[1]
    return f"{count} {point}s x {folds} folds = {count * folds} models{model}"


def sweep_figure(
    result: SweepResult,
    path: PathLike,
    title: str | None = None,
    names: Mapping[str, str] | None = None,
) -> Figure:
    """:meth:`SweepResult.plot`: the regularization path and the validation curve."""
    figure, (path_axis, val_axis) = new_figure(2, width=12, height=5.2)
    axes = sweep_axes(result)
    first = next(iter(axes))
    sweep_path_panel(path_axis, result, axes, strength_label(first, names))
    sweep_validation_panel(val_axis, result, axes, strength_label(first, names))
    figure.suptitle(title or sweep_title(result, axes))
    return finish(figure, path)


def along_first_axis(result: SweepResult, axes: Mapping[str, Tensor]) -> Tensor:
    """The members on the first axis with the other axes at the chosen member's values."""
    best = result.best_index
    along = torch.ones(len(result.val_loss), dtype=torch.bool)
    for values in list(axes.values())[1:]:
        along &= values == values[best]
    return along


def sweep_path_panel(
    axis: Axes, result: SweepResult, axes: Mapping[str, Tensor], xlabel: str
) -> None:
    """The L2 norm of each parameter tensor along the first grid axis."""
    x = next(iter(axes.values()))
    along = along_first_axis(result, axes)
    count = len(result.val_loss)
    folds = None if result.fold_val_loss is None else result.fold_val_loss.shape[1]
    leaves, spec = flatten(result.params)
    for name, leaf in zip(spec_names(spec), leaves, strict=True):
        if is_float(leaf):
            # With folds, a leaf is (K, folds, ...): the norm per fold, averaged.
            norms = leaf.reshape(count, folds or 1, -1).norm(dim=-1).mean(1)
            axis.plot(x[along], norms[along], label=result.labels.get(name, name))
    mark_chosen(axis, x[result.best_index].item(), next(iter(axes)))
    log_strength_axis(axis, x)
    ylabel = "L2 (Frobenius) norm of each parameter tensor"
    if folds is not None:
        ylabel += f"\n(mean over {folds} folds)"
    axis.set(title="Regularization path", xlabel=xlabel, ylabel=ylabel)
    legend_below(axis, *axis.get_legend_handles_labels())


def mark_chosen(axis: Axes, chosen: float, name: str) -> None:
    axis.axvline(
        chosen,
        color="black",
        linestyle=":",
        linewidth=1.2,
        label=f"chosen {name} = {format_strength(chosen)}",
    )


def sweep_metric(result: SweepResult) -> tuple[Tensor, Tensor | None, str]:
    """The selection metric, its per-fold values, and its name in words."""
    if result.val_accuracy is not None and result.select == "val_accuracy":
        metric, folds, what = result.val_accuracy, result.fold_val_accuracy, "accuracy"
    else:
        metric, folds, what = result.val_loss, result.fold_val_loss, "loss"
    if folds is None:
        return metric, None, f"validation {what}"
    return metric, folds, f"mean {folds.shape[1]}-fold cross-validation {what}"


def sweep_validation_panel(
    axis: Axes, result: SweepResult, axes: Mapping[str, Tensor], xlabel: str
) -> None:
    """The selection metric against the first axis (one line per value of the others),
    the fold range as a band, the chosen member starred, exact zeros on a twin axis."""
    first, *others = axes
    x = axes[first]
    metric, folds, label = sweep_metric(result)
    keys = sorted({tuple(axes[a][i].item() for a in others) for i in range(len(x))})
    for index, key in enumerate(keys):
        line = torch.ones(len(x), dtype=torch.bool)
        for other, value in zip(others, key, strict=True):
            line &= axes[other] == value
        words = ", ".join(f"{a} = {format_strength(v)}" for a, v in zip(others, key, strict=True))
        drawn = axis.plot(x[line], metric[line], marker="o", markersize=4, label=words or label)
        if folds is not None:
            axis.fill_between(
                x[line],
                folds[line].min(1).values,
                folds[line].max(1).values,
                color=drawn[0].get_color(),
                alpha=0.2,
                label=f"range over the {folds.shape[1]} folds" if index == 0 else "_",
            )
    diverged = ~result.finite
    if diverged.any():
        axis.plot(
            x[diverged], [0.98] * int(diverged.sum()), "x", color="red",
            transform=axis.get_xaxis_transform(), label="diverged (non-finite loss)",
        )  # fmt: skip
    best = result.best_index
    if metric is result.val_loss:
        label += " (log scale)" if log_if_decades(axis, metric) else ""
    else:
        label += clip_far_accuracies(axis, x, metric, folds, best)
    zeros_axis = sweep_zeros_axis(axis, result, axes)
    chosen, value = x[best].item(), metric[best].item()
    name = label.split(" (")[0].split("\n")[0]
    axis.axvline(chosen, color="black", linestyle=":", linewidth=1.2)
    axis.plot(
        [chosen], [value], marker="*", markersize=14, color="black", linestyle="none",
        label=f"chosen: {first} = {format_strength(chosen)}, {name.split()[-1]} {value:.4g}",
    )  # fmt: skip
    log_strength_axis(axis, x)
    axis.set(title=name[0].upper() + name[1:], xlabel=xlabel, ylabel=label)
    handles, labels = axis.get_legend_handles_labels()
    zero_handles, zero_labels = zeros_axis.get_legend_handles_labels()
    legend_below(axis, handles + zero_handles, labels + zero_labels)


def clip_far_accuracies(
    axis: Axes, x: Tensor, metric: Tensor, folds: Tensor | None, best: int
) -> str:
    """Clip the y-axis to the members whose error rate (1 - accuracy) is within a decade
    of the chosen one's, as the loss is drawn on a log scale: collapsed members would
    flatten the informative range. The clipped members are drawn as triangles on the
    bottom edge; returns the words for the y-label."""
    error = 1 - metric
    finite = torch.isfinite(metric)
    far = finite & (error > 10 * max(error[best].item(), 1e-3))
    count = int(far.sum())
    if not count:
        return ""
    kept = finite & ~far
    shown = metric[kept] if folds is None else torch.cat([metric[kept], folds[kept].flatten()])
    low, high = shown.min().item(), shown.max().item()
    pad = 0.08 * (high - low) or 0.01
    axis.set_ylim(low - pad, high + pad)
    values = ", ".join(f"{value:.3g}" for value in metric[far].tolist())
    axis.plot(
        x[far], [0.0] * count, marker="v", markersize=9, color="tab:red", linestyle="none",
        transform=axis.get_xaxis_transform(), clip_on=False,
        label=f"clipped, below the axis: {values}",
    )  # fmt: skip
    return f"\n(axis clipped: {count} member{'s' * (count > 1)} below)"


def sweep_zeros_axis(axis: Axes, result: SweepResult, axes: Mapping[str, Tensor]) -> Axes:
    """The fraction of exact zeros along the first axis, on a twin y-axis at the right."""
    x = next(iter(axes.values()))
    along = along_first_axis(result, axes)
    zeros_axis = axis.twinx()
    zeros_axis.plot(
        x[along], result.sparsity[along], color="gray", linestyle="--",
        label="fraction exactly zero (right axis)",
    )  # fmt: skip
    zeros_axis.set_ylim(-0.03, 1.03)
    zeros_axis.set_ylabel("fraction of parameters exactly zero", color="gray")
    return zeros_axis


# --- LinearPath ---------------------------------------------------------------------------


def path_figure(result: LinearPath, path: PathLike) -> Figure:
    """:meth:`LinearPath.plot`: each coefficient against the strength, and with folds
    the held-out error with its fold range."""
    cross_validated = result.mse_path is not None
    figure, panels = new_figure(2 if cross_validated else 1, width=11 if cross_validated else 6)
    x = result.strengths
    xlabel = "lasso / elastic-net strength (alpha)"
    axis = panels[0]
    axis.plot(x, result.coef, linewidth=1)
    axis.set(title="Regularization path", xlabel=xlabel, ylabel="coefficient")
    log_strength_axis(axis, x)
    features = result.coef.shape[1]
    title = f"Linear model, {features} coefficients, at {len(x)} strengths"
    if result.mse_path is not None:
        folds = result.mse_path.shape[1]
        chosen = result.best_strength
        for panel in panels:
            mark_chosen(panel, chosen, "alpha")
        error = panels[1]
        mean = result.mse_path.mean(1)
        error.plot(x, mean, marker="o", markersize=3, label=f"mean over {folds} folds")
        error.fill_between(
            x, result.mse_path.min(1).values, result.mse_path.max(1).values,
            alpha=0.2, label=f"range over the {folds} folds",
        )  # fmt: skip
        ylabel = "held-out mean squared error"
        if log_if_decades(error, result.mse_path.flatten()):
            ylabel += " (log scale)"
        log_strength_axis(error, x)
        error.set(title=f"{folds}-fold cross-validation", xlabel=xlabel, ylabel=ylabel)
        legend_below(error, *error.get_legend_handles_labels())
        legend_below(axis, *axis.get_legend_handles_labels())
        title += f", chosen by {folds}-fold cross-validation"
    figure.suptitle(title)
    return finish(figure, path)


# --- TuneResult ---------------------------------------------------------------------------


def tune_names(result: TuneResult, names: Sequence[str] | None) -> list[str]:
    """One legend name per strength: the caller's, else ``"strength i"``."""
    count = result.strengths.numel()
    if names is None:
        return (
            ["strength"] if result.strengths.dim() == 0 else [f"strength {i}" for i in range(count)]
        )
    names = [str(name) for name in names]
    if len(names) != count:
        raise ValueError(
            f"TuneResult.plot: names has {len(names)} entries for {count} strengths; "
            "give one name per strength, in the order of the strengths vector"
        )
    return names


def tune_figure(
    result: TuneResult,
    path: PathLike,
    title: str | None = None,
    names: Sequence[str] | None = None,
) -> Figure:
    """:meth:`TuneResult.plot`: the strengths and the validation loss per round."""
    labels = tune_names(result, names)
    figure, (strength_axis, val_axis) = new_figure(2, width=12, height=4.8)
    history = result.history
    steps = history.train_steps
    strengths = history.strengths.reshape(len(steps), -1)
    for index, name in enumerate(labels):
        strength_axis.plot(steps, strengths[:, index], marker=".", label=name)
    strength_axis.set(
        title="Strengths",
        xlabel="training steps",
        ylabel="strength (log scale)",
        yscale="log",
    )
    plain_log_labels(strength_axis)
    legend_below(strength_axis, *strength_axis.get_legend_handles_labels())
    val_axis.plot(steps, history.val_loss, marker=".", color="black")
    ylabel = "validation loss"
    if log_if_decades(val_axis, history.val_loss):
        ylabel += " (log scale)"
    final = f"final {history.val_loss[-1].item():.4g}"
    val_axis.set(title=f"Validation loss ({final})", xlabel="training steps", ylabel=ylabel)
    rounds = len(steps) - 1
    figure.suptitle(
        title
        or f"{len(labels)} strength{'s' * (len(labels) > 1)} tuned by hypergradient: "
        f"{rounds} rounds, {result.train_steps} training steps"
    )
    return finish(figure, path)
