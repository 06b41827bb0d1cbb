"""Figures and tables of results (functorch_reg/_plot.py): what they say, read from the
figure objects (labels, scales, the marked choice, legend placement), not from pixels."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import functorch_reg as fr
from functorch_reg.hypergrad import TuneHistory, TuneResult

matplotlib = pytest.importorskip("matplotlib")

STRENGTHS = torch.logspace(-2, 0, 9)  # float32, so 0.1 reads 0.10000000149011612 as a float
# A validation loss with a minimum at 0.1 and collapsed members at 2.3: it spans decades.
VAL_LOSS = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.12, 0.14, 0.5, 2.3, 2.3])


def sweep_result(val_loss=VAL_LOSS, folds=None, select="val_loss", grid=True):
    k = len(STRENGTHS)
    lead = (k,) if folds is None else (k, folds)
    params = {"0.weight": torch.ones(*lead, 4, 3), "0.bias": torch.ones(*lead, 4)}
    accuracy = 1 - val_loss / 3
    fold_loss = fold_accuracy = None
    if folds is not None:
        spread = torch.linspace(-0.02, 0.02, folds)
        fold_loss, fold_accuracy = val_loss[:, None] + spread, accuracy[:, None] + spread
    return fr.SweepResult(
        strengths=STRENGTHS,
        params=params,
        train_loss=torch.zeros(2, k),
        val_loss=val_loss,
        val_accuracy=accuracy,
        sparsity=torch.linspace(0, 1, k),
        param_norm=torch.ones(k),
        fold_val_loss=fold_loss,
        fold_val_accuracy=fold_accuracy,
        grid={"prox_strength": STRENGTHS} if grid else {},
        select=select,
        labels={"0.weight": "Linear 3->4 weight", "0.bias": "Linear 3->4 bias"},
    )


def drawn(figure):
    figure.savefig(io.BytesIO(), format="png")  # lays the figure out
    return figure


def legend_outside(axis) -> bool:
    """The legend's box and the axis's box do not overlap."""
    legend, box = axis.get_legend().get_window_extent(), axis.get_window_extent()
    return legend.y1 <= box.y0 or legend.x0 >= box.x1 or legend.y0 >= box.y1


def chosen_star(axis):
    return [line for line in axis.get_lines() if line.get_marker() == "*"]


@pytest.mark.slow
def test_sweep_plot_names_the_axes_logs_a_loss_spanning_decades_and_marks_the_choice():
    result = sweep_result()
    best = result.best_index
    figure = drawn(result.plot(names={"prox_strength": "group-lasso strength"}))
    path_axis, val_axis = figure.axes[:2]
    assert path_axis.get_xlabel() == val_axis.get_xlabel() == "group-lasso strength (prox_strength)"
    assert path_axis.get_ylabel() == "L2 (Frobenius) norm of each parameter tensor"
    assert val_axis.get_ylabel() == "validation loss (log scale)"
    assert val_axis.get_yscale() == "log" and val_axis.get_xscale() == "log"
    # The chosen member: a star at its point, labeled with its strength; a line at it.
    (star,) = chosen_star(val_axis)
    assert star.get_xdata()[0] == pytest.approx(STRENGTHS[best].item())
    assert star.get_ydata()[0] == pytest.approx(VAL_LOSS[best].item())
    assert star.get_label() == "chosen: prox_strength = 0.1, loss 0.12"
    assert star.get_label() in [t.get_text() for t in val_axis.get_legend().get_texts()]
    legend = [t.get_text() for t in path_axis.get_legend().get_texts()]
    assert "chosen prox_strength = 0.1" in legend and "Linear 3->4 weight" in legend
    assert legend_outside(path_axis) and legend_outside(val_axis)
    assert figure.get_suptitle() == "9 models (Linear 3->4), one per prox_strength value"
    assert drawn(result.plot(title="MLPs on digits")).get_suptitle() == "MLPs on digits"


def test_sweep_plot_keeps_a_linear_axis_when_the_loss_spans_less_than_a_decade():
    figure = sweep_result(val_loss=torch.linspace(0.5, 1.0, 9)).plot()
    assert figure.axes[1].get_yscale() == "linear"
    assert figure.axes[1].get_ylabel() == "validation loss"
    assert figure.axes[0].get_xlabel() == "prox strength (prox_strength)"


@pytest.mark.slow
def test_cross_validation_plot_shows_the_mean_and_the_fold_range():
    result = sweep_result(folds=5, select="val_accuracy")
    figure = drawn(result.plot())
    val_axis = figure.axes[1]
    # Two collapsed members (error 0.77, 19 x the chosen one's) are clipped, and said so.
    assert val_axis.get_ylabel() == (
        "mean 5-fold cross-validation accuracy\n(axis clipped: 2 members below)"
    )
    assert val_axis.get_ylim()[0] > 0.8
    (band,) = val_axis.collections
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(result.fold_val_accuracy.min().item())
    assert high == pytest.approx(result.fold_val_accuracy.max().item())
    names = [t.get_text() for t in val_axis.get_legend().get_texts()]
    assert "range over the 5 folds" in names and "clipped, below the axis: 0.233, 0.233" in names
    assert legend_outside(val_axis) and legend_outside(figure.axes[0])
    (star,) = chosen_star(val_axis)
    assert star.get_ydata()[0] == pytest.approx(result.val_accuracy.max().item())
    assert "(mean over 5 folds)" in figure.axes[0].get_ylabel()
    assert figure.get_suptitle().startswith("9 prox_strength values x 5 folds = 45 models")


@pytest.mark.slow
def test_plot_of_a_real_cross_validated_sweep():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        fr.adam(lr=1e-2, prox=fr.prox.l1),
        [0.01, 0.1],
        train=(x, y),
        folds=3,
        hyperparameter="prox_strength",
        select="val_accuracy",
        steps=2,
        compile=False,
        progress=False,
    )
    figure = drawn(result.plot())
    assert figure.axes[1].get_ylabel().startswith("mean 3-fold cross-validation accuracy")
    assert len(chosen_star(figure.axes[1])) == 1
    names = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "Linear 5->4 weight" in names


@pytest.mark.slow
def test_plot_leaves_the_backend_and_pyplot_alone(tmp_path):
    """matplotlib.use("Agg") inside plot() switched a notebook's backend for the process."""
    before = matplotlib.get_backend()
    plt = sys.modules.get("matplotlib.pyplot")
    open_figures = plt.get_fignums() if plt is not None else []
    matplotlib.use("svg")
    try:
        sweep_result().plot(tmp_path / "sweep.png")
        tune_result().plot(tmp_path / "tune.png")
        fr.LinearPath(STRENGTHS, torch.zeros(9, 2), torch.zeros(9)).plot(tmp_path / "path.png")
        assert matplotlib.get_backend() == "svg"
        if plt is not None:
            assert plt.get_fignums() == open_figures
        assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in ("sweep", "tune"))
    finally:
        matplotlib.use(before)


