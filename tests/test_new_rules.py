"""What every update rule owes, checked on fr.muon, fr.lion, fr.schedule_free_adamw and
fr.schedule_free_sgd:
vmap over decay values equals separate runs, TorchOptimizer with param groups equals
the functional rule, checkpoints round-trip bit-exactly, and the library's options
(mask, skip_nonfinite, clip_grad_norm, train_step, sweep) apply."""

from __future__ import annotations

import io

import pytest
import torch
from torch.func import vmap

import functorch_reg as fr

RULES = {
    # float32 Newton-Schulz: batched and single bfloat16 matmuls round differently.
    "muon": lambda **kw: fr.muon(
        lr=2e-2,
        weight_decay=0.1,
        adam=fr.adamw(lr=1e-2, weight_decay=0.05),
        ns_dtype=torch.float32,
        **kw,
    ),
    "lion": lambda **kw: fr.lion(lr=1e-3, weight_decay=0.5, **kw),
    "schedule_free_adamw": lambda **kw: fr.schedule_free_adamw(
        lr=1e-2, weight_decay=0.05, warmup_steps=3, **kw
    ),
    "schedule_free_sgd": lambda **kw: fr.schedule_free_sgd(
        lr=1e-2, weight_decay=0.05, warmup_steps=3, **kw
    ),
}


def params_of(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (5, 4), "0.bias": (5,), "1.weight": (2, 5), "1.bias": (2,)}
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}


def grads_of(params, t):
    generator = torch.Generator().manual_seed(100 + t)
    return {k: torch.randn(v.shape, generator=generator) + 0.2 * v for k, v in params.items()}


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(RULES))
def test_vmap_over_four_decay_values_equals_four_runs(name):
    opt = RULES[name]()
    decays = torch.tensor([0.0, 0.01, 0.1, 1.0])
    members = [params_of(seed) for seed in range(4)]
    separate = []
    for member, decay in zip(members, decays, strict=True):
        params, state = member, opt.init(member)
        for t in range(5):
            params, state = opt.step(params, grads_of(params, t), state, weight_decay=decay)
        separate.append(params)

    def member_step(params, grads, state, decay):
        return opt.step(params, grads, state, weight_decay=decay)

    params = fr.stack(members)
    state = fr.stack([opt.init(m) for m in members])
    for t in range(5):
        grads = fr.stack([grads_of(p, t) for p in fr.unstack(params)])
        params, state = vmap(member_step)(params, grads, state, decays)
    torch.testing.assert_close(params, fr.stack(separate), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(RULES))
