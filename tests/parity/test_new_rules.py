"""Step-for-step parity of fr.muon, fr.lion and fr.schedule_free_adamw with the
implementations their users know: torch.optim.Muon, lion_pytorch.Lion and
schedulefree.AdamWScheduleFree (train and eval points)."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr

lion_pytorch = pytest.importorskip("lion_pytorch")
schedulefree = pytest.importorskip("schedulefree")

MATRICES = {"0.weight": (6, 4), "1.weight": (3, 6), "2.weight": (5, 5)}
MIXED = {"0.weight": (6, 4), "0.bias": (6,), "2.weight": (3, 6), "2.bias": (3,)}


def start(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in shapes.items()}


def gradients(params, t):
    """A gradient that depends on the params (so trajectories that drift apart show it)."""
    generator = torch.Generator().manual_seed(1000 + t)
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype) + 0.3 * v
        for k, v in params.items()
    }


def run(ours, reference_class, shapes, steps, **reference_kwargs):
    """``steps`` steps of both; returns our params, our state and the reference's params."""
    params = start(shapes)
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    reference = reference_class(torch_params, **reference_kwargs)
    if hasattr(reference, "train"):
        reference.train()
    state = ours.init(params)
    for t in range(steps):
        grads = gradients(params, t)
        for p, g in zip(torch_params, grads.values(), strict=True):
            p.grad = g.clone()
        reference.step()
        params, state = ours.step(params, grads, state)
    return params, state, reference, torch_params


def max_relative_error(ours, reference):
    return max(
        ((mine - ref.detach()).abs().max() / ref.detach().abs().max()).item()
        for mine, ref in zip(ours.values(), reference, strict=True)
    )


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.slow
def test_muon_equals_torch_optim_muon_over_100_steps(adjust_lr_fn, nesterov):
    kwargs = {"lr": 2e-2, "weight_decay": 0.1, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    params, _, _, reference = run(fr.muon(**kwargs), torch.optim.Muon, MATRICES, 100, **kwargs)
    assert max_relative_error(params, reference) < 1e-6


@pytest.mark.slow
def test_muon_hybrid_equals_torch_muon_next_to_torch_adamw():
    """The usual recipe: Muon on the matrices, AdamW with its own lr and decay on the rest."""
    params = start(MIXED)
    matrices = [torch.nn.Parameter(v.clone()) for k, v in params.items() if v.ndim == 2]
    others = [torch.nn.Parameter(v.clone()) for k, v in params.items() if v.ndim < 2]
    torch_muon = torch.optim.Muon(matrices, lr=2e-2, weight_decay=0.1, momentum=0.9)
    torch_adamw = torch.optim.AdamW(others, lr=3e-3, weight_decay=0.05, foreach=False)
    opt = fr.muon(
        lr=2e-2, weight_decay=0.1, momentum=0.9, adam=fr.adamw(lr=3e-3, weight_decay=0.05)
    )
    state = opt.init(params)
    for t in range(100):
        grads = gradients(params, t)
        matrix_grads = iter([g for g in grads.values() if g.ndim == 2])
        other_grads = iter([g for g in grads.values() if g.ndim < 2])
        for p in matrices:
            p.grad = next(matrix_grads).clone()
        for p in others:
            p.grad = next(other_grads).clone()
        torch_muon.step()
        torch_adamw.step()
        params, state = opt.step(params, grads, state)
    ours_matrices = {k: v for k, v in params.items() if v.ndim == 2}
    ours_others = {k: v for k, v in params.items() if v.ndim < 2}
    assert max_relative_error(ours_matrices, matrices) < 1e-6
    assert max_relative_error(ours_others, others) < 1e-6


@pytest.mark.parametrize("decoupled_weight_decay", [False, True])
def test_lion_equals_lion_pytorch_over_200_steps(decoupled_weight_decay):
    kwargs = {
        "lr": 3e-3,
        "betas": (0.9, 0.99),
        "weight_decay": 0.5 if not decoupled_weight_decay else 1.5e-3,
        "decoupled_weight_decay": decoupled_weight_decay,
    }
    params, _, _, reference = run(fr.lion(**kwargs), lion_pytorch.Lion, MIXED, 200, **kwargs)
    assert max_relative_error(params, reference) < 1e-7


@pytest.mark.parametrize("r, weight_lr_power", [(0.0, 2.0), (1.0, 1.0)])
def test_schedule_free_adamw_equals_the_reference_at_y_and_at_x(r, weight_lr_power):
    kwargs = {
        "lr": 1e-2,
        "betas": (0.9, 0.999),
        "weight_decay": 0.05,
        "warmup_steps": 20,
        "r": r,
        "weight_lr_power": weight_lr_power,
    }
    opt = fr.schedule_free_adamw(**kwargs)
    params, state, reference, torch_params = run(
        opt, schedulefree.AdamWScheduleFree, MIXED, 200, foreach=False, **kwargs
    )
    assert max_relative_error(params, torch_params) < 1e-6
    reference.eval()
    x, x_state = fr.schedule_free_eval(opt, params, state)
    assert fr.schedule_free_point(x_state) == "x"
    assert max_relative_error(x, torch_params) < 1e-6
    reference.train()
    y, y_state = fr.schedule_free_train(opt, x, x_state)
    assert fr.schedule_free_point(y_state) == "y"
    assert max_relative_error(y, torch_params) < 1e-6


def test_schedule_free_sgd_equals_the_reference_at_y_and_at_x():
    kwargs = {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05, "warmup_steps": 20}
    opt = fr.schedule_free_sgd(**kwargs)
    params, state, reference, torch_params = run(
        opt, schedulefree.SGDScheduleFree, MIXED, 200, foreach=False, **kwargs
    )
    assert max_relative_error(params, torch_params) < 1e-6
    reference.eval()
    x, _ = fr.schedule_free_eval(opt, params, state)
    assert max_relative_error(x, torch_params) < 1e-6
