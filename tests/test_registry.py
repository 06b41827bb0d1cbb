"""The properties every update rule shares, run over the registry in tests/optimizers.py:
``step`` and ``step_`` agree bit for bit; a checkpoint round trip resumes bit for bit; a
raising ``step_`` changes nothing; vmap over a hyperparameter equals a loop; and the rule
follows its reference implementation (torch.optim, torch.optim.Muon, lion_pytorch,
schedulefree) step for step."""

from __future__ import annotations

import io

import optree
import pytest
import torch
from torch.func import vmap

import functorch_reg as fr

from .optimizers import OPTIMIZERS, OptimizerInfo, grads_for, params_for

registry = pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])


def copy(tree):
    return optree.tree_map(
        lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf,
        tree,
        none_is_leaf=True,
    )


def assert_identical(a, b):
    """Same structure, and every tensor equal bit for bit (same dtype, NaN where NaN)."""
    leaves_a, spec_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, spec_b = optree.tree_flatten(b, none_is_leaf=True)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
        else:
            assert x == y


def run(opt: fr.Optimizer, params: dict, state, steps: range, *, in_place: bool = False):
    for step in steps:
        grads = grads_for(params, step)
        if in_place:
            opt.step_(params, grads, state)
        else:
            params, state = opt.step(params, grads, state)
    return params, state


@registry
def test_step_and_step_in_place_agree_bit_for_bit(info: OptimizerInfo):
    opt = info.make()
    params = params_for(info)
    pure_params, pure_state = run(opt, params, opt.init(params), range(6))
    params_, state_ = copy(params), opt.init(params)
    run(opt, params_, state_, range(6), in_place=True)
    assert_identical(params_, pure_params)
    assert_identical(state_, pure_state)


@registry
def test_state_dict_round_trip_resumes_bit_for_bit(info: OptimizerInfo):
    opt = info.make()
    params = params_for(info)
    params, state = run(opt, params, opt.init(params), range(5))
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": fr.state_dict(state)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = fr.load_state_dict(opt, checkpoint["params"], checkpoint["optimizer"])
    assert_identical(resumed, state)
    params, state = run(opt, params, state, range(5, 10))
    resumed_params, resumed = run(opt, checkpoint["params"], resumed, range(5, 10))
    assert_identical(resumed_params, params)
    assert_identical(resumed, state)


@registry
def test_a_raising_step_in_place_changes_nothing(info: OptimizerInfo):
    opt = info.make()
    params = params_for(info)
    params, state = run(opt, params, opt.init(params), range(2))
    before_params, before_state = copy(params), copy(state)
    grads = grads_for(params, 2)
    last = list(grads)[-1]  # the last leaf: the leaves before it pass every check
    grads[last] = grads[last].reshape(-1)[:1]
    with pytest.raises((ValueError, RuntimeError), match=last.replace(".", r"\.")):
        opt.step_(params, grads, state)
    assert_identical(params, before_params)
    assert_identical(state, before_state)


@registry
def test_vmap_over_a_hyperparameter_equals_a_loop(info: OptimizerInfo):
    opt = info.make(**info.vmap_options)
    name, values = info.vmapped
    members = [params_for(info, seed=i) for i in range(len(values))]
    states = []
    for i, member in enumerate(members):  # one step first: state past its initial values
        member_state = opt.init(member)
        members[i], member_state = opt.step(member, grads_for(member, i), member_state)
        states.append(member_state)
    grads = [grads_for(member, 10 + i) for i, member in enumerate(members)]
    hyperparameters = torch.tensor(values)

    def one(params, grads, state, value):
        return opt.step(params, grads, state, **{name: value})

    batched = vmap(one)(fr.stack(members), fr.stack(grads), fr.stack(states), hyperparameters)
    for i, unbatched in enumerate(fr.unstack(batched)):
        torch.testing.assert_close(
            unbatched, one(members[i], grads[i], states[i], hyperparameters[i])
        )


def max_relative_error(ours: dict, reference: list[torch.Tensor]) -> float:
    return max(
        ((mine - ref.detach()).abs().max() / ref.detach().abs().max()).item()
        for mine, ref in zip(ours.values(), reference, strict=True)
    )


@registry
def test_follows_the_reference_implementation(info: OptimizerInfo):
    opt = info.make()
    params = params_for(info)
    torch_params = [torch.nn.Parameter(leaf.clone()) for leaf in params.values()]
    reference = info.build_reference(torch_params)
    state = opt.init(params)
    for step in range(info.steps):
        grads = grads_for(params, step)
        for leaf, grad in zip(torch_params, grads.values(), strict=True):
            leaf.grad = grad.clone()
        reference.step()
        params, state = opt.step(params, grads, state)
    assert max_relative_error(params, torch_params) <= info.tolerance
    assert max_relative_error(params, list(params_for(info).values())) > 1e-3  # it moved
