"""Schedules against the torch.optim.lr_scheduler they are named after."""

from __future__ import annotations

import itertools

import pytest
import torch

from functorch_reg import schedules

STEPS = 60


def torch_lrs(make_scheduler, base_lr: float, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def ours(schedule, steps: int = STEPS) -> list[float]:
    return [schedule(torch.tensor(step)).item() for step in range(steps)]


@pytest.mark.parametrize(
    ("schedule", "make_scheduler", "steps"),
    [
        (
            schedules.linear_warmup(0.1, warmup_steps=10, start_factor=0.25),
            lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=10),
            STEPS,
        ),
        (
            schedules.cosine(0.1, total_steps=40, final=0.01),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.01),
            41,  # past T_max torch's recursion climbs back up; ours holds at `final`
        ),
        (
            schedules.step_decay(0.1, step_size=7, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
            STEPS,
        ),
        (
            schedules.constant(0.1),
            lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0),
            STEPS,
        ),
    ],
    ids=["linear_warmup", "cosine", "step_decay", "constant"],
)
def test_matches_torch_lr_scheduler(schedule, make_scheduler, steps):
    expected = torch_lrs(make_scheduler, 0.1, steps)
    assert ours(schedule, steps) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_cosine_with_warmup_and_hold():
    schedule = schedules.cosine(1.0, total_steps=30, final=0.1, warmup_steps=10)
    values = ours(schedule)
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[30] == pytest.approx(0.1) and values[59] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:31]))


def test_schedules_return_default_dtype_scalars_on_the_step_device():
    step = torch.tensor(3)
    for schedule in (
        schedules.constant(0.1),
        schedules.linear_warmup(0.1, 5),
        schedules.cosine(0.1, 10),
        schedules.step_decay(0.1, 2),
    ):
        value = schedule(step)
        assert value.dtype == torch.float32 and value.ndim == 0 and value.device == step.device


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: schedules.linear_warmup(0.1, warmup_steps=0), "warmup_steps must be a positive"),
        (lambda: schedules.cosine(0.1, total_steps=10, warmup_steps=10), "warmup_steps < total"),
        (lambda: schedules.step_decay(-0.1, 3), "initial=-0.1"),
        (lambda: schedules.constant(float("nan")), "value=nan"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