def test_torch_optimizer_with_two_param_groups_equals_the_functional_rule(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = RULES[name]()
    adapter = fr.TorchOptimizer(
        [
            {"params": [model[0].weight, model[0].bias]},
            {"params": [model[2].weight, model[2].bias], "lr": 5e-3, "weight_decay": 0.0},
        ],
        opt,
    )
    groups = [
        ({"0.weight": start["0.weight"], "0.bias": start["0.bias"]}, {}),
        (
            {"2.weight": start["2.weight"], "2.bias": start["2.bias"]},
            {"lr": 5e-3, "weight_decay": 0.0},
        ),
    ]
    states = [opt.init(list(tree.values())) for tree, _ in groups]
    trees = [list(tree.values()) for tree, _ in groups]
    x = torch.randn(16, 4)
    for _ in range(4):
        adapter.zero_grad()
        model(x).square().mean().backward()
        grads = [[p.grad.clone() for p in group["params"]] for group in adapter.param_groups]
        adapter.step()
        for i, (_, overrides) in enumerate(groups):
            trees[i], states[i] = opt.step(trees[i], grads[i], states[i], **overrides)
        # The functional run uses the adapter's gradients, so it follows its trajectory.
        for group, tree in zip(adapter.param_groups, trees, strict=True):
            torch.testing.assert_close(list(group["params"]), tree, rtol=1e-6, atol=1e-7)
            for p, mine in zip(group["params"], tree, strict=True):
                p.data.copy_(mine)


@pytest.mark.parametrize("name", list(RULES))
def test_checkpoints_round_trip_and_resume_bit_identically(name):
    opt = RULES[name]()
    params = params_of()
    state = opt.init(params)
    for t in range(3):
        params, state = opt.step(params, grads_of(params, t), state)
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": fr.state_dict(state)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = fr.load_state_dict(opt, saved["params"], saved["optimizer"])
    assert_identical(resumed, state)
    a, b = (params, state), (saved["params"], resumed)
    for t in range(3, 6):
        a = opt.step(a[0], grads_of(a[0], t), a[1])
        b = opt.step(b[0], grads_of(b[0], t), b[1])
    assert_identical(a, b)


@pytest.mark.parametrize("name", list(RULES))
def test_torch_optimizer_state_dict_round_trips_bit_identically(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    adapter = fr.TorchOptimizer(model.parameters(), RULES[name]())
    x = torch.randn(8, 4)

    def train(optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    train(adapter, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": adapter.state_dict()}, buffer)
    train(adapter, 2)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model.load_state_dict(saved["model"])
    resumed = fr.TorchOptimizer(model.parameters(), RULES[name]())
    resumed.load_state_dict(saved["optimizer"])
    train(resumed, 2)
    assert_identical(model.state_dict(), after)


@pytest.mark.parametrize("name", list(RULES))
def test_skip_nonfinite_leaves_everything_untouched(name):
    opt = RULES[name](skip_nonfinite=True)
    params = params_of()
    state = opt.init(params)
    params, state = opt.step(params, grads_of(params, 0), state)
    grads = grads_of(params, 1)
    grads["1.bias"][0] = float("nan")
    new_params, new_state = opt.step(params, grads, state)
    assert_identical(new_params, params)
    assert_identical(new_state._replace(skipped=state.skipped), state)
    assert new_state.skipped.item() == 1


@pytest.mark.parametrize("name", list(RULES))
def test_clip_grad_norm_equals_stepping_on_clipped_gradients(name):
    clipped_opt, opt = RULES[name](clip_grad_norm=0.5), RULES[name]()
    params = params_of()
    grads = grads_of(params, 0)
    got, _ = clipped_opt.step(params, grads, clipped_opt.init(params))
    expected, _ = opt.step(params, fr.clip_by_global_norm(grads, 0.5)[0], opt.init(params))
    assert_identical(got, expected)


@pytest.mark.parametrize("name", list(RULES))
def test_mask_keeps_decay_off_the_leaves_it_leaves_out(name):
    """With and without decay, a leaf outside ``mask`` follows the same trajectory."""
    masked = RULES[name](mask="0.weight")
    params = params_of()
    no_decay, _ = masked.step(params, grads_of(params, 0), masked.init(params), weight_decay=0.0)
    decayed, _ = masked.step(params, grads_of(params, 0), masked.init(params), weight_decay=0.5)
    assert_identical(decayed["1.weight"], no_decay["1.weight"])
    assert not torch.equal(decayed["0.weight"], no_decay["0.weight"])


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.slow
def test_train_step_and_a_weight_decay_sweep_run_the_rule(name):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator)
    y = x @ torch.randn(4, 2, generator=generator)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = RULES[name]()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y)

    state = opt.init(params)
    expected, expected_state = dict(params), opt.init(params)
    step = fr.train_step(loss, opt, compile=False)
    for _ in range(3):
        grads = torch.func.grad(loss)(expected, x, y)
        expected, expected_state = opt.step(expected, grads, expected_state)
        step(params, state, x, y)
    torch.testing.assert_close(params, expected, rtol=1e-6, atol=1e-7)

    result = fr.sweep(
        model,
        torch.nn.functional.mse_loss,
        opt,
        [0.0, 5.0],
        train=(x[:30], y[:30]),
        val=(x[30:], y[30:]),
        hyperparameter="weight_decay",
        steps=30,
        compile=False,
        progress=False,
    )
    assert result.param_norm[1] < result.param_norm[0]
