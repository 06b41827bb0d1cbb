"""TorchOptimizer(flat=True): one buffer per param group, same results and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

import functorch_reg as fr


def model_and_batches(device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.LayerNorm(3)
    ).to(device)
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.randn(8, 5, generator=generator).to(device),
            torch.randn(8, 3, generator=generator).to(device),
        )
        for _ in range(4)
    ]
    return model, batches


def groups(model: torch.nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": weights}, {"params": others, "weight_decay": 0.0, "lr": 5e-3}]


def train(model, optimizer, batches, steps: int) -> None:
    for t in range(steps):
        x, y = batches[t % len(batches)]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


FUNCTIONAL = {
    "adamw": lambda: fr.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd": lambda: fr.sgd(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
@pytest.mark.slow
def test_flat_equals_per_leaf_and_params_are_views(device, name):
    model, batches = model_and_batches(device)
    flat_model, _ = model_and_batches(device)
    optimizer = fr.TorchOptimizer(groups(model), FUNCTIONAL[name]())
    flat_optimizer = fr.TorchOptimizer(groups(flat_model), FUNCTIONAL[name](), flat=True)
    buffer = flat_optimizer._groups[0].params
    train(model, optimizer, batches, 100)
    train(flat_model, flat_optimizer, batches, 100)
    for p, q in zip(model.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    weight = flat_model[0].weight
    assert weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    grad_buffer = flat_optimizer._groups[0].grads
    assert weight.grad.untyped_storage().data_ptr() == grad_buffer.untyped_storage().data_ptr()
    flat_optimizer.zero_grad()
    assert weight.grad is not None and not weight.grad.any()


def test_state_dict_has_the_per_leaf_format_and_loads_either_way(device):
    functional = FUNCTIONAL["adamw"]
    model, batches = model_and_batches(device)
    optimizer = fr.TorchOptimizer(groups(model), functional())
    train(model, optimizer, batches, 5)
    flat_model, _ = model_and_batches(device)
    flat_model.load_state_dict(model.state_dict())
    flat_optimizer = fr.TorchOptimizer(groups(flat_model), functional(), flat=True)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    flat_optimizer.load_state_dict(torch.load(saved, weights_only=True))
    train(model, optimizer, batches, 5)
    train(flat_model, flat_optimizer, batches, 5)
    for p, q in zip(model.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    # and back: the flat optimizer's checkpoint has the same keys and shapes
    flat_state, state = flat_optimizer.state_dict(), optimizer.state_dict()
    assert flat_state["state"].keys() == state["state"].keys()
    for key, slots in state["state"].items():
        for field, value in slots.items():
            assert flat_state["state"][key][field].shape == value.shape
    other, _ = model_and_batches(device)
    other.load_state_dict(flat_model.state_dict())
    back = fr.TorchOptimizer(groups(other), functional())
    back.load_state_dict(flat_state)
    train(other, back, batches, 3)
    train(flat_model, flat_optimizer, batches, 3)
    for p, q in zip(other.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_repointed_params_and_gradients_are_copied_back_in():
    model, _batches = model_and_batches("cpu")
    optimizer = fr.TorchOptimizer(model.parameters(), fr.sgd(lr=0.1), flat=True)
    buffer = optimizer._groups[0].params
    new_weight = torch.full_like(model[0].weight, 0.5)
    model[0].weight.data = new_weight  # e.g. what load_state_dict(assign=True) does
    model[0].weight.grad = None  # e.g. zero_grad(set_to_none=True) from other code
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before = model[2].weight.detach().clone()
    optimizer.step()
    assert model[0].weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(model[0].weight, new_weight)  # a zero gradient for it
    torch.testing.assert_close(model[2].weight, before - 0.1)


def test_flat_refuses_masks_and_mixed_groups():
    model, _ = model_and_batches("cpu")
    with pytest.raises(ValueError, match="decayed whole"):
        fr.TorchOptimizer(model.parameters(), fr.adamw(mask=fr.select.weights()), flat=True)
    mixed = [
        torch.nn.Parameter(torch.ones(2)),
        torch.nn.Parameter(torch.ones(2, dtype=torch.float64)),
    ]
    with pytest.raises(ValueError, match="mixes torch.float32"):
        fr.TorchOptimizer(mixed, fr.sgd(lr=0.1), flat=True)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_flat_optimizer_is_one_graph_per_run(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, batches = model_and_batches(device)
    eager_model, _ = model_and_batches(device)
    counter = CompileCounterWithBackend("inductor")
    optimizer = fr.TorchOptimizer(
        groups(model),
        fr.adamw(lr=1e-2),
        flat=True,
        compile=True,
        compile_options={"backend": counter},
    )
    eager = fr.TorchOptimizer(groups(eager_model), fr.adamw(lr=1e-2), flat=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    eager_scheduler = torch.optim.lr_scheduler.StepLR(eager, step_size=1, gamma=0.9)
    for t in range(6):
        x, y = batches[t % len(batches)]
        for m, o, s in ((model, optimizer, scheduler), (eager_model, eager, eager_scheduler)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()
    assert counter.frame_count == 1
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
