"""Step-for-step parity with torch.optim over 200 steps, eager and compiled."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import functorch_reg as fr

from ..conftest import mlp_params

STEPS = 200
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}

# name: (ours, torch's for-loop implementation)
CONFIGS: dict[str, tuple[Callable[[], fr.Optimizer], Callable[[list], torch.optim.Optimizer]]] = {
    "sgd": (
        lambda: fr.sgd(lr=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, foreach=False),
    ),
    "sgd_momentum": (
        lambda: fr.sgd(lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    ),
    "sgd_dampening_decay": (
        lambda: fr.sgd(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05),
        lambda p: torch.optim.SGD(
            p, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05, foreach=False
        ),
    ),
    "sgd_nesterov_decay": (
        lambda: fr.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05),
        lambda p: torch.optim.SGD(
            p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, foreach=False
        ),
    ),
    "sgd_maximize": (
        lambda: fr.sgd(lr=0.05, momentum=0.5, maximize=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, maximize=True, foreach=False),
    ),
    "adam": (
        lambda: fr.adam(lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    ),
    "adam_coupled_decay": (
        lambda: fr.adam(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
        lambda p: torch.optim.Adam(
            p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, foreach=False
        ),
    ),
    "adam_amsgrad_maximize": (
        lambda: fr.adam(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.01),
        lambda p: torch.optim.Adam(
            p, lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.01, foreach=False
        ),
    ),
    "adam_decoupled": (
        lambda: fr.adam(lr=1e-2, weight_decay=0.1, decoupled=True),
        lambda p: torch.optim.Adam(
            p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=False
        ),
    ),
    "adamw": (
        lambda: fr.adamw(lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    ),
    "adamw_amsgrad": (
        lambda: fr.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False),
    ),
}


def max_relative_error(ours: dict, reference: list[torch.Tensor]) -> float:
    return max(
        ((mine - ref).abs().max() / ref.abs().max()).item()
        for mine, ref in zip(ours.values(), reference, strict=True)
    )


def run_both(name: str, dtype: torch.dtype, device: str, in_place: bool, compiled: bool):
    make_ours, make_torch = CONFIGS[name]
    params = mlp_params(dtype, device)
    torch_params = [leaf.clone().requires_grad_() for leaf in params.values()]
    torch_opt = make_torch(torch_params)
    opt = make_ours()
    state = opt.init(params)
    step = opt.step_ if in_place else opt.step
    if compiled:
        step = torch.compile(step, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grads = {
            k: torch.randn(v.shape, generator=generator, dtype=dtype).to(device)
            for k, v in params.items()
        }
        if in_place:
            step(params, grads, state)
        else:
            params, state = step(params, grads, state)
        for leaf, g in zip(torch_params, grads.values(), strict=True):
            leaf.grad = g.clone()
        torch_opt.step()
    return params, [leaf.detach() for leaf in torch_params]


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_matches_torch_optim(name, dtype, in_place, device):
    ours, reference = run_both(name, dtype, device, in_place, compiled=False)
    assert max_relative_error(ours, reference) <= TOLERANCE[dtype]


@pytest.mark.compile
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.slow
def test_compiled_matches_torch_optim(name, device):
    # Alternate the pure and in-place forms to cover both without doubling compile time.
    in_place = list(CONFIGS).index(name) % 2 == 1
    ours, reference = run_both(name, torch.float32, device, in_place, compiled=True)
    assert max_relative_error(ours, reference) <= TOLERANCE[torch.float32]
