"""Sweeps and ensemble steps on real models: BatchNorm buffers, dropout, frozen parameters,
library outputs, compiled modules; each member against a torch.optim loop in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import functorch_reg as fr

CPU = torch.device("cpu")


def cnn(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm2d and Dropout, in float64 and train mode. (The conv has
    no bias, as before any BatchNorm: its gradient would be rounding noise, which Adam
    scales up to steps of size lr, so no two implementations would agree on it.)"""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


def images(n: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0, 2:4, 2:4].mean((1, 2)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def torch_loop(model, weight_decay, batches, x, y, lr=0.05, seed=None, loss_fn=None, sgd=False):
    """The reference: one copy of ``model`` trained by torch.optim.AdamW (or SGD with
    momentum 0.9) in train mode."""
    replica = copy.deepcopy(model)
    trainable = [p for p in replica.parameters() if p.requires_grad]
    if sgd:
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    loss_fn = loss_fn or F.cross_entropy
    if seed is not None:
        torch.manual_seed(seed)
    for index in batches:
        optimizer.zero_grad()
        loss_fn(replica(x[index]), y[index]).backward()
        optimizer.step()
    return replica


def eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y)


def sweep_cnn(model, strengths, train, val=None, **kwargs):
    options = dict(
        train=train,
        val=val,
        hyperparameter="weight_decay",
        steps=6,
        batch_size=8,
        seed=2,
        compile=False,
        progress=False,
    )
    options.update(kwargs)
    return fr.sweep(model, F.cross_entropy, fr.adamw(lr=0.05), strengths, **options)


@pytest.mark.slow
def test_batchnorm_members_equal_torch_optim_loops_and_load_strictly():
    x, y = images()
    train, val = (x[:32], y[:32]), (x[32:], y[32:])
    model = cnn()
    before = snapshot(model)
    strengths = torch.tensor([0.0, 0.5, 5.0])
    result = sweep_cnn(model, strengths, train, val)
    assert_bit_identical(model, before)  # the sweep trained copies
    assert result.buffers["1.running_mean"].shape == (3, 3)
    assert result.buffers["1.num_batches_tracked"].tolist() == [6, 6, 6]
    batches = fr.sweep_data.sample_batches(32, 8, 6, seed=2, device=CPU)
    for i, strength in enumerate(strengths.tolist()):
        reference = torch_loop(model, strength, batches, *train)
        expected = reference.state_dict()
        member = {k: v[i] for k, v in {**result.params, **result.buffers}.items()}
        assert member.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(member[name], value, rtol=0, atol=1e-10, msg=name)
        # validation runs in eval mode, on the member's running statistics
        torch.testing.assert_close(
            result.val_loss[i], eval_loss(reference, *val), atol=1e-10, rtol=0
        )
    assert model.training  # the sweep's eval mode did not stick
    best = copy.deepcopy(model)
    best.load_state_dict(result.best_state_dict, strict=True)
    expected = torch_loop(model, strengths[result.best_index].item(), batches, *train)
    torch.testing.assert_close(eval_loss(best, *val), eval_loss(expected, *val))


@pytest.mark.slow
def test_refit_is_a_strict_state_dict_trained_on_train_plus_val():
    x, y = images()
    model = cnn()
    result = sweep_cnn(model, [0.0, 1.0], (x[:32], y[:32]), (x[32:], y[32:]), batch_size=None)
    refit = result.refit(steps=4)
    reference = torch_loop(model, result.best["weight_decay"], [torch.arange(48)] * 4, x, y)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(refit[name], value, rtol=0, atol=1e-10, msg=name)
    copy.deepcopy(model).load_state_dict(refit, strict=True)


@pytest.mark.slow
def test_eval_mode_model_keeps_its_buffers_and_trains_as_before():
    x, y = images()
    model = cnn().eval()
    result = sweep_cnn(model, [0.0, 1.0], (x[:32], y[:32]), (x[32:], y[32:]))
    for name, buffer in model.named_buffers():
        assert torch.equal(result.buffers[name][1], buffer)
    batches = fr.sweep_data.sample_batches(32, 8, 6, seed=2, device=CPU)
    reference = torch_loop(model, 1.0, batches, x[:32], y[:32])
    torch.testing.assert_close(result.params["5.weight"][1], reference[5].weight.detach())


