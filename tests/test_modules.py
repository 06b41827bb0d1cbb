"""functorch_reg.modules: split_module, unwrap and logits_of on real modules."""

import pytest
import torch
from torch.func import functional_call

import functorch_reg as fr
from functorch_reg.modules import logits_of, unwrap


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(4 * 6 * 6, 3),
    )


def test_split_module_keeps_frozen_params_out_of_params_and_shares_storage():
    model = _cnn()
    model[0].requires_grad_(False)
    params, consts = fr.split_module(model)
    assert set(params) == {"1.weight", "1.bias", "5.weight", "5.bias"}
    assert set(consts) == {
        "0.weight",
        "0.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert set(params) | set(consts) == set(model.state_dict())
    assert all(not t.requires_grad for t in [*params.values(), *consts.values()])
    # views of the module's own tensors: a forward in train mode updates its running stats
    before = model[1].running_mean.clone()
    functional_call(model, (params, consts), (torch.randn(8, 1, 8, 8),))
    assert not torch.equal(model[1].running_mean, before)
    assert consts["1.num_batches_tracked"].item() == 1


def test_split_module_unwraps_a_compiled_module():
    net = torch.nn.Linear(3, 2)
    compiled = torch.compile(net)
    assert unwrap(compiled) is net
    assert fr.unwrap(compiled) is net  # the name train_step's refusal points at
    params, consts = fr.split_module(compiled)
    assert set(params) == {"weight", "bias"} and consts == {}


def test_logits_of_reads_tensors_dicts_tuples_and_attributes():
    t = torch.zeros(2, 3)
    assert logits_of(t) is t
    assert logits_of({"logits": t}) is t
    assert logits_of((t, 1)) is None
    assert logits_of((torch.ones(1), t), where=1) is t
    assert logits_of({"scores": t}, where="scores") is t
    assert logits_of({"scores": t}, where=lambda out: out["scores"]) is t

    class Output:
        logits = t

    assert logits_of(Output()) is t
    with pytest.raises(KeyError):
        logits_of({"scores": t}, where="logits")
