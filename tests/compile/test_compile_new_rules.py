"""fr.muon, fr.lion and fr.schedule_free_adamw compile once (fullgraph) over a run whose
lr and weight decay change every step, and equal eager. One tiny compile per rule."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import functorch_reg as fr

pytestmark = pytest.mark.compile

RULES = {
    "muon": lambda: fr.muon(
        lr=2e-2, adam=fr.adamw(lr=1e-2, weight_decay=0.05), ns_dtype=torch.float32, ns_steps=2
    ),
    "lion": lambda: fr.lion(lr=1e-3, weight_decay=0.5),
    "schedule_free_adamw": lambda: fr.schedule_free_adamw(lr=1e-2, warmup_steps=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RULES))
def test_one_compile_for_a_changing_lr_and_decay_equals_eager(name):
    opt = RULES[name]()
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=generator), "b": torch.randn(3, generator=generator)}
    eager_params, state, eager_state = params, opt.init(params), opt.init(params)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(opt.step, fullgraph=True, backend=counter)
    for i in range(12):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        lr = torch.tensor(1e-2 / (1 + i))
        decay = torch.tensor(0.01 * (1 + i % 4))
        params, state = compiled(params, grads, state, lr=lr, weight_decay=decay)
        eager_params, eager_state = opt.step(
            eager_params, grads, eager_state, lr=lr, weight_decay=decay
        )
    assert counter.frame_count == 1
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_optimizer_compiles_muon_with_its_adamw_part_and_equals_eager():
    """adam_betas, a pair, reaches the compiled graph as two tensors, as betas does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    eager_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    eager_model.load_state_dict(model.state_dict())

    def make():
        return fr.muon(lr=2e-2, adam=fr.adamw(lr=1e-2), ns_dtype=torch.float32, ns_steps=1)

    compiled = fr.TorchOptimizer(model.parameters(), make(), compile=True)
    eager = fr.TorchOptimizer(eager_model.parameters(), make())
    x = torch.randn(8, 3)
    for i in range(3):
        for net, opt in ((model, compiled), (eager_model, eager)):
            opt.param_groups[0]["adam_betas"] = (0.9, 0.99 + 0.001 * i)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(model.state_dict(), eager_model.state_dict(), rtol=1e-5, atol=1e-6)