@pytest.mark.slow
def test_dropout_with_same_randomness_is_the_seeded_torch_loop():
    x, y = images()
    train, val = (x[:32], y[:32]), (x[32:], y[32:])
    model = cnn(dropout=0.3)
    state = torch.get_rng_state()
    strengths = torch.tensor([0.1, 0.1, 2.0])
    result = sweep_cnn(model, strengths, train, val, randomness="same", seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    # Same strength, same init, same masks: equal members. Bit-identical here, but only
    # up to rounding in general: a conv of vmapped weights is a grouped conv, and the CPU
    # kernel may round each group differently (see the ensemble_step test below).
    for name, leaf in {**result.params, **result.buffers}.items():
        torch.testing.assert_close(leaf[0], leaf[1], rtol=0, atol=1e-13, msg=name)
    # "same": every member draws the masks the seeded model draws, step by step
    batches = fr.sweep_data.sample_batches(32, 8, 6, seed=5, device=CPU)
    for i in (0, 2):
        reference = torch_loop(model, strengths[i].item(), batches, *train, seed=5)
        for name, value in reference.state_dict().items():
            member = {**result.params, **result.buffers}[name][i]
            torch.testing.assert_close(member, value, rtol=0, atol=1e-10, msg=name)


@pytest.mark.slow
def test_dropout_with_different_randomness_differs_per_member_and_follows_the_seed():
    x, y = images()
    train, val = (x[:32], y[:32]), (x[32:], y[32:])
    model = cnn(dropout=0.3)
    run = lambda seed: sweep_cnn(model, [0.1, 0.1], train, val, seed=seed)  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    weight = first.params["5.weight"]
    assert not torch.equal(weight[0], weight[1])  # own masks per member
    for name, leaf in first.params.items():
        assert torch.equal(leaf, again.params[name]), name  # reproducible from the seed
    assert not torch.equal(weight, other.params["5.weight"])


def test_failing_sweeps_leave_the_model_bit_identical():
    x, y = images()
    train, val = (x[:32], y[:32]), (x[32:], y[32:])
    model = cnn(dropout=0.3)
    before, state = snapshot(model), torch.get_rng_state()
    # train-mode dropout under randomness="error": fails in the first training step
    with pytest.raises(RuntimeError, match="randomness"):
        sweep_cnn(model, [0.1, 1.0], train, val, randomness="error")
    assert_bit_identical(model, before)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="randomness must be"):
        sweep_cnn(model, [0.1], train, val, randomness="sometimes")
    with pytest.raises(ValueError, match="0-d tensor"):
        fr.sweep(model, lambda out, t: F.cross_entropy(out, t, reduction="none"),
                 fr.adamw(lr=0.1), [0.1], train=train, val=val, hyperparameter="weight_decay",
                 compile=False, progress=False)  # fmt: skip
    assert_bit_identical(model, before)


@pytest.mark.parametrize("batch_size", [None, 8])
@pytest.mark.slow
def test_folds_give_each_batchnorm_member_its_own_fold_only(batch_size):
    x, y = images()
    model = cnn()
    result = sweep_cnn(model, [0.0, 2.0], (x, y), folds=3, batch_size=batch_size, steps=4)
    assert result.buffers["1.running_var"].shape == (2, 3, 3)
    held = fr.sweep_data.kfold_masks(48, 3)
    for fold in range(3):
        rows = (~held[fold]).nonzero().squeeze(1)
        positions = fr.sweep_data.sample_batches(32, batch_size, 4, seed=2, device=CPU)
        reference = torch_loop(model, 2.0, [rows[p] for p in positions], x, y)
        for name, value in reference.state_dict().items():
            member = {**result.params, **result.buffers}[name][1, fold]
            torch.testing.assert_close(member, value, rtol=0, atol=1e-10, msg=name)
        held_x, held_y = x[held[fold]], y[held[fold]]
        torch.testing.assert_close(
            result.fold_val_loss[1, fold], eval_loss(reference, held_x, held_y), rtol=0, atol=1e-10
        )
    # the held-out fold's values never reach its member: change them, fold 0 stays bit-identical
    changed = x.clone()
    changed[held[0]] = 100.0
    again = sweep_cnn(model, [0.0, 2.0], (changed, y), folds=3, batch_size=batch_size, steps=4)
    for name, leaf in {**result.params, **result.buffers}.items():
        other = {**again.params, **again.buffers}[name]
        assert torch.equal(leaf[:, 0], other[:, 0]), name
    assert not torch.equal(
        result.buffers["1.running_mean"][:, 1], again.buffers["1.running_mean"][:, 1]
    )


def test_folds_of_unequal_size_with_batchnorm_are_refused_before_anything_changes():
    x, y = images(50)
    model = cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['1'\] in train mode.*equal size.*\[33, 33, 34\]"):
        sweep_cnn(model, [0.0, 1.0], (x, y), folds=3)
    assert_bit_identical(model, before)
    # a model without BatchNorm keeps the shared weighted batch
    plain = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).double()
    result = sweep_cnn(plain, [0.0, 1.0], (x, y), folds=3)
    assert result.fold_val_loss.shape == (2, 3)


