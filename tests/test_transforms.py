"""Transforms: clip_by_global_norm against clip_grad_norm_, ema against swa_utils'
AveragedModel, gradient accumulation against the full batch; compile, vmap, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, vmap
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import functorch_reg as fr

from .conftest import mlp_params


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def scaled_grads(params, generator, scale):
    return {
        k: scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in params.items()
    }


@pytest.mark.parametrize(("norm_type", "max_norm"), [(2.0, 1.5), (1.0, 8.0), (math.inf, 0.6)])
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_matches_clip_grad_norm_over_100_steps(norm_type, max_norm, foreach):
    """Gradients sometimes above and sometimes below the threshold, for 100 steps."""
    params = mlp_params()
    tensors = [v.clone().requires_grad_() for v in params.values()]
    generator = torch.Generator().manual_seed(0)
    clipped_steps = 0
    for step in range(100):
        grads = scaled_grads(params, generator, scale=0.1 + 0.05 * (step % 7))
        for tensor, g in zip(tensors, grads.values(), strict=True):
            tensor.grad = g.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(
            tensors, max_norm, norm_type=norm_type, foreach=foreach
        )
        clipped, norm = fr.clip_by_global_norm(grads, max_norm, norm_type=norm_type)
        torch.testing.assert_close(norm, expected_norm)
        torch.testing.assert_close(clipped, {k: t.grad for k, t in zip(grads, tensors)})
        clipped_steps += bool(norm > max_norm)
    assert 10 < clipped_steps < 90, "both regimes are exercised"


def test_clip_keeps_none_leaves_and_handles_no_gradients():
    grads = {"a": torch.tensor([3.0, 4.0]), "frozen": None, "b": [torch.tensor([12.0])]}
    clipped, norm = fr.clip_by_global_norm(grads, 6.5)
    assert norm.item() == pytest.approx(13.0)
    assert clipped["frozen"] is None
    torch.testing.assert_close(clipped["b"][0], torch.tensor([12.0]) * 6.5 / (13 + 1e-6))
    nothing, zero = fr.clip_by_global_norm({"a": None}, 1.0)
    assert nothing == {"a": None} and zero.item() == 0.0


def test_clip_grad_norm_option_matches_torch_sgd_with_clip_grad_norm_():
    """fr.sgd(clip_grad_norm=...) equals clip_grad_norm_ then torch.optim.SGD.step."""
    params = mlp_params(torch.float64)
    tensors = [v.clone().requires_grad_() for v in params.values()]
    torch_opt = torch.optim.SGD(tensors, lr=0.1, momentum=0.9, foreach=False)
    opt = fr.sgd(lr=0.1, momentum=0.9, clip_grad_norm=0.5)
    state = opt.init(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        grads = scaled_grads(params, generator, scale=0.3)
        params, state = opt.step(params, grads, state)
        for tensor, g in zip(tensors, grads.values(), strict=True):
            tensor.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(tensors, 0.5)
        torch_opt.step()
    torch.testing.assert_close(params, {k: t.detach() for k, t in zip(params, tensors)})


def test_clip_grad_norm_is_a_per_call_hyperparameter():
    params = {"w": torch.zeros(2)}
    opt = fr.sgd(lr=1.0, clip_grad_norm=1.0)
    assert opt.hyperparams["clip_grad_norm"] == 1.0
    grads = {"w": torch.tensor([3.0, 4.0])}
    new, _ = opt.step(params, grads, opt.init(params))
    torch.testing.assert_close(new["w"], -torch.tensor([3.0, 4.0]) / (5 + 1e-6))
    new, _ = opt.step(params, grads, opt.init(params), clip_grad_norm=torch.tensor(10.0))
    torch.testing.assert_close(new["w"], -torch.tensor([3.0, 4.0]))


def test_ema_matches_averaged_model_over_100_steps():
    model = small_model()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    average = fr.ema(0.9)
    state = average.init(params)
    in_place = average.init(params)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        averaged.update_parameters(model)
        state = average.update(params, state)
        average.update_(params, in_place)
        expected = {k: v.detach() for k, v in averaged.module.named_parameters()}
        torch.testing.assert_close(state.params, expected, rtol=0, atol=0)
    assert state.n_averaged.item() == averaged.n_averaged.item() == 100
    torch.testing.assert_close(in_place, state, rtol=0, atol=0)


def test_ema_warmup_follows_its_formula():
    decay = 0.99
    average = fr.ema(decay, warmup=True)
    weights = [torch.tensor([float(i) ** 2]) for i in range(20)]
    state = average.init({"w": weights[0]})
    expected = weights[0]
    for t, w in enumerate(weights):
        state = average.update({"w": w}, state)
        beta = min(decay, (1 + t) / (10 + t))
        expected = w if t == 0 else beta * expected + (1 - beta) * w
        torch.testing.assert_close(state.params["w"], expected)
    plain = fr.ema(decay).init({"w": weights[0]})
    for w in weights:
        plain = fr.ema(decay).update({"w": w}, plain)
    assert (state.params["w"] - plain.params["w"]).abs().item() > 1, "the warm-up matters"


def test_ema_leaves_non_floating_leaves_alone_and_keeps_none():
    params = {"w": torch.ones(2), "steps": torch.tensor([3]), "frozen": None}
    average = fr.ema(0.5)
    state = average.init(params)
    state = average.update({"w": torch.zeros(2), "steps": torch.tensor([9]), "frozen": None}, state)
    assert state.params["steps"].item() == 3 and state.params["frozen"] is None


def test_accumulated_micro_batches_equal_the_full_batch_gradient():
    model = small_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(32, 4, dtype=torch.float32), torch.randn(32, 3)

    def loss(params, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    k = 4
    total = None
    for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
        total = fr.accumulate(total, grad(loss)(params, xb, yb), scale=1 / k)
    full = grad(loss)(params, x, y)
    torch.testing.assert_close(total, full)
    buffer = {name: torch.zeros_like(v) for name, v in params.items()}
    for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
        fr.accumulate_(buffer, grad(loss)(params, xb, yb), scale=1 / k)
    torch.testing.assert_close(buffer, full)


def test_accumulate_handles_none_leaves():
    total = fr.accumulate(None, {"a": torch.ones(1), "b": None})
    total = fr.accumulate(total, {"a": None, "b": torch.ones(1)}, scale=2.0)
    assert total["a"].item() == 1.0 and total["b"].item() == 2.0


def test_vmap_equals_a_loop():
    """clip over each member's gradients with its own max_norm; ema with its own decay."""
    members = [mlp_params(seed=i) for i in range(3)]
    grads = [scaled_grads(m, torch.Generator().manual_seed(i), 1.0) for i, m in enumerate(members)]
    max_norms = torch.tensor([0.5, 2.0, 100.0])
    decays = torch.tensor([0.0, 0.5, 1.0])
    average = fr.ema(0.9)
    states = [average.update(m, average.init(m)) for m in members]

    def one(params, grads, state, max_norm, decay):
        clipped, norm = fr.clip_by_global_norm(grads, max_norm)
        return clipped, norm, average.update(params, state, decay=decay)

    batched = vmap(one)(fr.stack(members), fr.stack(grads), fr.stack(states), max_norms, decays)
    for i, unbatched in enumerate(fr.unstack(batched)):
        torch.testing.assert_close(
            unbatched, one(members[i], grads[i], states[i], max_norms[i], decays[i])
        )


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_clip_and_ema_compile_once_for_changing_tensors():
    average = fr.ema(0.9, warmup=True)

    def one(params, grads, state, max_norm, decay):
        clipped, norm = fr.clip_by_global_norm(grads, max_norm)
        return clipped, norm, average.update(params, state, decay=decay)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(one, fullgraph=True, backend=counter)
    params = mlp_params()
    state = eager_state = average.init(params)
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        grads = scaled_grads(params, generator, 1.0)
        max_norm, decay = torch.tensor(0.5 + i), torch.tensor(0.9 - 0.1 * i)
        clipped, norm, state = compiled(params, grads, state, max_norm, decay)
        eager = one(params, grads, eager_state, max_norm, decay)
        eager_state = eager[2]
        torch.testing.assert_close((clipped, norm, state), eager)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda g: fr.clip_by_global_norm(g, -1.0), ValueError, "max_norm=-1.0"),
        (lambda g: fr.clip_by_global_norm(g, float("nan")), ValueError, "max_norm=nan"),
        (lambda g: fr.clip_by_global_norm(g, torch.tensor(-2.0)), ValueError, "max_norm=-2.0"),
        (lambda g: fr.clip_by_global_norm(g, 1.0, norm_type=0.0), ValueError, "norm_type=0.0"),
        (lambda g: fr.clip_by_global_norm(g, 1.0, norm_type="2"), TypeError, "norm_type"),
        (lambda g: fr.ema(1.5), ValueError, "decay=1.5"),
        (lambda g: fr.ema(-0.1), ValueError, "decay=-0.1"),
        (lambda g: fr.sgd(lr=0.1, clip_grad_norm=-1.0), ValueError, "clip_grad_norm=-1.0"),
        (lambda g: fr.accumulate(None, g, scale=float("inf")), ValueError, "scale=inf"),
    ],
)
def test_bad_arguments_raise(call, error, message):
    with pytest.raises(error, match=message):
        call(mlp_params())


