"""fr.train_step on real models: BatchNorm buffers passed through the step (consts=True),
frozen params, tied embeddings of a tiny GPT-2, fullgraph=False, and the errors a model
with buffers or a compiled module gets, raised before anything changes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.func import functional_call

import functorch_reg as fr

transformers = pytest.importorskip("transformers")

STEPS = 3


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),  # BatchNorm's shift is the bias
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Dropout(p=0.0),  # train mode, deterministic
            torch.nn.AdaptiveAvgPool2d(2),
        )
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def cnn(frozen_head_bias: bool = True) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    if frozen_head_bias:
        model.head.bias.requires_grad_(False)
    return model


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(n)
    ]


def torch_optim_loop(model, data):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def cnn_loss(model):
    def loss(params, consts, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, (params, consts), (x,)), y)

    return loss


def assert_state_close(model, reference, atol):
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "mode",
    [None, pytest.param("reduce-overhead", marks=[pytest.mark.slow, pytest.mark.compile])],
)
def test_batchnorm_cnn_matches_torch_optim_running_stats_included(mode, device):
    """Eager, and compiled with CUDA graphs (on CPU, the default compile mode): the
    consts are marked static like the params, and updated in place."""
    model = cnn().to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches()]
    reference = copy.deepcopy(model)
    frozen = model.head.bias.clone()
    params, consts = fr.split_module(model)
    opt = fr.adamw(lr=0.05, weight_decay=0.1)
    state = opt.init(params)
    step = fr.train_step(cnn_loss(model), opt, consts=True, compile=mode is not None, mode=mode)
    values = [step(params, state, consts, x, y) for x, y in data]
    torch_optim_loop(reference, data)
    assert int(model.features[1].num_batches_tracked) == STEPS
    assert torch.equal(model.head.bias, frozen)
    assert len({float(v) for v in values}) == STEPS  # values kept across steps
    assert_state_close(model, reference, atol=1e-12 if mode is None else 1e-10)


def test_pure_with_consts_leaves_the_module_alone_and_returns_new_buffers():
    model, ((x, y),) = cnn(), batches(1)
    before = copy.deepcopy(model.state_dict())
    params, consts = fr.split_module(model)
    opt = fr.sgd(lr=0.1)
    step = fr.train_step(cnn_loss(model), opt, consts=True, compile=False)
    new_params, _, new_consts, _ = step.pure(params, opt.init(params), consts, x, y)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert int(new_consts["features.1.num_batches_tracked"]) == 1
    reference = copy.deepcopy(model)
    reference(x)  # one train-mode forward updates the running stats
    torch.testing.assert_close(
        new_consts["features.1.running_var"], reference.features[1].running_var, rtol=0, atol=0
    )
    assert not torch.equal(new_params["head.weight"], params["head.weight"])


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.slow
def test_captured_buffer_error_names_the_module_and_changes_nothing(compile):
    model, ((x, y),) = cnn(), batches(1)
    before = copy.deepcopy(model.state_dict())
    params = fr.split_module(model)[0]

    def loss(params, x, y):  # the pattern that works for models without buffers
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    opt = fr.adamw(lr=0.05)
    step = fr.train_step(loss, opt, compile=compile)
    with pytest.raises(RuntimeError) as info:
        step(params, opt.init(params), x, y)
    message = str(info.value)
    assert "BatchNorm2d 'model.features.1'" in message
    assert "running_mean" in message and "consts=True" in message
    assert info.value.__cause__ is None  # short: no torch.func traceback chained
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"lr": -1.0}, ValueError),  # raised by the update, after the forward ran
        ({"loss": "vector"}, ValueError),  # the loss's value, after the forward ran
    ],
)
def test_a_failing_step_leaves_params_and_buffers_bit_identical(bad, error):
    model, ((x, y),) = cnn(), batches(1)
    params, consts = fr.split_module(model)
    opt = fr.adamw(lr=0.05)
    state = opt.init(params)
    step = fr.train_step(cnn_loss(model), opt, consts=True, compile=False)
    step(params, state, consts, x, y)  # a good step first: later ones copy only what changes
    before = copy.deepcopy(model.state_dict())
    saved_state = copy.deepcopy(state)
    overrides = {k: v for k, v in bad.items() if k != "loss"}
    if bad.get("loss") == "vector":

        def loss(params, consts, x, y):
            out = functional_call(model, (params, consts), (x,))
            return torch.nn.functional.cross_entropy(out, y, reduction="none")

        step = fr.train_step(loss, opt, consts=True, compile=False)  # copies all consts
    with pytest.raises(error):
        step(params, state, consts, x, y, **overrides)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    torch.testing.assert_close(state, saved_state, rtol=0, atol=0)


def test_captured_buffer_error_finds_the_module_of_a_bound_loss():
    class Classifier(torch.nn.Module):  # the Lightning-style module: loss is a method
        def __init__(self) -> None:
            super().__init__()
            self.net = cnn()

        def loss(self, params, x, y):
            out = functional_call(self.net, params, (x,))
            return torch.nn.functional.cross_entropy(out, y)

    module, ((x, y),) = Classifier(), batches(1)
    params = fr.split_module(module.net)[0]
    opt = fr.sgd(lr=0.1)
    with pytest.raises(RuntimeError, match="BatchNorm2d 'self.net.features.1'"):
        fr.train_step(module.loss, opt, compile=False)(params, opt.init(params), x, y)
    module.net = torch.compile(module.net)
    with pytest.raises(TypeError, match="loss runs 'self.net', a torch.compile'd module"):
        fr.train_step(module.loss, opt)


def test_a_compiled_module_is_refused_with_the_fix():
    model = cnn()
    compiled = torch.compile(model)
    params = fr.split_module(compiled)[0]
    assert "head.weight" in params  # split_module unwraps

    def loss(params, consts, x, y):
        return functional_call(compiled, (params, consts), (x,)).sum()

    with pytest.raises(TypeError, match=r"'compiled', a torch.compile'd module.*fr.unwrap"):
        fr.train_step(loss, fr.sgd(lr=0.1), consts=True)


def tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def gpt2_logits_loss(model):
    def loss(params, consts, ids):
        logits = functional_call(model, (params, consts), (ids,)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return loss


def gpt2_reference(model, data):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for ids in data:
        optimizer.zero_grad()
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        ).backward()
        optimizer.step()


def gpt2_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 16, (2, 8), generator=g) for _ in range(STEPS)]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tiny_gpt2_with_tied_embeddings_matches_torch_optim(compile):
    model, data = tiny_gpt2(), gpt2_data()
    reference = copy.deepcopy(model)
    params, consts = fr.split_module(model)
    assert "lm_head.weight" not in params  # tied: one tensor, one update
    opt = fr.adamw(lr=0.05, weight_decay=0.1)
    state = opt.init(params)
    step = fr.train_step(gpt2_logits_loss(model), opt, consts=True, compile=compile)
    for ids in data:
        step(params, state, consts, ids)
    gpt2_reference(reference, data)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_state_close(model, reference, atol=1e-12 if not compile else 1e-10)


@pytest.mark.slow
def test_fullgraph_false_compiles_transformers_builtin_loss():
    model, data = tiny_gpt2(), gpt2_data()[:2]
    reference = copy.deepcopy(model)
    params, consts = fr.split_module(model)

    def loss(params, consts, ids):  # transformers logs a warning inside this forward
        return functional_call(model, (params, consts), (ids,), {"labels": ids}).loss

    opt = fr.adamw(lr=0.05, weight_decay=0.1)
    state = opt.init(params)
    strict = fr.train_step(loss, opt, consts=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        strict(params, state, consts, data[0])
    assert "fullgraph=False" in "".join(getattr(info.value, "__notes__", []))
    step = fr.train_step(loss, opt, consts=True, fullgraph=False)
    for ids in data:
        step(params, state, consts, ids)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1)
    for ids in data:
        optimizer.zero_grad()
        reference(ids, labels=ids).loss.backward()
        optimizer.step()
    assert_state_close(model, reference, atol=1e-10)