@pytest.mark.parametrize("folds", [None, 3])
@pytest.mark.slow
def test_flat_sweep_with_buffers_equals_the_per_leaf_sweep(folds):
    x, y = images()
    model = cnn()
    data = (
        dict(train=(x, y), folds=folds)
        if folds
        else dict(train=(x[:32], y[:32]), val=(x[32:], y[32:]))
    )
    per_leaf = sweep_cnn(model, [0.0, 1.0], **data)
    flat = sweep_cnn(model, [0.0, 1.0], flat=True, **data)
    for name, leaf in {**per_leaf.params, **per_leaf.buffers}.items():
        torch.testing.assert_close({**flat.params, **flat.buffers}[name], leaf, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_frozen_parameters_stay_bit_identical_in_sweep():
    x, y = images()
    model = cnn()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    result = sweep_cnn(model, [0.0, 5.0], (x[:32], y[:32]), (x[32:], y[32:]))
    assert "0.weight" not in result.params and torch.equal(model[0].weight, frozen)
    assert torch.equal(result.best_state_dict["0.weight"], frozen)
    batches = fr.sweep_data.sample_batches(32, 8, 6, seed=2, device=CPU)
    reference = torch_loop(model, 5.0, batches, x[:32], y[:32])
    for name, value in reference.state_dict().items():
        member = {**result.params, **result.buffers}.get(
            name, frozen[None].expand(2, -1, -1, -1, -1)
        )
        torch.testing.assert_close(member[1], value, rtol=0, atol=1e-10, msg=name)
    refit = result.refit(steps=2)
    assert torch.equal(refit["0.weight"], frozen)
    everything_frozen = cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sweep_cnn(everything_frozen, [0.1], (x, y), (x, y))
    with pytest.raises(ValueError, match="frozen"):
        fr.sweep(model, F.cross_entropy, fr.adamw(lr=0.1), [0.1], train=(x, y), val=(x, y),
                 hyperparameter="weight_decay", init=fr.stack([dict(model.named_parameters())]),
                 compile=False, progress=False)  # fmt: skip


@pytest.mark.slow
def test_ensemble_step_with_buffers_and_frozen_members_equals_torch_optim_loops():
    x, y = images()
    model = cnn()
    model[1].bias.requires_grad_(False)
    opt = fr.adamw(lr=0.05)
    strengths = torch.tensor([0.0, 3.0], dtype=torch.float64)
    # the detach recipe keeps the frozen bias in members: it gets no gradient, no decay
    members = fr.stack([{k: v.detach() for k, v in model.named_parameters()}] * 2)
    buffers = fr.stack([dict(model.named_buffers())] * 2)
    states = fr.stack([opt.init(m) for m in fr.unstack(members)])
    step = fr.ensemble_step(model, F.cross_entropy, opt, hyperparameter="weight_decay")
    with pytest.raises(ValueError, match=r"\['1'\] in train mode.*buffers="):
        step(members, states, strengths, x[:8], y[:8])
    batches = [torch.arange(i, i + 8) for i in range(0, 40, 8)]
    for index in batches:
        members, states, _, buffers = step(
            members, states, strengths, x[index], y[index], buffers=buffers
        )
    assert torch.equal(members["1.bias"], fr.stack([model[1].bias.detach()] * 2))
    for i, strength in enumerate(strengths.tolist()):
        reference = torch_loop(model, strength, batches, x, y)
        for name, value in reference.state_dict().items():
            member = {**members, **buffers}[name][i]
            torch.testing.assert_close(member, value, rtol=0, atol=1e-10, msg=name)


def test_ensemble_step_randomness_same_gives_equal_members_the_same_masks():
    x, y = images()
    model = cnn(dropout=0.5).eval()
    model[3].train()  # dropout only
    params, _ = fr.split_module(model)
    opt = fr.sgd(lr=0.1)
    members = fr.stack([params] * 2)
    states = fr.stack([opt.init(params)] * 2)
    strengths = torch.tensor([0.1, 0.1])
    for randomness, equal in (("same", True), ("different", False)):
        step = fr.ensemble_step(model, F.cross_entropy, opt, penalty=fr.penalties.l2,
                                randomness=randomness)  # fmt: skip
        out, _, _ = step(members, states, strengths, x, y)
        # Equal up to rounding: a conv of vmapped weights is a grouped conv, whose CPU
        # kernel rounds each group (member) differently by an ulp or so.
        gap = (out["5.weight"][0] - out["5.weight"][1]).abs().max()
        assert (gap < 1e-12) == equal, (randomness, gap)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()


@pytest.mark.slow
def test_bert_sweep_reads_model_output_logits_and_matches_a_torch_loop():
    model = tiny_bert()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(1, 20, (24, 6), generator=generator)
    y = (x[:, 0] > 10).long()
    loss_fn = lambda output, target: F.cross_entropy(output.logits, target)  # noqa: E731
    before = snapshot(model)
    # SGD: a key bias's gradient is 0 in exact arithmetic (softmax ignores shifts), and
    # Adam would scale the rounding noise up to steps of size lr.
    optimizer = fr.sgd(lr=0.1, momentum=0.9)
    result = fr.sweep(model, loss_fn, optimizer, [0.0, 1.0], train=(x[:16], y[:16]),
                      val=(x[16:], y[16:]), hyperparameter="weight_decay", steps=3,
                      compile=False, progress=False)  # fmt: skip
    assert_bit_identical(model, before)
    assert result.val_accuracy is not None and result.val_accuracy.shape == (2,)
    reference = torch_loop(
        model, 1.0, [torch.arange(16)] * 3, x, y, lr=0.1, loss_fn=loss_fn, sgd=True
    )
    for name, value in reference.named_parameters():
        torch.testing.assert_close(result.params[name][1], value.detach(), rtol=0, atol=1e-10)
    reference.eval()
    with torch.no_grad():
        logits = reference(x[16:]).logits
    accuracy = (logits.argmax(-1) == y[16:]).double().mean()
    torch.testing.assert_close(result.val_accuracy[1].double(), accuracy)
    copy.deepcopy(model).load_state_dict(result.best_state_dict, strict=True)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(36, 3).double()

    def forward(self, x):
        scores = self.linear(x.flatten(1))
        return {"scores": scores, "norms": scores.norm(dim=1)}


def test_dict_and_tuple_outputs_report_accuracy_where_logits_says():
    x, y = images()
    train, val = (x[:32], y[:32]), (x[32:], y[32:])
    model = DictOutput()
    loss_fn = lambda out, t: F.cross_entropy(out["scores"], t)  # noqa: E731
    common = dict(train=train, val=val, hyperparameter="weight_decay", steps=2,
                  compile=False, progress=False)  # fmt: skip
    unnamed = fr.sweep(model, loss_fn, fr.adamw(lr=0.1), [0.0, 1.0], **common)
    assert unnamed.val_accuracy is None  # no tensor output, no "logits": no accuracy
    named = fr.sweep(model, loss_fn, fr.adamw(lr=0.1), [0.0, 1.0], logits="scores", **common)
    with torch.no_grad():
        member = {k: v[1] for k, v in named.params.items()}
        scores = torch.func.functional_call(model, member, (val[0],))["scores"]
    torch.testing.assert_close(named.val_accuracy[1], (scores.argmax(-1) == val[1]).float().mean())
    # a tuple output: logits by index
    pair = lambda out, t: F.cross_entropy(out[0], t)  # noqa: E731
    tupled = nn.Sequential(model.linear.__class__(36, 3).double())
    tupled.forward = lambda x: (tupled[0](x.flatten(1)), x.sum())  # type: ignore[method-assign]
    by_index = fr.sweep(tupled, pair, fr.adamw(lr=0.1), [0.0, 1.0], logits=0, **common)
    assert by_index.val_accuracy.shape == (2,)
    # folds need per-sample losses of the dict: each sample as a batch of one
    common.update(val=None, train=(x, y), folds=3)
    folded = fr.sweep(model, loss_fn, fr.adamw(lr=0.1), [0.0, 1.0], logits="scores", **common)
    assert folded.fold_val_accuracy.shape == (2, 3)
    member = {k: v[1, 2] for k, v in folded.params.items()}
    held = fr.sweep_data.kfold_masks(48, 3)[2]
    with torch.no_grad():
        scores = torch.func.functional_call(model, member, (x[held],))["scores"]
    torch.testing.assert_close(folded.fold_val_loss[1, 2], F.cross_entropy(scores, y[held]))
    with pytest.raises(ValueError, match="logits='nothing' finds nothing"):
        fr.sweep(model, loss_fn, fr.adamw(lr=0.1), [0.0], logits="nothing", **common)


@pytest.mark.slow
def test_a_compiled_module_is_unwrapped():
    x, y = images()
    model = cnn()
    result = sweep_cnn(torch.compile(model), [0.0, 1.0], (x[:32], y[:32]), (x[32:], y[32:]))
    assert sorted(result.params) == sorted(n for n, _ in model.named_parameters())
    model.load_state_dict(result.best_state_dict, strict=True)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_batchnorm_sweep_equals_the_eager_one():
    x, y = images()
    model = cnn()
    eager = sweep_cnn(model, [0.0, 1.0], (x[:32], y[:32]), (x[32:], y[32:]))
    compiled = sweep_cnn(model, [0.0, 1.0], (x[:32], y[:32]), (x[32:], y[32:]), compile=True)
    for name, leaf in {**eager.params, **eager.buffers}.items():
        torch.testing.assert_close(
            {**compiled.params, **compiled.buffers}[name], leaf, rtol=0, atol=1e-10
        )
