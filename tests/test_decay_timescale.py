"""Decoupled decay by schedule shape (``decay_scaling="corrected"``, AdamC) and by
timescale (``decay_timescale=``), against their closed forms with zero gradients."""

from __future__ import annotations

import math

import pytest
import torch

import functorch_reg as fr

DTYPE = torch.float64


def cosine(peak: float, steps: int) -> list[float]:
    return [peak * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]


def run(opt, lrs, w0, **overrides):
    """Steps with zero gradients at the given lrs; the trajectory of the weights."""
    params = {"w": w0.clone()}
    state = opt.init(params)
    trajectory = [w0.clone()]
    for lr in lrs:
        params, state = opt.step(params, {"w": torch.zeros_like(w0)}, state, lr=lr, **overrides)
        trajectory.append(params["w"])
    return torch.stack(trajectory)


W0 = torch.linspace(-2.0, 3.0, 7, dtype=DTYPE)


@pytest.mark.parametrize("make", [fr.adamw, lambda **kw: fr.sgd(decoupled=True, **kw)])
def test_corrected_decay_over_a_cosine_schedule(make):
    wd, peak, steps = 0.5, 0.1, 60
    lrs = cosine(peak, steps)
    opt = make(lr=peak, weight_decay=wd, decay_scaling="corrected")
    expected = W0 * math.prod(1 - wd * lr**2 / peak for lr in lrs)
    torch.testing.assert_close(run(opt, lrs, W0)[-1], expected, rtol=1e-12, atol=0)
    # Not the "lr" scaling's product, which decays more as the lr falls.
    plain = run(make(lr=peak, weight_decay=wd), lrs, W0)[-1]
    assert (plain.abs() < run(opt, lrs, W0)[-1].abs()).all()


def test_corrected_decay_at_constant_lr_is_lr_scaling_bit_for_bit():
    lrs = [0.03] * 20
    for lr_value in (0.03, torch.tensor(0.03, dtype=DTYPE)):
        corrected = fr.adamw(lr=lr_value, weight_decay=0.7, decay_scaling="corrected")
        plain = fr.adamw(lr=lr_value, weight_decay=0.7)
        assert torch.equal(run(corrected, lrs, W0), run(plain, lrs, W0))
    # And with real gradients.
    grads = {"w": torch.sin(torch.arange(7, dtype=DTYPE))}
    outs = []
    for scaling in ("corrected", "lr"):
        opt = fr.adamw(lr=0.03, weight_decay=0.7, decay_scaling=scaling)
        outs.append(opt.step({"w": W0}, grads, opt.init({"w": W0}))[0]["w"])
    assert torch.equal(*outs)


def test_corrected_uses_the_reference_lr():
    opt = fr.adamw(lr=0.1, weight_decay=0.5, decay_scaling="corrected", decay_reference_lr=0.2)
    out = run(opt, [0.1], W0)[-1]
    torch.testing.assert_close(out, W0 * (1 - 0.5 * 0.1**2 / 0.2), rtol=1e-14, atol=0)


@pytest.mark.parametrize("scaling", ["lr", "schedule", "corrected", "none"])
def test_timescale_at_constant_lr_decays_by_one_over_tau(scaling):
    tau, lr, steps = 25.0, 0.01, 40
    opt = fr.adamw(lr=lr, decay_timescale=tau, decay_scaling=scaling)
    trajectory = run(opt, [lr] * steps, W0)
    factors = torch.tensor([(1 - 1 / tau) ** t for t in range(steps + 1)], dtype=DTYPE)
    torch.testing.assert_close(trajectory, factors[:, None] * W0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scaling", ["lr", "corrected"])
def test_timescale_trajectory_does_not_depend_on_the_peak_lr(scaling):
    tau, steps = 30.0, 50
    trajectories = []
    for peak in (0.003, 0.03):
        opt = fr.adamw(lr=peak, decay_timescale=tau, decay_scaling=scaling)
        trajectories.append(run(opt, cosine(peak, steps), W0))
    torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-12, atol=0)
    # With weight_decay fixed instead, the tenfold lr decays tenfold faster.
    fixed = [run(fr.adamw(lr=p, weight_decay=1.0), cosine(p, steps), W0) for p in (0.003, 0.03)]
    assert (fixed[1][-1].abs() < fixed[0][-1].abs() * 0.9).all()


def test_timescale_equals_its_weight_decay():
    """decay_timescale=tau is weight_decay = 1 / (lr_0 tau) under "lr" scaling."""
    lr, tau = 0.02, 40.0
    grads = {"w": torch.cos(torch.arange(7, dtype=DTYPE))}
    by_tau = fr.adamw(lr=lr, decay_timescale=tau)
    by_wd = fr.adamw(lr=lr, weight_decay=1 / (lr * tau))
    outs = [opt.step({"w": W0}, grads, opt.init({"w": W0}))[0]["w"] for opt in (by_tau, by_wd)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-15, atol=0)
    assert "weight_decay" not in by_tau.hyperparams
    assert by_tau.hyperparams["decay_timescale"] == tau