def test_table_prints_strengths_at_three_significant_digits_under_their_name():
    table = sweep_result().table()
    assert table.splitlines()[0].split()[0] == "prox_strength"
    assert "0.10000000149011612" not in table and "       0.1  " in table
    assert sweep_result(grid=False).table().splitlines()[0].split()[0] == "strength"


def tune_result(shape=(3,)):
    steps = torch.tensor([0, 20, 40])
    strengths = torch.stack(
        [torch.full(shape, 1e-3), torch.full(shape, 1e-2), torch.full(shape, 0.1)]
    )
    history = TuneHistory(steps, strengths, torch.tensor([2.0, 0.5, 0.1]), torch.zeros(2, *shape))
    return TuneResult(params={}, strengths=strengths[-1], train_steps=40, history=history)


def test_tune_plot_labels_each_strength_with_its_layer():
    layers = ("0.weight", "2.weight", "4.weight")
    figure = drawn(tune_result().plot(names=layers))
    strength_axis, val_axis = figure.axes
    assert [t.get_text() for t in strength_axis.get_legend().get_texts()] == list(layers)
    assert strength_axis.get_ylabel() == "strength (log scale)"
    assert strength_axis.get_yscale() == "log" and val_axis.get_yscale() == "log"
    assert val_axis.get_ylabel() == "validation loss (log scale)"
    assert strength_axis.get_xlabel() == val_axis.get_xlabel() == "training steps"
    assert legend_outside(strength_axis)
    assert figure.get_suptitle() == (
        "3 strengths tuned by hypergradient: 2 rounds, 40 training steps"
    )
    default = tune_result().plot().axes[0].get_legend().get_texts()
    assert [t.get_text() for t in default] == ["strength 0", "strength 1", "strength 2"]
    assert tune_result(()).plot().axes[0].get_legend().get_texts()[0].get_text() == "strength"


