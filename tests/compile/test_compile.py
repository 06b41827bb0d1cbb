"""torch.compile(fullgraph=True): compiled equals eager, and changing lr or lambda
(as tensors) never recompiles. Compiles are few on purpose: each costs seconds on CPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, vmap

import functorch_reg as fr

from ..conftest import mlp_params

pytestmark = pytest.mark.compile


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


@pytest.mark.slow
def test_penalized_loss_and_its_grad_compile_once_for_many_lambdas(device):
    model = small_model().to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(32, 4, device=device), torch.randn(32, 3, device=device)

    def objective(params, lam):
        loss = torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)
        return (
            loss
            + lam * fr.penalties.group_lasso(params, where=fr.select.weights())
            + lam * fr.penalties.l1(params, where="*.bias")
        )

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(grad(objective), fullgraph=True, backend=counter)
    for lam in torch.tensor([0.0, 1e-3, 0.1, 2.0], device=device):
        torch.testing.assert_close(compiled(params, lam), grad(objective)(params, lam))
    assert counter.frame_count == 1


@pytest.mark.slow
def test_scheduled_lr_and_changing_lambda_compile_once_and_match_eager(device):
    """100 steps, lr from a cosine schedule and the prox strength changing every step."""
    opt = fr.adamw(lr=1e-2, weight_decay=1e-2, mask="*.weight", prox=fr.prox.l1, prox_strength=0.0)
    schedule = fr.schedules.cosine(1e-2, total_steps=100, warmup_steps=10)
    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=counter)
    params = eager_params = mlp_params(device=device)
    state = eager_state = opt.init(params)
    generator = torch.Generator().manual_seed(0)
    step = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(100):
        grads = {k: torch.randn(v.shape, generator=generator).to(device) for k, v in params.items()}
        lr = schedule(step)
        lam = torch.tensor(0.5 * (1 + i % 7), device=device)
        params, state = compiled_step(params, grads, state, lr=lr, prox_strength=lam)
        eager_params, eager_state = opt.step(
            eager_params, grads, eager_state, lr=lr, prox_strength=lam
        )
        step += 1
    assert counter.frame_count == 1
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)
    assert (params["0.weight"] == 0).any(), "the proximal step gives exact zeros"


@pytest.mark.slow
def test_compiled_vmap_over_lambdas_equals_a_loop(device):
    opt = fr.sgd(lr=0.05, momentum=0.9, prox=fr.prox.l1, mask=fr.select.weights())
    members = [mlp_params(device=device, seed=i) for i in range(5)]
    grads = [{k: torch.randn_like(v) for k, v in m.items()} for m in members]
    states = [opt.init(m) for m in members]
    lams = torch.tensor([0.0, 0.1, 0.5, 1.0, 5.0], device=device)

    def one(params, grads, state, lam):
        return opt.step(params, grads, state, prox_strength=lam)

    counter = CompileCounterWithBackend("inductor")
    sweep = torch.compile(vmap(one), fullgraph=True, backend=counter)
    stacked = sweep(fr.stack(members), fr.stack(grads), fr.stack(states), lams)
    stacked = sweep(*stacked[:1], fr.stack(grads), stacked[1], lams * 2)
    for i, member in enumerate(fr.unstack(stacked)):
        expected = one(members[i], grads[i], states[i], lams[i])
        expected = one(expected[0], grads[i], expected[1], lams[i] * 2)
        torch.testing.assert_close(member, expected, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
