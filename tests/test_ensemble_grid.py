"""The sweep's plan (functorch_reg/ensemble/grid.py): every input checked before anything
trains, through the same checks whether by fr.sweep or fr.ensemble.plan; the plan frozen and
resolved (grid in the params' dtype, K x folds members, how folds see their rows); the
optimizer's hyperparameters checked by Optimizer.validate, never by a trial step."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch.utils.data import DataLoader

import functorch_reg as fr

from .test_ensemble import classification_data, small_model, sweep_kwargs


def mismatched_init():
    members = fr.init_ensemble(small_model(), 2)
    del members["2.bias"]
    return members


BAD_INPUT = [
    (
        {"init": fr.init_ensemble(small_model(), 3)},
        "init holds \\[3\\] members but there are 4",
    ),
    ({"penalty": fr.penalties.l1, "hyperparameter": "lr"}, "exactly one of"),
    ({"penalty": None}, "exactly one of"),
    ({"penalty": None, "hyperparameter": "betas"}, "not a scalar hyperparameter"),
    ({"strengths": [[0.1, 0.2]]}, "1-d"),
    ({"strengths": [0.1, -0.2]}, "non-negative"),
    ({"steps": 0}, "positive int"),
    ({"batch_size": 1000}, "batch_size"),
    ({"init": "random"}, "'shared', 'independent'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUT)
def test_bad_sweep_input_raises(kwargs, message):
    train, val = classification_data()
    arguments = {
        "strengths": [0.0, 0.1, 0.2, 0.3],
        "train": train,
        "val": val,
        "penalty": fr.penalties.l1,
        "compile": False,
        "progress": False,
        **kwargs,
    }
    strengths = arguments.pop("strengths")
    with pytest.raises(ValueError, match=message):
        fr.sweep(
            small_model(), torch.nn.functional.cross_entropy, fr.adam(), strengths, **arguments
        )


BAD_DATA = [
    ({"train": 5}, TypeError, "pair of tensors"),
    ({"train": [{"x": torch.zeros(2, 5), "y": torch.zeros(2)}]}, TypeError, "train batch 0"),
    (
        {"train": DataLoader([{"x": torch.zeros(5), "y": 0}] * 4, batch_size=2)},
        TypeError,
        "train batch 0 must be an \\(x, y\\) pair of tensors, got a dict",
    ),
    ({"train": (batch for batch in [])}, TypeError, "one-shot iterator"),
    ({"train": []}, ValueError, "train is empty"),
    ({"train": (torch.zeros(20, 5), torch.zeros(40).long())}, ValueError, "same leading"),
    ({"train": (torch.zeros(0, 5), torch.zeros(0).long())}, ValueError, "train is empty"),
    ({"val": (torch.zeros(0, 5), torch.zeros(0).long())}, ValueError, "val is empty"),
    ({"val": (torch.zeros(30, 5), torch.zeros(20).long())}, ValueError, "same leading"),
    ({"init": mismatched_init()}, ValueError, "missing \\['2.bias'\\]"),
    ({"batch_size": True}, ValueError, "batch_size"),
    ({"batch_size": 8.0}, ValueError, "batch_size"),
    ({"strengths": [0.1, float("nan")]}, ValueError, "finite"),
    ({"strengths": [-0.1, 0.1]}, ValueError, "non-negative"),
    (
        {"penalty": None, "hyperparameter": "dampening", "optimizer": fr.sgd(lr=0.1)},
        ValueError,
        "dampening=2.0",
    ),
    ({"strengths": {"penalty": [0.1], "gamma": [1.0]}}, ValueError, "grid axis 'gamma'"),
    ({"strengths": {"lr": [0.1]}}, ValueError, "penalty axis and penalty="),
    ({"select": "val_f1"}, ValueError, "select must be"),
    ({"val": None}, ValueError, "give val="),
    ({"folds": 3}, ValueError, "pass val=None"),
    ({"val": None, "folds": 65}, ValueError, "more than the 64"),
    ({"val": None, "folds": 1}, ValueError, "folds must be an int >= 2"),
    ({"val": None, "folds": 2, "cv": [([0], [1])] * 2}, ValueError, "not both"),
    (
        {
            "val": [
                (torch.zeros(4, 5), torch.zeros(4).long()),
                (torch.zeros(4, 5), torch.zeros(3)),
            ]
        },
        ValueError,
        "val batch 1",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_DATA)
def test_bad_sweep_data_raises_before_training(kwargs, error, message):
    kwargs = {"strengths": [0.0, 2.0], "optimizer": fr.adam(), **kwargs}
    strengths, optimizer = kwargs.pop("strengths"), kwargs.pop("optimizer")
    model = small_model()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=message):
        fr.sweep(
            model, torch.nn.functional.cross_entropy, optimizer, strengths, **sweep_kwargs(**kwargs)
        )
    assert len(calls) <= 1, "at most the one-sample probe ran"


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_DATA)
def test_plan_raises_what_sweep_raises_and_runs_no_step(kwargs, error, message):
    kwargs = {"strengths": [0.0, 2.0], "optimizer": fr.adam(), **kwargs}
    strengths, optimizer = kwargs.pop("strengths"), kwargs.pop("optimizer")
    steps = []
    counting = optimizer._replace(step=lambda *a, **k: steps.append(1) or optimizer.step(*a, **k))
    arguments = sweep_kwargs(**kwargs)
    del arguments["progress"]
    with pytest.raises(error, match=message):
        fr.ensemble.plan(
            small_model(), torch.nn.functional.cross_entropy, counting, strengths, **arguments
        )
    assert not steps


def test_plan_takes_sweeps_arguments_with_its_defaults():
    sweep = inspect.signature(fr.sweep).parameters
    plan = inspect.signature(fr.ensemble.plan).parameters
    assert list(plan) == [name for name in sweep if name != "progress"]
    for name, parameter in plan.items():
        assert (parameter.kind, parameter.default) == (sweep[name].kind, sweep[name].default)


def test_plan_is_frozen_resolved_and_leaves_the_model_alone():
    train, _ = classification_data()
    model = small_model().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resolved = fr.ensemble.plan(
        model,
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        {"penalty": [0.0, 0.05], "lr": [0.1, 0.2, 0.3]},
        train=(train[0].double(), train[1]),
        folds=4,
        penalty=fr.penalties.l2,
    )
    assert resolved.count == 6 and resolved.folds == 4
    # the product of the axes, first axis slowest, in the params' dtype
    assert resolved.grid["penalty"].dtype == resolved.grid["lr"].dtype == torch.float64
    expected = torch.tensor([0.0, 0.05], dtype=torch.float64).repeat_interleave(3)
    torch.testing.assert_close(resolved.grid["penalty"], expected)
    torch.testing.assert_close(resolved.grid["lr"], torch.tensor([0.1, 0.2, 0.3] * 2).double())
    assert resolved.initial["0.weight"].shape == (24, 8, 5)
    assert resolved.folding is not None and resolved.folding.samples == "weighted"
    # 64 samples in 4 contiguous folds: each member weighs 0 its held-out 16
    assert resolved.folding.per_member.shape == (24, 64)
    torch.testing.assert_close(resolved.folding.per_member.sum(1), torch.full((24,), 48.0).double())
    assert resolved.logits is not False  # integer targets: a classification problem
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.steps = 3  # type: ignore[misc]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_folds_with_batchnorm_gather_each_members_own_rows():
    train, _ = classification_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    resolved = fr.ensemble.plan(
        model,
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 1.0],
        train=train,
        folds=4,
        penalty=fr.penalties.l2,
        compile=False,
    )
    assert resolved.folding is not None and resolved.folding.samples == "gathered"
    rows = resolved.folding.per_member
    assert rows.shape == (8, 48)
    for member in range(8):
        held_out = set(range(16 * (member % 4), 16 * (member % 4 + 1)))
        assert held_out.isdisjoint(rows[member].tolist())
    assert resolved.initial_buffers["1.running_mean"].shape == (8, 4)


def test_swept_hyperparameters_are_checked_by_validate_once_per_value():
    train, val = classification_data()
    optimizer = fr.adamw(lr=0.1)
    seen, steps = [], []

    def validate(params=None, **hyperparameters):
        seen.append((params is not None, {k: float(v) for k, v in hyperparameters.items()}))
        return optimizer.validate(params, **hyperparameters)

    def step(*args, **kwargs):
        steps.append(1)
        return optimizer.step(*args, **kwargs)

    watched = optimizer._replace(validate=validate, step=step)
    fr.ensemble.plan(
        small_model(),
        torch.nn.functional.cross_entropy,
        watched,
        [0.0, 0.5, 0.5, 2.0],
        train=train,
        val=DataLoader(list(zip(*val, strict=True)), batch_size=8),
        hyperparameter="weight_decay",
    )
    assert not steps, "no trial step: the optimizer's validate checks on meta copies"
    assert sorted(s[1]["weight_decay"] for s in seen) == [0.0, 0.5, 2.0]
    assert all(with_params for with_params, _ in seen)


def test_python_float_strengths_reach_a_float64_model_exactly():
    # torch.optim reads a Python float as a double: a float64 model's 0.05 is 0.05, not
    # float32(0.05) = 0.05000000074505806 (the list went through the default dtype).
    train, val = classification_data()
    model = small_model().double()
    data = dict(train=(train[0].double(), train[1]), val=(val[0].double(), val[1]))
    loss_fn, optimizer = torch.nn.functional.cross_entropy, fr.sgd(lr=0.1)
    one_axis = fr.ensemble.plan(
        model, loss_fn, optimizer, [0.0, 0.05], penalty=fr.penalties.l2, **data
    )
    assert one_axis.grid["penalty"].tolist() == [0.0, 0.05]
    # axes of different dtypes (a list, a float32 tensor) make one grid
    two_axes = fr.ensemble.plan(
        model,
        loss_fn,
        optimizer,
        {"penalty": [0.05], "lr": torch.tensor([0.1, 0.2])},
        penalty=fr.penalties.l2,
        **data,
    )
    assert two_axes.grid["penalty"].tolist() == [0.05, 0.05]
    assert two_axes.grid["lr"].tolist() == torch.tensor([0.1, 0.2]).double().tolist()
    # a float32 model gets float32(0.05), as before
    single = fr.ensemble.plan(
        small_model(), loss_fn, optimizer, [0.05], penalty=fr.penalties.l2, train=train, val=val
    )
    assert torch.equal(single.grid["penalty"], torch.tensor([0.05]))
