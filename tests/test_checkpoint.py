"""Checkpoints of a functional state (functorch_reg.optim.checkpoint): every rule's state
round-trips through torch.save / torch.load(weights_only=True), a resumed run equals
the uninterrupted one bit for bit, and a checkpoint that does not fit the params is
refused with an error naming the field and leaf, before anything is built."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import functorch_reg as fr
import functorch_reg.optim.base
import functorch_reg.optim.checkpoint

RULES = {
    "sgd": lambda: fr.sgd(lr=0.05),
    "sgd_momentum": lambda: fr.sgd(lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov_decoupled": lambda: fr.sgd(
        lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, decoupled=True
    ),
    "adam": lambda: fr.adam(lr=1e-2, weight_decay=0.01),
    "adamw_amsgrad_skip": lambda: fr.adamw(lr=1e-2, amsgrad=True, skip_nonfinite=True),
    "adamw_prox_clip": lambda: fr.adamw(
        lr=1e-2, prox=fr.prox.l1, prox_strength=0.01, clip_grad_norm=1.0
    ),
    "lion": lambda: fr.lion(lr=1e-3, weight_decay=0.5),
    "muon": lambda: fr.muon(lr=2e-2, adam=fr.adamw(lr=1e-2, amsgrad=True), ns_dtype=torch.float32),
    "schedule_free_adamw": lambda: fr.schedule_free_adamw(lr=1e-2, warmup_steps=2),
    "schedule_free_sgd": lambda: fr.schedule_free_sgd(lr=1e-2, weight_decay=0.05),
}


class SmallCNN(nn.Module):
    """Conv + BatchNorm2d + Dropout + Linear: matrices, conv kernels, vectors and
    non-floating buffers (BatchNorm's step count)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.norm(self.conv(x))))
        return self.head(x.flatten(1))


def model_params():
    torch.manual_seed(0)
    model = SmallCNN()
    # Floating params and buffers, and BatchNorm's int64 num_batches_tracked, which
    # has no state and stays out of the checkpoint.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads_of(params, t):
    generator = torch.Generator().manual_seed(100 + t)
    return {
        k: torch.randn(v.shape, generator=generator) + 0.1 * v if v.is_floating_point() else None
        for k, v in params.items()
    }


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def trained(name, steps=3):
    opt = RULES[name]()
    params = model_params()
    state = opt.init(params)
    for t in range(steps):
        grads = grads_of(params, t)
        if t == 1:
            grads["conv.bias"] = None  # a frozen leaf: its row of a leaf table stays put
        params, state = opt.step(params, grads, state)
    return opt, params, state


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_round_trips_through_torch_save_and_resumes_bit_identically(name):
    opt, params, state = trained(name)
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": fr.state_dict(state)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = fr.load_state_dict(opt, saved["params"], saved["optimizer"])
    assert type(resumed) is type(state)
    assert_identical(resumed, state)
    a, b = (params, state), (saved["params"], resumed)
    for t in range(3, 6):
        a = opt.step(a[0], grads_of(a[0], t), a[1])
        b = opt.step(b[0], grads_of(b[0], t), b[1])
    assert_identical(a, b)


@pytest.mark.parametrize("name", list(RULES))
def test_state_dict_is_plain_detached_copies_keyed_by_field_and_leaf(name):
    _, params, state = trained(name)
    saved = fr.state_dict(state)
    floating = {k for k, v in params.items() if v.is_floating_point()}
    assert "skipped" in saved and saved["skipped"].ndim == 0
    for field, entry in saved.items():
        if field != "skipped":
            assert isinstance(entry, dict)
            assert set(entry) <= floating, field
            assert "norm.num_batches_tracked" not in entry
    # Copies: writing into the checkpoint leaves the state alone.
    before = fr.state_dict(state)
    for entry in saved.values():
        for tensor in entry.values() if isinstance(entry, dict) else [entry]:
            tensor.add_(1)
    assert_identical(fr.state_dict(state), before)


def test_public_names_are_one_function():
    assert fr.state_dict is fr.optim.state_dict is functorch_reg.optim.checkpoint.state_dict
    assert fr.load_state_dict is functorch_reg.optim.checkpoint.load_state_dict
    # The re-export of the module they used to live in.
    assert functorch_reg.optim.base.state_dict is fr.state_dict
    assert functorch_reg.optim.base.load_state_dict is fr.load_state_dict
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        functorch_reg.optim.base.nope  # noqa: B018


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("exp_avg_sq"), r"fields \['beta_powers', 'exp_avg', 'skipped'\]"),
        (lambda sd: sd.update(momentum_buffer={}), "fields .* but this optimizer's state has"),
        (lambda sd: sd["exp_avg"].pop("head.weight"), "state_dict\\['exp_avg'\\] .* missing "),
        (
            lambda sd: sd["exp_avg"].update(extra=torch.zeros(1)),
            "unexpected 'extra'",
        ),
        (
            lambda sd: sd["beta_powers"].pop("conv.weight"),
            "state_dict\\['beta_powers'\\] .* missing 'conv.weight'",
        ),
        (
            lambda sd: sd["exp_avg"].update({"head.weight": torch.zeros(2, 11)}),
            r"exp_avg.head.weight should be torch.float32 \(2, 12\), got torch.float32 \(2, 11\)",
        ),
        (
            lambda sd: sd["exp_avg_sq"].update({"conv.bias": torch.zeros(3, dtype=torch.float64)}),
            r"exp_avg_sq.conv.bias should be torch.float32 \(3,\), got torch.float64",
        ),
        (
            lambda sd: sd["exp_avg"].update({"conv.bias": [0.0, 0.0, 0.0]}),
            r"exp_avg.conv.bias should be torch.float32 \(3,\), got \[0.0",
        ),
        (lambda sd: sd.update(skipped=torch.zeros(2)), r"skipped should be torch.int64 \(\)"),
        (lambda sd: sd.update(exp_avg=torch.zeros(1)), "state_dict\\['exp_avg'\\] does not match"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_naming_field_and_leaf(edit, message):
    opt, params, state = trained("adam")
    saved = fr.state_dict(state)
    edit(saved)
    params_before, saved_before = {k: v.clone() for k, v in params.items()}, copy.deepcopy(saved)
    with pytest.raises(ValueError, match=message):
        fr.load_state_dict(opt, params, saved)
    assert_identical(params, params_before)  # nothing changed, bit for bit
    assert_identical(saved, saved_before)


def test_a_checkpoint_of_other_params_is_refused():
    opt, _, state = trained("sgd_momentum")
    other = {**model_params(), "head.weight": torch.zeros(2, 13)}
    with pytest.raises(ValueError, match=r"momentum_buffer.head.weight should be .*\(2, 13\)"):
        fr.load_state_dict(opt, other, fr.state_dict(state))
    renamed = {k.replace("head.", "fc."): v for k, v in model_params().items()}
    with pytest.raises(
        ValueError, match=r"\['momentum_buffer'\] .* missing 'fc.bias', unexpected 'head.bias'"
    ):
        fr.load_state_dict(opt, renamed, fr.state_dict(state))


def test_load_state_dict_puts_tensors_on_the_params_devices_as_copies():
    opt, params, state = trained("adamw_amsgrad_skip")
    saved = fr.state_dict(state)
    resumed = fr.load_state_dict(opt, params, saved)
    assert resumed.exp_avg["head.weight"] is not saved["exp_avg"]["head.weight"]
    assert resumed.exp_avg["head.weight"].data_ptr() != saved["exp_avg"]["head.weight"].data_ptr()
    meta = {k: v.to("meta") for k, v in params.items()}
    on_meta = fr.load_state_dict(opt, meta, saved)
    assert on_meta.exp_avg["head.weight"].is_meta and on_meta.beta_powers.is_meta