def test_tune_plot_wants_one_name_per_strength():
    with pytest.raises(ValueError, match="names has 2 entries for 3 strengths"):
        tune_result().plot(names=["a", "b"])


@pytest.mark.slow
def test_linear_path_plot_with_folds_shows_the_error_and_the_choice():
    mse = torch.stack([torch.linspace(1, 30, 9), torch.linspace(2, 40, 9)], dim=1).flip(0)
    result = fr.LinearPath(STRENGTHS, torch.randn(9, 4), torch.zeros(9), mse_path=mse)
    figure = drawn(result.plot())
    path_axis, error_axis = figure.axes
    assert path_axis.get_xlabel() == "lasso / elastic-net strength (alpha)"
    assert error_axis.get_ylabel() == "held-out mean squared error (log scale)"
    chosen = [line for line in path_axis.get_lines() if line.get_linestyle() == ":"]
    assert chosen[0].get_xdata()[0] == pytest.approx(result.best_strength)
    assert legend_outside(error_axis)
    assert figure.get_suptitle().endswith("chosen by 2-fold cross-validation")


def test_tune_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install \"functorch_reg\[examples\]\""):
        tune_result().plot()


@pytest.mark.slow
def test_a_grid_of_two_axes_draws_one_line_per_value_of_the_second():
    penalty, lr = (
        torch.tensor([0.01, 0.1, 1.0]).repeat(2),
        torch.tensor([1e-3, 1e-2]).repeat_interleave(3),
    )
    loss = torch.tensor([0.3, 0.2, 0.4, 0.25, 0.1, 0.5])
    result = fr.SweepResult(
        strengths=penalty,
        params={"w": torch.ones(6, 2, 2)},
        train_loss=torch.zeros(1, 6, 2),
        val_loss=loss,
        val_accuracy=None,
        sparsity=torch.zeros(6),
        param_norm=torch.ones(6),
        fold_val_loss=torch.stack([loss - 0.05, loss + 0.05], dim=1),
        grid={"penalty": penalty, "lr": lr},
    )
    figure = drawn(result.plot())
    path_axis, val_axis = figure.axes[:2]
    names = [t.get_text() for t in val_axis.get_legend().get_texts()]
    assert names[:3] == ["lr = 0.001", "range over the 2 folds", "lr = 0.01"]
    assert names.count("range over the 2 folds") == 1
    (star,) = chosen_star(val_axis)
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((0.1, 0.1))
    # The path runs along penalty at the chosen lr (0.01): members 3, 4, 5.
    (norms,) = [line for line in path_axis.get_lines() if line.get_label() == "w"]
    assert list(norms.get_xdata()) == pytest.approx([0.01, 0.1, 1.0])
    assert figure.get_suptitle() == "6 (penalty, lr) grid points x 2 folds = 12 models"
