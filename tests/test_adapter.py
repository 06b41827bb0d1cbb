"""TorchOptimizer: the functional update rules behind torch.optim.Optimizer, checked
against the functional API and torch.optim with groups, schedulers and checkpoints."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.optim import lr_scheduler

import functorch_reg as fr
from functorch_reg.adapter import TorchOptimizer

STEPS = 120
TOLERANCE = 1e-6  # fp32, relative to the largest entry, as in tests/parity

# name: (ours, torch's for-loop implementation)
CONFIGS: dict[str, tuple[Callable[[], fr.Optimizer], Callable[[list], torch.optim.Optimizer]]] = {
    "adamw": (
        lambda: fr.adamw(lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    ),
    "adamw_amsgrad": (
        lambda: fr.adamw(lr=1e-2, betas=(0.8, 0.99), amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.99), amsgrad=True, foreach=False),
    ),
    "adam_coupled_decay": (
        lambda: fr.adam(lr=1e-2, eps=1e-6, weight_decay=0.05),
        lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-6, weight_decay=0.05, foreach=False),
    ),
    "sgd_nesterov_decay": (
        lambda: fr.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.SGD(
            p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False
        ),
    ),
    "sgd_dampening": (
        lambda: fr.sgd(lr=0.05, momentum=0.9, dampening=0.3),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3, foreach=False),
    ),
}


def small_model(device: str = "cpu") -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(
        device
    )


def random_grads(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(p.shape, generator=generator).to(p.device)
        for name, p in model.named_parameters()
    }


def weights_and_biases(model: torch.nn.Module) -> list[dict]:
    """The usual groups: decayed weights, and biases with a larger lr and no decay."""
    named = list(model.named_parameters())
    return [
        {"params": [p for name, p in named if name.endswith("weight")]},
        {
            "params": [p for name, p in named if name.endswith("bias")],
            "lr": 3e-2,
            "weight_decay": 0,
        },
    ]


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    scheduler: lr_scheduler.LRScheduler | None = None,
    seed: int = 1,
    frozen_steps: int = 10,
) -> None:
    """Random gradients; ``0.bias`` stays frozen (``None``) for the first ``frozen_steps``."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = random_grads(model, generator)
        for name, p in model.named_parameters():
            p.grad = None if name == "0.bias" and step < frozen_steps else grads[name]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def max_relative_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    return max(
        ((mine - ref).abs().max() / ref.abs().max()).item()
        for mine, ref in zip(model.parameters(), reference.parameters(), strict=True)
    )


def clone_state(state: dict) -> dict:
    return {index: {key: t.clone() for key, t in slots.items()} for index, slots in state.items()}


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_eager_step_equals_the_functional_step_bit_for_bit():
    """Named params: the mask glob sees the module's names; a leaf frozen for 10 steps."""
    opt = fr.adamw(
        lr=1e-2, weight_decay=0.1, amsgrad=True, mask="*.weight", prox=fr.prox.l1, prox_strength=1.0
    )
    model = small_model()
    optimizer = TorchOptimizer(model.named_parameters(), opt)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = opt.init(params)
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        grads = random_grads(model, generator)
        if step < 10:
            grads["0.bias"] = None
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        opt.step_(params, grads, state)
    assert_identical(dict(model.named_parameters()), params)
    assert (params["0.weight"] == 0).any(), "the prox gives exact zeros"
    saved = fr.state_dict(state)
    for name, p in model.named_parameters():
        for field in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "beta_powers"):
            assert_identical(optimizer.state[p][field], saved[field][name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_optim(name, device):
    make_ours, make_torch = CONFIGS[name]
    model, reference = small_model(device), small_model(device)
    train(model, TorchOptimizer(model.parameters(), make_ours()), STEPS)
    train(reference, make_torch(reference.parameters()), STEPS)
    assert max_relative_error(model, reference) <= TOLERANCE


def test_param_groups_and_a_scheduler_match_torch():
    """Per-group lr and decay, a group added later, and OneCycleLR setting each group's lr."""
    model, reference = small_model(), small_model()
    for net, make in [
        (model, lambda groups: TorchOptimizer(groups, fr.adamw(lr=1e-2, weight_decay=0.1))),
        (reference, lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)),
    ]:
        weights, biases = weights_and_biases(net)
        optimizer = make([weights])
        optimizer.add_param_group(biases)
        scheduler = lr_scheduler.OneCycleLR(
            optimizer, max_lr=[1e-2, 3e-2], total_steps=STEPS, cycle_momentum=False
        )
        train(net, optimizer, STEPS, scheduler)
    assert max_relative_error(model, reference) <= TOLERANCE
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0]


