"""fr.schedule_free_adamw beyond parity: the y/x switch and its guard, warmup, decay at z."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def params_and_grads(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=generator, dtype=torch.float64)}
    grads = [{"w": torch.randn(4, 3, generator=generator, dtype=torch.float64)} for _ in range(4)]
    return params, grads


def test_a_step_at_the_evaluation_point_is_refused_before_anything_changes():
    opt = fr.schedule_free_adamw(lr=0.1)
    params, grads = params_and_grads()
    state = opt.init(params)
    opt.step_(params, grads[0], state)
    x, x_state = fr.schedule_free_eval(opt, params, state)
    before = fr.state_dict(x_state), {k: v.clone() for k, v in x.items()}
    with pytest.raises(ValueError, match="hold the evaluation point x.*schedule_free_train"):
        opt.step_(x, grads[1], x_state)
    assert_identical((fr.state_dict(x_state), x), before)
    with pytest.raises(ValueError, match="evaluation point"):
        opt.step(x, grads[1], x_state)


def test_eval_then_train_returns_to_y_and_each_is_idempotent():
    opt = fr.schedule_free_adamw(lr=0.1, betas=(0.8, 0.99))
    params, grads = params_and_grads()
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, g, state)
    assert fr.schedule_free_point(state) == "y"
    x, x_state = fr.schedule_free_eval(opt, params, state)
    # x = y + (1 - 1/beta1)(z - y)
    torch.testing.assert_close(x["w"], params["w"] + (1 - 1 / 0.8) * (state.z["w"] - params["w"]))
    again, again_state = fr.schedule_free_eval(opt, x, x_state)
    assert again is x and again_state is x_state
    y, y_state = fr.schedule_free_train(opt, x, x_state)
    torch.testing.assert_close(y, params, rtol=1e-14, atol=1e-14)
    assert fr.schedule_free_point(y_state) == "y"
    opt.step(y, grads[0], y_state)  # stepping is allowed again


def test_warmup_ramps_the_lr_linearly():
    """With beta1 = 0, y = z, so each step moves by the scheduled lr times the direction."""
    opt = fr.schedule_free_adamw(lr=0.1, betas=(0.0, 0.999), warmup_steps=4)
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    state = opt.init(params)
    moves = []
    for _ in range(6):
        new, state = opt.step(params, {"w": torch.ones(1, dtype=torch.float64)}, state)
        moves.append((params["w"] - new["w"]).item())
        params = new
    # The normalized direction is 1 / (1 + eps) on a constant gradient.
    expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    assert moves == pytest.approx(expected, rel=1e-6)


def test_decay_at_z_evaluates_the_decay_at_z():
    """Written out: d = g / denom + wd * z; y and z move as at y."""
    lr, wd, beta1, beta2, eps = 0.1, 0.3, 0.9, 0.999, 1e-8
    params, grads = params_and_grads()
    opt = fr.schedule_free_adamw(
        lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, decay_at="z"
    )
    state = opt.init(params)
    y, z, v = params["w"], params["w"].clone(), torch.zeros_like(params["w"])
    weight_sum = 0.0
    for t, g in enumerate(grads, start=1):
        params, state = opt.step(params, g, state)
        v = beta2 * v + (1 - beta2) * g["w"] ** 2
        d = g["w"] / ((v / (1 - beta2**t)).sqrt() + eps) + wd * z
        weight = lr**2
        weight_sum += weight
        c = weight / weight_sum
        y = (1 - c) * y + c * z + lr * (beta1 * (1 - c) - 1) * d
        z = z - lr * d
    torch.testing.assert_close(params["w"], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.z["w"], z, rtol=1e-12, atol=1e-12)
    at_y = fr.schedule_free_adamw(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    p, s = params_and_grads()[0], None
    s = at_y.init(p)
    for g in grads:
        p, s = at_y.step(p, g, s)
    assert not torch.allclose(p["w"], params["w"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decay_scaling='schedule' does not apply"):
        fr.schedule_free_adamw(decay_scaling="schedule")
    with pytest.raises(ValueError, match="decay_at"):
        fr.schedule_free_adamw(decay_at="x")
    with pytest.raises(ValueError, match="warmup_steps"):
        fr.schedule_free_adamw(warmup_steps=-1)
    with pytest.raises(TypeError, match="ScheduleFreeState"):
        fr.schedule_free_eval(
            fr.schedule_free_adamw(), {"w": torch.ones(1)}, fr.adam().init({"w": torch.ones(1)})
        )


def test_cautious_decay_toward_a_reference():
    """With beta1 = 0 (y = z), one step from w: d = g / denom + wd * kappa * (w - ref)."""
    lr, wd, eps = 0.1, 0.5, 1e-8
    params = {"w": torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64)}
    grads = {"w": torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)}
    reference = {"w": torch.ones(3, dtype=torch.float64)}
    opt = fr.schedule_free_adamw(
        lr=lr, betas=(0.0, 0.999), eps=eps, weight_decay=wd, decay_to=reference, cautious_decay=True
    )
    new, _ = opt.step(params, grads, opt.init(params))
    normalized = grads["w"] / (grads["w"].abs() + eps)
    offset = params["w"] - 1.0
    agree = torch.sign(normalized) * torch.sign(offset) >= 0
    d = normalized + wd * torch.where(agree, offset, torch.zeros_like(offset))
    torch.testing.assert_close(new["w"], params["w"] - lr * d, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("flat", [False, True])
def test_torch_optimizer_switches_like_the_reference_train_and_eval(flat):
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    reference_model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    reference_model.load_state_dict(model.state_dict())
    kwargs = {"lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 2}
    ours = fr.TorchOptimizer(model.parameters(), fr.schedule_free_adamw(**kwargs), flat=flat)
    reference = schedulefree.AdamWScheduleFree(
        reference_model.parameters(), foreach=False, **kwargs
    )
    reference.train()
    x = torch.randn(8, 3)
    for _ in range(5):
        for net, opt in ((model, ours), (reference_model, reference)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    fr.schedule_free_eval_(ours)
    fr.schedule_free_eval_(ours)  # idempotent, as the reference's eval()
    reference.eval()
    torch.testing.assert_close(model.state_dict(), reference_model.state_dict())
    model.zero_grad()
    model(x).square().mean().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="evaluation point x"):
        ours.step()
    assert_identical(model.state_dict(), before)
    fr.schedule_free_train_(ours)
    reference.train()
    torch.testing.assert_close(model.state_dict(), reference_model.state_dict())
    with pytest.raises(TypeError, match="TorchOptimizer over fr.schedule_free_adamw"):
        fr.schedule_free_eval_(fr.TorchOptimizer(model.parameters(), fr.adamw()))


def test_evaluating_with_beta1_zero_is_refused_with_the_reason():
    """beta1 = 0 has no evaluation point: a ValueError saying so (it was a
    ZeroDivisionError, computed before the check)."""
    opt = fr.schedule_free_adamw(lr=0.1, betas=(0.0, 0.999))
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    params, state = opt.step(params, {"w": torch.ones(3)}, state)
    with pytest.raises(ValueError, match="beta1 = 0 has no evaluation point"):
        fr.schedule_free_eval(opt, params, state)
