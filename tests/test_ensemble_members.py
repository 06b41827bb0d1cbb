"""K members of one model (functorch_reg/ensemble/members.py): init_ensemble draws
reproducible independent members; member_step, vmapped, equals each member stepped alone
(plain Python loop, float64), with shared batches, fold weights or each member's own rows;
ensemble_step over flat buffers equals it per leaf; the old sweep_step names still import."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import functorch_reg as fr

from .test_ensemble import classification_data, small_model


def test_init_ensemble_is_reproducible_and_independent():
    model = small_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    a = fr.init_ensemble(model, 3, seed=7)
    b = fr.init_ensemble(model, 3, seed=7)
    c = fr.init_ensemble(model, 3, seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert not torch.equal(a["0.weight"][0], a["0.weight"][1])
    torch.testing.assert_close(dict(model.named_parameters()), before, rtol=0, atol=0)


def test_flat_ensemble_step_updates_stacked_buffers_like_per_leaf_members():
    train, _ = classification_data()
    model = small_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    members = fr.init_ensemble(model, 3, seed=1)
    layout = fr.flat.pack(params)
    buffers = fr.stack([layout.pack_like(m) for m in fr.unstack(members)])
    assert buffers["float32"].shape == (3, layout.buffers["float32"].shape[0])
    opt = fr.sgd(lr=0.1, momentum=0.9)
    strengths = torch.tensor([0.0, 0.1, 1.0])
    kwargs = dict(penalty=fr.penalties.l2)
    step = fr.ensemble_step(model, torch.nn.functional.cross_entropy, opt, **kwargs)
    flat_step = fr.ensemble_step(
        model, torch.nn.functional.cross_entropy, opt, flat=layout, **kwargs
    )
    states = fr.stack([opt.init(m) for m in fr.unstack(members)])
    flat_states = fr.stack([opt.init(b) for b in fr.unstack(buffers)])
    for _ in range(5):
        members, states, losses = step(members, states, strengths, *train)
        buffers, flat_states, flat_losses = flat_step(buffers, flat_states, strengths, *train)
        torch.testing.assert_close(flat_losses, losses)
    views = layout.unpack(buffers)
    for name, leaf in members.items():
        torch.testing.assert_close(views[name], leaf, rtol=1e-6, atol=1e-7)


def one_member_alone(model, optimizer, strength, x, y, steps):
    """The reference: one member, eager, a plain loop on its own rows, float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = optimizer.init(params)

    def objective(params):
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return loss + strength * fr.penalties.l2(params)

    for _ in range(steps):
        params, state = optimizer.step(params, grad(objective)(params), state)
    return params


@pytest.mark.parametrize("samples", ["shared", "weighted", "gathered"])
def test_member_step_equals_each_member_stepped_alone_on_its_rows(samples):
    (x, y), _ = classification_data()
    x = x.double()
    model = small_model().double()
    optimizer = fr.sgd(lr=0.2, momentum=0.5)
    loss_fn = torch.nn.functional.cross_entropy
    parts = fr.ensemble.model_parts(model)
    sample_losses = fr.sweep_data.per_sample(loss_fn, model(x[:2]).detach(), y[:2])
    step = fr.ensemble.member_step(
        parts,
        loss_fn,
        optimizer,
        {"penalty": fr.penalties.l2},
        samples=samples,
        sample_losses=sample_losses,
    )
    strengths = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    # member k trains without the k-th quarter of the rows (its held-out fold)
    rows = [torch.cat([torch.arange(16 * k), torch.arange(16 * (k + 1), 64)]) for k in range(3)]
    weights = torch.zeros(3, 64, dtype=torch.float64)
    for k, kept in enumerate(rows):
        weights[k, kept] = 1.0
    extra = {"shared": None, "weighted": weights, "gathered": torch.stack(rows)}[samples]
    members = fr.stack([dict(parts.params)] * 3)
    states = fr.stack([optimizer.init(dict(parts.params))] * 3)
    for _ in range(4):
        members, _, states, losses = step(members, {}, states, {"penalty": strengths}, x, y, extra)
    assert losses.shape == (3,)
    for k in range(3):
        kept = torch.arange(64) if samples == "shared" else rows[k]
        expected = one_member_alone(model, optimizer, strengths[k], x[kept], y[kept], 4)
        torch.testing.assert_close(fr.unstack(members)[k], expected, rtol=1e-12, atol=1e-12)


def test_model_parts_splits_trainable_frozen_and_buffers_keyed_as_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    parts = fr.ensemble.model_parts(model)
    assert sorted(parts.params) == ["0.weight", "1.bias", "1.weight"]
    assert sorted(parts.frozen) == ["0.bias"]
    assert sorted(parts.buffers) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    whole = parts.state_dict(parts.params, parts.buffers)
    assert list(whole) == list(model.state_dict())
    assert parts.batch_norms_in_training() == ["1"]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fr.ensemble.model_parts(frozen)


def test_the_old_sweep_step_module_names_the_package_functions():
    import functorch_reg.sweep_step as old

    assert old.vmapped_step is fr.ensemble.member_step
    assert old.model_parts is fr.ensemble.model_parts
    assert old.ModelParts is fr.ensemble.ModelParts
    assert old.train is fr.ensemble.loop.train
    assert old.probe is fr.ensemble.grid.probe
    for name in old.__all__:
        assert getattr(old, name) is not None
    assert fr.sweep_step is old