def test_a_scheduler_cycling_betas_drives_the_functional_step():
    """OneCycleLR cycles beta1 too. The bias correction then uses the running product of
    the betas (see fr.adam), not torch.optim's beta1**t, so the reference is the
    functional step given each step's lr and betas."""
    opt = fr.adamw(lr=1e-2, weight_decay=0.1)
    model = small_model()
    optimizer = TorchOptimizer(model.parameters(), opt)
    scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=STEPS)
    params = [p.detach().clone() for p in model.parameters()]
    state = opt.init(params)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(STEPS):
        grads = list(random_grads(model, generator).values())
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        group = optimizer.param_groups[0]
        opt.step_(params, grads, state, lr=group["lr"], betas=group["betas"])
        seen.add(group["betas"])
        optimizer.step()
        scheduler.step()
    assert len(seen) > STEPS // 2
    assert_identical(list(model.parameters()), params)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_with_schedulers_matches_torch_and_compiles_once(device):
    """Warmup then cosine decay to exactly zero, two groups: one graph for the run."""

    def schedule(optimizer):
        return lr_scheduler.SequentialLR(
            optimizer,
            [
                lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10),
                lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS - 10),
            ],
            milestones=[10],
        )

    counter = CompileCounterWithBackend("inductor")
    model, reference = small_model(device), small_model(device)
    optimizer = TorchOptimizer(
        weights_and_biases(model),
        fr.adamw(lr=1e-2, weight_decay=0.1),
        compile=True,
        compile_options={"backend": counter},
    )
    torch_optimizer = torch.optim.AdamW(
        weights_and_biases(reference), lr=1e-2, weight_decay=0.1, foreach=False
    )
    # A frozen leaf would add a graph for the steps without its gradient.
    train(model, optimizer, STEPS, schedule(optimizer), frozen_steps=0)
    train(reference, torch_optimizer, STEPS, schedule(torch_optimizer), frozen_steps=0)
    assert counter.frame_count == 1
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert max_relative_error(model, reference) <= TOLERANCE


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_resume_is_bit_identical_and_matches_torch():
    """SGD with StepLR: a run checkpointed halfway and resumed in a new model,
    optimizer and scheduler equals the uninterrupted run."""

    def make(model):
        optimizer = TorchOptimizer(
            model.parameters(),
            fr.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
            compile=True,
            compile_options={"backend": counter},
        )
        return optimizer, lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)

    counter = CompileCounterWithBackend("inductor")
    half = STEPS // 2
    model = small_model()
    optimizer, scheduler = make(model)
    train(model, optimizer, half, scheduler, frozen_steps=0)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    train(model, optimizer, half, scheduler, seed=2)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = small_model()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer, resumed_scheduler = make(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    train(resumed, resumed_optimizer, half, resumed_scheduler, seed=2)

    assert_identical(dict(resumed.named_parameters()), dict(model.named_parameters()))
    assert counter.frame_count == 2, "one graph per optimizer"

    reference = small_model()
    torch_optimizer = torch.optim.SGD(
        reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    )
    torch_scheduler = lr_scheduler.StepLR(torch_optimizer, step_size=20, gamma=0.5)
    train(reference, torch_optimizer, half, torch_scheduler, frozen_steps=0)
    train(reference, torch_optimizer, half, torch_scheduler, seed=2)
    assert max_relative_error(model, reference) <= TOLERANCE


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.adamw(lr=1e-2, amsgrad=True, skip_nonfinite=True),
        lambda: fr.sgd(lr=0.05, momentum=0.9),
    ],
    ids=["adamw_amsgrad", "sgd_momentum"],
)
def test_state_dict_round_trip_and_bit_identical_resume(make):
    model = small_model()
    optimizer = TorchOptimizer(weights_and_biases(model), make())
    train(model, optimizer, 15)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    saved = clone_state(checkpoint["optimizer"]["state"])

    resumed = small_model()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = TorchOptimizer(weights_and_biases(resumed), make())
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, 15, seed=2)
    train(resumed, resumed_optimizer, 15, seed=2)

    assert_identical(dict(resumed.named_parameters()), dict(model.named_parameters()))
    assert_identical(resumed_optimizer.state_dict(), optimizer.state_dict())
    # Training the resumed optimizer leaves the checkpoint alone.
    assert_identical(checkpoint["optimizer"]["state"], saved)
    if "beta_powers" in saved[0]:
        assert resumed_optimizer.state[resumed[0].weight]["beta_powers"].dtype == torch.float64


