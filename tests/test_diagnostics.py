"""fr.diagnostics: the per-leaf decay report against hand computation, the rotational
equilibrium of a scale-invariant weight (Kosson et al., arXiv 2305.17212), the per-layer
plot, and TorchOptimizer.step_and_report."""

from __future__ import annotations

import math

import pytest
import torch

import functorch_reg as fr
from functorch_reg import diagnostics

DTYPE = torch.float64


def scale_invariant_model(seed: int = 0) -> torch.nn.Module:
    """Linear (no bias) into a LayerNorm without eps or affine: the first weight is
    exactly scale-invariant; the head is not."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32, bias=False),
        torch.nn.LayerNorm(32, eps=0.0, elementwise_affine=False),
        torch.nn.Linear(32, 4),
    ).double()


def steady_state(functional, steps=400, burn_in=150, log_every=1, decay="decoupled"):
    """Train on random data with TorchOptimizer.step_and_report; the reports past burn-in."""
    model = scale_invariant_model()
    opt = fr.TorchOptimizer(model.named_parameters(), functional)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 16, dtype=DTYPE, generator=generator)
    y = torch.randn(4096, 4, dtype=DTYPE, generator=generator)
    reports = []
    for step in range(steps):
        index = torch.randint(0, 4096, (32,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[index]), y[index]).backward()
        if step >= burn_in and step % log_every == 0:
            reports.append(diagnostics.rows(opt.step_and_report(decay=decay)))
        else:
            opt.step()
    return reports


def mean(reports, leaf, metric):
    return sum(r[leaf][metric] for r in reports) / len(reports)


@pytest.mark.parametrize(
    "name, functional",
    [
        ("adamw", fr.adamw(lr=0.02, betas=(0.0, 0.999), weight_decay=1.0)),
        ("sgd", fr.sgd(lr=0.2, weight_decay=0.1, decoupled=True)),
    ],
)
@pytest.mark.slow
def test_equilibrium_angular_update_is_sqrt_2_lr_wd(name, functional):
    reports = steady_state(functional)
    predicted = math.sqrt(2 * 0.02 * 1.0)
    assert reports[0]["0.weight"]["predicted_angular_update"] == pytest.approx(predicted)
    measured = mean(reports, "0.weight", "angular_update")
    assert measured == pytest.approx(predicted, rel=0.05)
    # Scale-invariant: its gradient is orthogonal to it (to rounding); the head's is not.
    assert max(abs(r["0.weight"]["grad_cosine"]) for r in reports) < 1e-10
    assert max(abs(r["2.weight"]["grad_cosine"]) for r in reports) > 1e-3
    assert reports[0]["0.weight"]["timescale"] == pytest.approx(1 / 0.02)


@pytest.mark.slow
def test_equilibrium_with_momentum_has_the_momentum_factor():
    """With beta1 = 0.9 the angular update is sqrt(2 lr wd (1 - b) / (1 + b)), a quarter
    of sqrt(2 lr wd)."""
    reports = steady_state(fr.adamw(lr=0.02, betas=(0.9, 0.999), weight_decay=1.0))
    predicted = math.sqrt(2 * 0.02 * 1.0 * 0.1 / 1.9)
    assert mean(reports, "0.weight", "predicted_angular_update") == pytest.approx(predicted)
    assert mean(reports, "0.weight", "angular_update") == pytest.approx(predicted, rel=0.05)


def test_report_matches_hand_computation():
    generator = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(5, 3, dtype=DTYPE, generator=generator), "b": torch.randn(4, dtype=DTYPE)}
    new = {
        k: v + 0.3 * torch.randn(v.shape, dtype=DTYPE, generator=generator) for k, v in w.items()
    }
    g = {k: torch.randn(v.shape, dtype=DTYPE, generator=generator) for k, v in w.items()}
    report = diagnostics.rows(
        diagnostics.report(w, new, g, lr=0.1, weight_decay={"a": 0.2}, momentum=0.5)
    )
    for name in ("a", "b"):
        x, y, d = w[name].flatten(), new[name].flatten(), g[name].flatten()
        row = report[name]
        assert row["weight_norm"] == pytest.approx(float(x.norm()), rel=1e-14)
        assert row["update_ratio"] == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-14)
        cos = float(x @ y / (x.norm() * y.norm()))
        assert row["angular_update"] == pytest.approx(math.acos(cos), rel=1e-12)
        assert row["grad_cosine"] == pytest.approx(float(x @ d / (x.norm() * d.norm())), rel=1e-13)
    assert report["a"]["timescale"] == pytest.approx(50.0)
    assert report["a"]["predicted_angular_update"] == pytest.approx(math.sqrt(0.04 / 3))
    assert report["b"]["timescale"] == math.inf and report["b"]["predicted_angular_update"] == 0


def test_small_angles_are_accurate_in_float32():
    w = torch.tensor([1.0, 0.0, 0.0])
    new = torch.tensor([1.0, 1e-5, 0.0])
    row = diagnostics.rows(
        diagnostics.report({"w": w}, {"w": new}, {"w": w}, lr=0.1, weight_decay=0.0)
    )
    assert row["w"]["angular_update"] == pytest.approx(1e-5, rel=1e-5)


def test_zero_weights_and_missing_grads():
    w = {"z": torch.zeros(3), "frozen": torch.ones(2)}
    report = diagnostics.report(
        w, w, {"z": torch.ones(3), "frozen": None}, lr=0.1, weight_decay=0.1
    )
    assert set(report) == {"z"}
    row = diagnostics.rows(report)["z"]
    assert row["angular_update"] == row["update_ratio"] == row["grad_cosine"] == 0.0


def test_predicted_formulas():
    assert diagnostics.predicted_angular_update(0.01, 0.5) == pytest.approx(0.1)
    assert diagnostics.predicted_angular_update(0.01, 0.5, 0.9, "coupled") == pytest.approx(
        math.sqrt(0.01 / 1.9)
    )
    tensor = diagnostics.predicted_angular_update(torch.tensor(0.01), torch.tensor(0.5))
    assert isinstance(tensor, torch.Tensor) and float(tensor) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decoupled"):
        diagnostics.predicted_angular_update(0.1, 0.1, decay="l2")


@pytest.mark.compile
@pytest.mark.slow
def test_report_compiles_to_the_eager_values():
    generator = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(6, 4, generator=generator)}
    new = {"a": w["a"] * 0.99 + 0.01}
    g = {"a": torch.randn(6, 4, generator=generator)}

    def fn(w, new, g, lr):
        return diagnostics.report(w, new, g, lr=lr, weight_decay=0.1, momentum=0.9)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    eager = fn(w, new, g, torch.tensor(0.01))
    got = compiled(w, new, g, torch.tensor(0.01))
    for metric in diagnostics.METRICS:
        torch.testing.assert_close(got["a"][metric], eager["a"][metric])


def test_step_and_report_steps_like_step():
    models = [scale_invariant_model(), scale_invariant_model()]
    opts = [fr.TorchOptimizer(m.parameters(), fr.adamw(lr=0.01, weight_decay=0.1)) for m in models]
    x = torch.randn(8, 16, dtype=DTYPE)
    before = {k: v.detach().clone() for k, v in models[1].named_parameters()}
    for model, opt in zip(models, opts, strict=True):
        opt.zero_grad()
        model(x).square().mean().backward()
    opts[0].step()
    report = opts[1].step_and_report()
    after = {k: v.detach() for k, v in models[1].named_parameters()}
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    # Unnamed params are named "group.position"; the values are the functional report's.
    grads = {k: v.grad for k, v in models[1].named_parameters()}
    expected = diagnostics.report(before, after, grads, lr=0.01, weight_decay=0.1, momentum=0.9)
    assert list(report) == ["0.0", "0.1", "0.2"]
    for position, (name, _) in enumerate(models[1].named_parameters()):
        for metric in diagnostics.METRICS:
            torch.testing.assert_close(report[f"0.{position}"][metric], expected[name][metric])


def test_plot_draws_one_row_per_layer_without_pyplot_state():
    matplotlib = pytest.importorskip("matplotlib")
    del matplotlib
    import matplotlib.pyplot as plt

    figures = plt.get_fignums()
    w = {"a": torch.ones(3), "b": torch.ones(2)}
    history = [
        diagnostics.report(
            w, {k: v * (1 - 0.01 * t) for k, v in w.items()}, w, lr=0.1, weight_decay=0.1
        )
        for t in range(5)
    ]
    figure = diagnostics.plot(history, steps=[0, 10, 20, 30, 40], title="decay")
    assert len(figure.axes) == 6
    assert figure.axes[0].get_ylabel() == "a" and figure.axes[3].get_ylabel() == "b"
    assert plt.get_fignums() == figures
    assert len(diagnostics.plot([diagnostics.rows(h) for h in history], leaves=["b"]).axes) == 3
    with pytest.raises(ValueError, match="no leaf 'c'"):
        diagnostics.plot(history, leaves=["c"])
    with pytest.raises(ValueError, match="empty"):
        diagnostics.plot([])
