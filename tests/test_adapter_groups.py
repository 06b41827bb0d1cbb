"""The storages behind TorchOptimizer's param groups (functorch_reg._adapter_groups),
exercised directly: LeafGroup (per-param entries) and FlatGroup (one buffer per group)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import functorch_reg as fr
from functorch_reg._adapter_groups import FlatGroup, GroupState, LeafGroup, check_flat_rule
from functorch_reg.optim.base import layout

RULES = {
    "adamw": lambda: fr.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd": lambda: fr.sgd(lr=1e-2, momentum=0.9, weight_decay=1e-3),
    "lion": lambda: fr.lion(lr=1e-3),
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)
    ).double()
    net[2].bias.requires_grad_(False)  # frozen: never stepped, no state
    return net


def make(kind: type, optimizer: fr.Optimizer, net: torch.nn.Module) -> GroupState:
    names, params = zip(*net.named_parameters(), strict=True)
    labels = [f"param {name!r}" for name in names]
    return kind(optimizer, list(params), list(names), labels, "param group 0")


def backward(net: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    net(x).square().mean().backward()


def trainable(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("kind", [LeafGroup, FlatGroup])
def test_gather_steps_as_the_functional_optimizer(rule, kind):
    net = model()
    optimizer = RULES[rule]()
    group, state = make(kind, optimizer, net), defaultdict(dict)
    params = {name: p.detach().clone() for name, p in trainable(net).items()}
    functional = optimizer.init(params)
    for t in range(4):
        net.zero_grad()
        backward(net, t)
        grads = {name: p.grad.clone() for name, p in trainable(net).items()}
        params, functional = optimizer.step(params, grads, functional)
        with torch.no_grad():
            gathered = group.gather(state)
            assert gathered is not None
            gathered.step_(gathered.params, gathered.grads, gathered.state)
    for name, p in trainable(net).items():
        torch.testing.assert_close(p.detach(), params[name], rtol=1e-12, atol=1e-14)
    # Each param's torch.optim entry holds the functional state's values.
    fields = layout(functional)
    for i, (name, p) in enumerate(sorted(trainable(net).items())):
        entry = state[p]
        for field in fields.slots:
            torch.testing.assert_close(entry[field], getattr(functional, field)[name])
        if fields.table is not None:
            torch.testing.assert_close(entry[fields.table], getattr(functional, fields.table)[i])
        assert torch.equal(entry[fields.counter], functional.skipped)
    assert net[2].bias not in state  # the frozen param has no state


def test_leaf_group_table_rows_are_views_and_are_restacked_after_a_load():
    net = model()
    group, state = make(LeafGroup, fr.adam(lr=1e-2), net), defaultdict(dict)
    backward(net, 0)
    gathered = group.gather(state)
    assert gathered is not None
    table = gathered.state.beta_powers
    # Row order follows the flattened (name-sorted) tree.
    order = sorted(name for name, _ in net.named_parameters())
    assert order[4] == "2.bias"
    for name in order[:4] + order[5:]:
        assert state[dict(net.named_parameters())[name]]["beta_powers"]._base is table
    gathered.step_(gathered.params, gathered.grads, gathered.state)
    assert state[net[0].weight]["beta_powers"].tolist() == pytest.approx([0.9, 0.999])
    # What load_state_dict does: entries replaced by copies; gather stacks a new table
    # from their values and makes them its rows again.
    for p in list(state):
        state[p] = {key: value.clone() for key, value in state[p].items()}
    again = group.gather(state)
    assert again is not None and again.state.beta_powers is not table
    stepped = [i for i, name in enumerate(order) if name != "2.bias"]  # frozen: unused row
    assert torch.equal(again.state.beta_powers[stepped], table[stepped])
    assert state[net[0].weight]["beta_powers"]._base is again.state.beta_powers


def test_leaf_group_without_gradients_gathers_nothing_and_frozen_params_get_none():
    net = model()
    group, state = make(LeafGroup, fr.adamw(lr=1e-2), net), defaultdict(dict)
    assert group.gather(state) is None and not state
    net[0].weight.grad = torch.ones_like(net[0].weight)
    gathered = group.gather(state)
    assert gathered is not None
    assert list(state) == [net[0].weight]
    assert gathered.state.exp_avg["0.bias"] is None  # no gradient, no state: left alone


@pytest.mark.parametrize("kind", [LeafGroup, FlatGroup])
def test_zero_grad(kind):
    net = model()
    group = make(kind, fr.sgd(lr=0.1), net)
    backward(net, 0)
    group.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in trainable(net).values())
    backward(net, 1)
    group.zero_grad(set_to_none=True)
    if kind is LeafGroup:
        assert all(p.grad is None for p in net.parameters())
    else:  # the gradients stay views of the zeroed buffer
        assert isinstance(group, FlatGroup)
        assert not group.grads.any()
        ptr = group.grads.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == ptr for p in trainable(net).values())


def test_flat_group_packs_trainable_params_only_and_refuses_a_requires_grad_change():
    net = model()
    group = make(FlatGroup, fr.adamw(lr=1e-2, weight_decay=0.1), net)
    assert isinstance(group, FlatGroup)
    assert group.members == list(trainable(net).values())
    assert group.params.numel() >= sum(p.numel() for p in group.members)  # aligned
    ptr = group.params.untyped_storage().data_ptr()
    assert net[0].weight.untyped_storage().data_ptr() == ptr
    assert net[2].bias.untyped_storage().data_ptr() != ptr
    group.check()
    before = group.params.clone()
    net[2].bias.requires_grad_(True)
    with pytest.raises(ValueError, match="param '2.bias' changed requires_grad"):
        group.check()
    assert torch.equal(group.params, before)


def test_flat_group_refresh_copies_repointed_params_back_in_and_refuses_a_cast():
    net = model()
    group = make(FlatGroup, fr.sgd(lr=0.1), net)
    assert isinstance(group, FlatGroup)
    net[0].weight.data = torch.full_like(net[0].weight, 0.5)  # load_state_dict(assign=True)
    net[0].weight.grad = None
    group.refresh()
    ptr = group.params.untyped_storage().data_ptr()
    assert net[0].weight.untyped_storage().data_ptr() == ptr
    assert torch.equal(net[0].weight, torch.full_like(net[0].weight, 0.5))
    assert net[0].weight.grad is not None
    net.float()
    with pytest.raises(ValueError, match="make the optimizer after moving or casting"):
        group.refresh()


def test_flat_group_of_frozen_params_only_has_no_buffer():
    layer = torch.nn.Linear(2, 2).requires_grad_(False)
    group = FlatGroup(fr.sgd(lr=0.1), list(layer.parameters()), None, ["a", "b"], "param group 3")
    assert group.members == [] and group.gather(defaultdict(dict)) is None
    group.zero_grad(set_to_none=True)
    group.check_saved({})
    with pytest.raises(ValueError, match="param group 3 has no trainable params"):
        group.params  # noqa: B018


@pytest.mark.parametrize("kind", [LeafGroup, FlatGroup])
def test_check_entry_names_the_param_and_the_field(kind):
    net = model()
    group = make(kind, fr.adam(lr=1e-2), net)
    good = group.fresh_entry(net[0].weight)
    group.check_entry(0, good)
    with pytest.raises(ValueError, match=r"param '0.weight' has keys \['exp_avg'\], expected"):
        group.check_entry(0, {"exp_avg": good["exp_avg"]})
    bad = {**good, "exp_avg_sq": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"exp_avg_sq of param '0.weight' should be"):
        group.check_entry(0, bad)


def test_check_saved_a_flat_group_steps_its_params_together():
    net = model()
    flat, leaf = make(FlatGroup, fr.adam(lr=1e-2), net), make(LeafGroup, fr.adam(lr=1e-2), net)
    entries = {p: flat.fresh_entry(p) for p in trainable(net).values()}
    flat.check_saved(entries)
    partial = {p: e for p, e in entries.items() if p is not net[1].weight}
    leaf.check_saved(partial)  # per param, any subset may have state
    with pytest.raises(ValueError, match="param '1.weight' has no state while others"):
        flat.check_saved(partial)
    entries[net[1].bias]["beta_powers"] = torch.tensor([0.81, 0.998], dtype=torch.float64)
    with pytest.raises(ValueError, match="param '1.bias' differs from the first"):
        flat.check_saved(entries)


def test_check_flat_rule_probes_a_rule_without_for_flat():
    check_flat_rule(fr.adamw(mask=fr.select.weights()))  # translated per group later
    with pytest.raises(ValueError, match="this mask leaves it out"):
        check_flat_rule(fr.muon(lr=0.1, adam=fr.adamw(mask=fr.select.weights())))
    check_flat_rule(fr.muon(lr=0.1, adam=fr.adamw()))