def test_frozen_params_get_no_state_and_stay_put():
    model = small_model()
    model[0].requires_grad_(False)
    before = [p.clone() for p in model[0].parameters()]
    optimizer = TorchOptimizer(model.parameters(), fr.adamw(lr=1e-2))
    x = torch.randn(8, 4)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert_identical(list(model[0].parameters()), before)
    assert set(optimizer.state_dict()["state"]) == {2, 3}
    assert optimizer.state[model[2].weight]["skipped"] is optimizer.state[model[2].bias]["skipped"]


def test_closure_zero_grad_and_a_step_without_gradients():
    model = small_model()
    optimizer = TorchOptimizer(model.parameters(), fr.sgd(lr=0.1, momentum=0.5))
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = []
    with torch.no_grad():  # the closure still gets gradients, as with torch.optim
        for _ in range(5):
            losses.append(optimizer.step(closure).item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before_params = [p.clone() for p in model.parameters()]
    before_state = clone_state(optimizer.state_dict()["state"])
    assert optimizer.step() is None
    assert_identical(list(model.parameters()), before_params)
    assert_identical(optimizer.state_dict()["state"], before_state)


def test_skip_nonfinite_leaves_the_group_untouched_and_counts():
    model = small_model()
    optimizer = TorchOptimizer(model.parameters(), fr.adam(lr=1e-2, skip_nonfinite=True))
    train(model, optimizer, 12)
    before = [p.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[2].bias.grad[0] = float("nan")
    optimizer.step()
    assert_identical(list(model.parameters()), before)
    assert [optimizer.state[p]["skipped"].item() for p in model.parameters()] == [1, 1, 1, 1]


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda m: TorchOptimizer(m.parameters(), torch.optim.AdamW(m.parameters())),
            TypeError,
            "needs a functional optimizer such as fr.adamw",
        ),
        (lambda m: TorchOptimizer(m.parameters(), fr.adamw), TypeError, "call the factory first"),
        (
            lambda m: TorchOptimizer([{"params": m.parameters(), "momentum": 0.9}], fr.adamw()),
            TypeError,
            "param group 0 has unknown hyperparameter 'momentum'; the functional optimizer "
            "accepts betas, eps, lr, prox_strength, weight_decay",
        ),
        (
            lambda m: TorchOptimizer([{"params": m.parameters(), "lr": -1.0}], fr.adamw()),
            ValueError,
            "lr=-1.0",
        ),
        (
            lambda m: TorchOptimizer([{"params": m.parameters(), "betas": 0.9}], fr.adamw()),
            TypeError,
            "betas must be a pair",
        ),
        (
            lambda m: TorchOptimizer(
                [{"params": m[0].named_parameters()}, {"params": m[2].named_parameters()}],
                fr.adamw(mask="0.*"),
            ),
            ValueError,
            "where='0.\\*' matches no floating-point leaf",
        ),
        (
            lambda m: TorchOptimizer([torch.zeros(2, dtype=torch.complex64)], fr.adamw()),
            TypeError,
            "param 0 of param group 0 is torch.complex64",
        ),
        (
            lambda m: TorchOptimizer([m[0].weight, m[0].weight], fr.sgd(lr=0.1)),
            ValueError,
            "param group 0 lists a param twice",
        ),
        (
            lambda m: TorchOptimizer(m.parameters(), fr.sgd(lr=0.1), compile_options={}),
            ValueError,
            "compile_options needs compile=True",
        ),
    ],
)
def test_bad_construction_raises(make, error, message):
    with pytest.raises(error, match=message):
        make(small_model())