def test_bad_ema_updates_raise_before_anything_changes():
    average = fr.ema(0.9)
    params = mlp_params()
    state = average.update(params, average.init(params))
    before = fr.unstack(fr.stack([state]))[0]
    other = mlp_params(seed=1)
    with pytest.raises(ValueError, match="decay=2.0"):
        average.update_(other, state, decay=2.0)
    with pytest.raises(ValueError, match=r"decay=-0.5"):
        average.update_(other, state, decay=torch.tensor(-0.5))
    with pytest.raises(TypeError, match="unknown hyperparameter 'beta'"):
        average.update_(other, state, beta=0.5)
    missing = {k: v for k, v in other.items() if k != "2.bias"}
    with pytest.raises(ValueError, match="'2.bias'"):
        average.update_(missing, state)
    wrong_dtype = {**other, "0.weight": other["0.weight"].double()}
    with pytest.raises(ValueError, match="'0.weight' is torch.float32"):
        average.update_(wrong_dtype, state)
    torch.testing.assert_close(state, before, rtol=0, atol=0)


def test_bad_clip_override_raises_before_anything_changes():
    opt = fr.adamw(lr=1e-2, clip_grad_norm=1.0)
    params = mlp_params()
    state = opt.init(params)
    before = fr.unstack(fr.stack([params]))[0]
    grads = scaled_grads(params, torch.Generator().manual_seed(0), 1.0)
    with pytest.raises(ValueError, match="clip_grad_norm=nan"):
        opt.step_(params, grads, state, clip_grad_norm=float("nan"))
    torch.testing.assert_close(params, before, rtol=0, atol=0)


def test_accumulate_in_place_checks_every_leaf_first():
    total = {"a": torch.zeros(2), "b": None}
    with pytest.raises(ValueError, match="no tensor at 'b'"):
        fr.accumulate_(total, {"a": torch.ones(2), "b": torch.ones(2)})
    assert (total["a"] == 0).all()
    with pytest.raises(ValueError, match="'a' is torch.float32, grads torch.float64"):
        fr.accumulate_({"a": torch.zeros(2)}, {"a": torch.ones(2, dtype=torch.float64)})