def test_timescale_sweep_compiles_once_and_equals_single_runs():
    """A grid of timescales is one vmapped step (tau a batched tensor), equal to a loop."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=DTYPE), torch.randn(32, 2, dtype=DTYPE)
    model = torch.nn.Linear(4, 2).double()
    taus = torch.tensor([10.0, 100.0, 1000.0], dtype=DTYPE)
    opt = fr.adamw(lr=0.05, decay_timescale=100.0)
    loss = torch.nn.functional.mse_loss
    result = fr.sweep(
        model,
        loss,
        opt,
        taus,
        train=(x, y),
        val=(x, y),
        hyperparameter="decay_timescale",
        steps=15,
        compile=False,
        progress=False,
    )
    for i, tau in enumerate(taus.tolist()):
        single = fr.adamw(lr=0.05, decay_timescale=tau)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        state = single.init(params)
        for _ in range(15):
            grads = torch.func.grad(lambda p: loss(torch.func.functional_call(model, p, (x,)), y))(
                params
            )
            params, state = single.step(params, grads, state)
        torch.testing.assert_close(fr.unstack(result.params)[i], params, rtol=1e-12, atol=1e-14)
    norms = result.param_norm
    assert norms[0] < norms[1] < norms[2]


@pytest.mark.compile
@pytest.mark.slow
def test_timescale_override_does_not_recompile():
    opt = fr.adamw(lr=0.05, decay_timescale=torch.tensor(10.0, dtype=DTYPE))
    params = {"w": W0.clone()}
    state = opt.init(params)
    counts = {"n": 0}

    def backend(gm, inputs):
        counts["n"] += 1
        return gm.forward

    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for tau in (10.0, 20.0, 30.0):
        params, state = step(
            params, {"w": W0}, state, decay_timescale=torch.tensor(tau, dtype=DTYPE)
        )
    assert counts["n"] == 1


def test_torch_optimizer_per_group_timescale():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = fr.TorchOptimizer(
        [{"params": [a]}, {"params": [b], "decay_timescale": 10.0}],
        fr.adamw(lr=0.01, decay_timescale=100.0),
    )
    for _ in range(5):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        opt.step()
    torch.testing.assert_close(a.detach(), W0 * (1 - 1 / 100) ** 5, rtol=1e-13, atol=0)
    torch.testing.assert_close(b.detach(), W0 * (1 - 1 / 10) ** 5, rtol=1e-13, atol=0)


def test_torch_optimizer_per_group_corrected_with_a_scheduler():
    p = torch.nn.Parameter(W0.clone())
    opt = fr.TorchOptimizer([p], fr.adamw(lr=0.1, weight_decay=0.5, decay_scaling="corrected"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros_like(p)
        opt.step()
        scheduler.step()
    expected = W0 * math.prod(1 - 0.5 * lr**2 / 0.1 for lr in lrs)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)


def test_convert_timescale():
    assert fr.convert_timescale(1000, "steps", "epochs", steps_per_epoch=250) == 4.0
    assert fr.convert_timescale(4, "epochs", "steps", steps_per_epoch=250) == 1000.0
    assert (
        fr.convert_timescale(0.2, "fraction", "epochs", steps_per_epoch=10, total_steps=500) == 10
    )
    assert (
        fr.convert_timescale(10, "epochs", "fraction", steps_per_epoch=10, total_steps=500) == 0.2
    )
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fr.convert_timescale(3, "epochs", "steps")
    with pytest.raises(ValueError, match="units are"):
        fr.convert_timescale(3, "iters", "steps")
    with pytest.raises(ValueError, match="positive"):
        fr.convert_timescale(-1, "steps", "steps")


def test_decay_options_bad_input():
    with pytest.raises(ValueError, match="either weight_decay or decay_timescale"):
        fr.adamw(weight_decay=0.1, decay_timescale=100.0)
    with pytest.raises(ValueError, match="decay_timescale applies to decoupled decay only"):
        fr.adam(decay_timescale=100.0)
    with pytest.raises(ValueError, match="decay_timescale"):
        fr.adamw(decay_timescale=0.5)
    with pytest.raises(ValueError, match="decay_scaling must be one of"):
        fr.adamw(decay_scaling="adamc")
    with pytest.raises(ValueError, match="corrected.*positive"):
        fr.adamw(lr=0.0, decay_scaling="corrected")
    with pytest.raises(ValueError, match="decay_reference_lr needs"):
        fr.adamw(decay_reference_lr=0.1)
    opt = fr.adamw(lr=0.1, decay_timescale=10.0)
    params = {"w": W0.clone()}
    state = opt.init(params)
    with pytest.raises(TypeError, match="unknown hyperparameter 'weight_decay'"):
        opt.step(params, {"w": W0}, state, weight_decay=0.1)
    with pytest.raises(ValueError, match="decay_timescale"):
        opt.step(params, {"w": W0}, state, decay_timescale=0.0)
    assert torch.equal(params["w"], W0)