def test_bad_add_param_group_raises_and_leaves_the_groups_alone():
    model = small_model()
    optimizer = TorchOptimizer(model[0].parameters(), fr.adamw())
    with pytest.raises(TypeError, match="unknown hyperparameter 'wd'"):
        optimizer.add_param_group({"params": model[2].parameters(), "wd": 0.0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": model[2].parameters(), "weight_decay": 0.0})
    assert optimizer.param_groups[1]["lr"] == 1e-3


def test_sparse_gradients_raise_before_anything_changes():
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    dense = torch.nn.Linear(2, 1)
    optimizer = TorchOptimizer([*dense.parameters(), embedding.weight], fr.adamw())
    before = [p.clone() for p in [*dense.parameters(), embedding.weight]]
    dense(embedding(torch.tensor([1, 3]))).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients; param 2 of param group 0"):
        optimizer.step()
    assert_identical([*dense.parameters(), embedding.weight], before)
    assert not optimizer.state


def test_load_state_dict_rejects_a_mismatch_before_anything_changes():
    model = small_model()
    torch_optimizer = torch.optim.AdamW(model.parameters())
    train(model, torch_optimizer, 1)
    optimizer = TorchOptimizer(model.parameters(), fr.adamw())
    with pytest.raises(ValueError, match=r"state of param 0 of param group 0 has keys \['exp_avg'"):
        optimizer.load_state_dict(torch_optimizer.state_dict())
    assert not optimizer.state
    ours = TorchOptimizer(model.parameters(), fr.adamw())
    train(model, ours, 1)
    with pytest.raises(ValueError, match="state_dict has 1 param groups, this optimizer has 2"):
        TorchOptimizer(weights_and_biases(model), fr.adamw()).load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match=r"expected \[.*'max_exp_avg_sq'"):
        TorchOptimizer(model.parameters(), fr.adamw(amsgrad=True)).load_state_dict(
            ours.state_dict()
        )
    half_precision = ours.state_dict()
    half_precision["state"][0]["beta_powers"] = half_precision["state"][0]["beta_powers"].float()
    with pytest.raises(ValueError, match=r"beta_powers of param 0 .* torch.float64 \(2,\), got"):
        TorchOptimizer(model.parameters(), fr.adamw()).load_state_dict(half_precision)


# Reliability: a step or a load that raises changes nothing, in any group.


def two_group_optimizer(model, **kwargs):
    return TorchOptimizer(weights_and_biases(model), fr.adamw(lr=1e-2), **kwargs)


@pytest.mark.parametrize(
    "key, value, message",
    [("lr", float("nan"), "lr=nan"), ("betas", (1.5, 0.9), "beta1=1.5")],
)
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.slow
def test_a_bad_hyperparameter_in_a_later_group_changes_no_group(key, value, message, compile):
    model = small_model()
    optimizer = two_group_optimizer(model, compile=compile)
    train(model, optimizer, 1)
    before = [p.detach().clone() for p in model.parameters()]
    saved = optimizer.state_dict()
    optimizer.param_groups[1][key] = value
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=f"param group 1.*{message}"):
        optimizer.step()
    assert_identical([p.detach() for p in model.parameters()], before)
    assert_identical(optimizer.state_dict()["state"], saved["state"])


def test_a_failed_first_step_leaves_no_state():
    model = small_model()
    optimizer = two_group_optimizer(model)
    optimizer.param_groups[1]["lr"] = float("nan")
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match="lr=nan"):
        optimizer.step()
    assert not any(optimizer.state.values())
    optimizer.param_groups[1]["lr"] = 1e-2
    optimizer.step()
    assert all(optimizer.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", float("nan"), "lr=nan"),
        ("betas", (1.5, 0.9), "beta1=1.5"),
        ("weight_decay", -1.0, "weight_decay=-1.0"),
    ],
)
def test_load_state_dict_checks_hyperparameters_before_anything_changes(key, value, message):
    model = small_model()
    optimizer = two_group_optimizer(model)
    train(model, optimizer, 1)
    saved = optimizer.state_dict()
    bad = optimizer.state_dict()
    bad["param_groups"][1][key] = value
    fresh = two_group_optimizer(model)
    groups = [dict(group) for group in fresh.param_groups]
    with pytest.raises(ValueError, match=f"param group 1.*{message}"):
        fresh.load_state_dict(bad)
    assert not any(fresh.state.values())
    assert fresh.param_groups == groups
    optimizer.load_state_dict(saved)
