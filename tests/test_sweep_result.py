"""SweepResult as data: it pickles and round-trips through torch.save (the plan of the
sweep stays behind, and refit on the copy says so), refit is a function of the plan and
an index, and best_member_params is the trained weights (best_params, deprecated)."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import functorch_reg as fr


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


def images(n: int = 40):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0, 2:4, 2:4].mean((1, 2)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


def run_sweep(model: nn.Module, **kwargs):
    x, y = images()
    options = dict(
        train=(x[:32], y[:32]),
        val=(x[32:], y[32:]),
        hyperparameter="weight_decay",
        steps=3,
        batch_size=8,
        compile=False,
        progress=False,
    )
    options.update(kwargs)
    return fr.sweep(model, cross_entropy, fr.adamw(lr=0.05), [0.0, 0.5, 5.0], **options)


def tensor_fields(result: fr.SweepResult) -> dict[str, object]:
    return {
        "strengths": result.strengths,
        "params": result.params,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_accuracy": result.val_accuracy,
        "sparsity": result.sparsity,
        "param_norm": result.param_norm,
        "fold_val_loss": result.fold_val_loss,
        "fold_val_accuracy": result.fold_val_accuracy,
        "grid": result.grid,
        "buffers": result.buffers,
        "best_state_dict": result.best_state_dict if result.fold_val_loss is None else {},
    }


def assert_equal_fields(a: fr.SweepResult, b: fr.SweepResult) -> None:
    left, right = tensor_fields(a), tensor_fields(b)
    for name, value in left.items():
        other = right[name]
        if value is None:
            assert other is None, name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name  # type: ignore[arg-type]
        else:
            assert value.keys() == other.keys(), name  # type: ignore[attr-defined]
            for key in value:  # type: ignore[attr-defined]
                assert torch.equal(value[key], other[key]), f"{name}[{key}]"  # type: ignore[index]
    assert a.labels == b.labels and a.select == b.select and a.best_index == b.best_index


@pytest.mark.parametrize("via", ["pickle", "torch.save"])
def test_a_sweep_result_with_buffers_round_trips_and_refit_then_says_why_not(via):
    result = run_sweep(cnn())
    assert result.buffers["1.running_mean"].shape == (3, 3)
    if via == "pickle":
        copy = pickle.loads(pickle.dumps(result))
    else:
        stream = io.BytesIO()
        torch.save(result, stream)
        stream.seek(0)
        copy = torch.load(stream, weights_only=False)
    assert_equal_fields(result, copy)
    assert copy.plan is None and result.plan is not None  # the original keeps its plan
    assert copy.table() == result.table()
    with pytest.raises(ValueError, match="unpickled.*call fr.sweep again"):
        copy.refit()
    result.refit(steps=1)  # the original still refits


@pytest.mark.slow
def test_folds_result_round_trips():
    x, y = images()
    result = run_sweep(cnn(), train=(x, y), val=None, folds=2, batch_size=None)
    copy = pickle.loads(pickle.dumps(result))
    assert_equal_fields(result, copy)
    assert copy.fold_val_loss is not None and copy.fold_val_loss.shape == (3, 2)


@pytest.mark.slow
def test_refit_is_a_function_of_the_plan_and_an_index():
    model = cnn()
    result = run_sweep(model)
    assert isinstance(result.plan, fr.ensemble.SweepPlan)
    chosen = result.refit(steps=2)
    again = fr.ensemble.refit(result.plan, result.best_index, steps=2)
    assert chosen.keys() == again.keys() == model.state_dict().keys()
    for key in chosen:
        assert torch.equal(chosen[key], again[key]), key
    other = (result.best_index + 1) % 3
    differs = fr.ensemble.refit(result.plan, other, steps=2)
    assert not torch.equal(differs["4.weight"], chosen["4.weight"])  # another strength


def test_best_member_params_and_the_deprecated_best_params():
    result = run_sweep(cnn())
    weights = result.best_member_params
    assert weights.keys() == result.params.keys()
    for key, value in weights.items():
        assert torch.equal(value, result.params[key][result.best_index]), key
    with pytest.warns(DeprecationWarning, match="best_member_params"):
        old = result.best_params
    assert all(torch.equal(old[key], weights[key]) for key in weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert result.best_member_params.keys() == weights.keys()  # no warning
