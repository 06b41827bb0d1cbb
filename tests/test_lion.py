"""fr.lion beyond parity: the decay's bound on the weights, decay options, bad input."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_decay_bounds_the_weights_at_every_step_up_to_2000():
    """|w_{t+1}| <= (1 - lr wd) |w_t| + lr, so
    max|w_T| <= 1/wd + (1 - lr wd)^T (max|w_0| - 1/wd)."""
    lr, wd = 0.01, 0.5
    generator = torch.Generator().manual_seed(0)
    params = {"w": 10 * torch.randn(50, dtype=torch.float64, generator=generator)}
    start = params["w"].abs().max().item()
    opt = fr.lion(lr=lr, weight_decay=wd)
    state = opt.init(params)
    # A gradient that pushes every weight outward, the worst case for the bound.
    for t in range(1, 2001):
        grads = {
            "w": -torch.sign(params["w"]) * torch.rand(50, dtype=torch.float64, generator=generator)
        }
        params, state = opt.step(params, grads, state)
        bound = 1 / wd + (1 - lr * wd) ** t * (start - 1 / wd)
        assert params["w"].abs().max().item() <= bound * (1 + 1e-12), t
    assert params["w"].abs().max().item() > 0.9 / wd  # the bound is approached, not loose


def test_decoupled_weight_decay_divides_by_the_initial_lr():
    """lion-pytorch's option: a smaller lr needs no larger weight_decay."""
    params = {"w": torch.ones(3, dtype=torch.float64)}
    zero = {"w": torch.zeros(3, dtype=torch.float64)}
    for lr in (1e-2, 1e-4):
        opt = fr.lion(lr=lr, weight_decay=0.1, decoupled_weight_decay=True)
        new, _ = opt.step(params, zero, opt.init(params))
        torch.testing.assert_close(new["w"], params["w"] * (1 - 0.1), rtol=1e-15, atol=0)
    # Later, the per-call lr scales it by lr / lr_0.
    opt = fr.lion(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    new, _ = opt.step(params, zero, opt.init(params), lr=5e-3)
    torch.testing.assert_close(new["w"], params["w"] * (1 - 0.05), rtol=1e-15, atol=0)


def test_decay_to_and_cautious_decay():
    params = {"w": torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64)}
    grads = {"w": torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)}
    reference = {"w": torch.ones(3, dtype=torch.float64)}
    opt = fr.lion(lr=0.1, weight_decay=0.5, decay_to=reference)
    new, _ = opt.step(params, grads, opt.init(params))
    update = torch.sign(grads["w"])
    torch.testing.assert_close(new["w"], params["w"] - 0.05 * (params["w"] - 1) - 0.1 * update)
    opt = fr.lion(lr=0.1, weight_decay=0.5, cautious_decay=True)
    new, _ = opt.step(params, grads, opt.init(params))
    agree = torch.tensor([True, False, False])
    decayed = torch.where(agree, params["w"] * 0.95, params["w"])
    torch.testing.assert_close(new["w"], decayed - 0.1 * update)


def test_prox_gives_exact_zeros():
    opt = fr.lion(lr=0.1, prox=fr.prox.l1, prox_strength=5.0)
    params = {"w": torch.tensor([0.3, -0.2, 3.0])}
    new, _ = opt.step(params, {"w": torch.tensor([1.0, -1.0, 1.0])}, opt.init(params))
    assert_identical(new["w"], torch.tensor([0.0, 0.0, 2.4]))


@pytest.mark.parametrize("betas", [(1.0, 0.99), (0.9, 1.0), (-0.1, 0.9)])
def test_betas_outside_the_unit_interval_are_refused_before_anything_changes(betas):
    with pytest.raises(ValueError, match=r"lion: beta.=.* is outside \[0.0, 1.0\)"):
        fr.lion(betas=betas)
    opt = fr.lion()
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"is outside \[0.0, 1.0\)"):
        opt.step_(params, {"w": torch.ones(3)}, state, betas=betas)
    assert_identical(params["w"], torch.ones(3))
    assert_identical(state.exp_avg["w"], torch.zeros(3))


def test_decoupled_weight_decay_with_another_scaling_is_refused():
    with pytest.raises(ValueError, match="decoupled_weight_decay=True is decay_scaling='schedule'"):
        fr.lion(decoupled_weight_decay=True, decay_scaling="none")
