"""``step_`` writing a donating rule's results straight into the params and state (see
``functorch_reg.optim.base.build``): no copy back once a group has run, the same values
as ``step``, and a raising ``step_`` still changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

import functorch_reg as fr
from functorch_reg.optim import base
from functorch_reg.optim._foreach import TensorList, layout_of

CONFIGS: dict[str, Callable[[], fr.Optimizer]] = {
    "adam": lambda: fr.adam(lr=1e-2),
    "adam_coupled_amsgrad": lambda: fr.adam(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adamw": lambda: fr.adamw(lr=1e-2, weight_decay=0.1),
    "adamw_cautious_maximize": lambda: fr.adamw(
        lr=1e-2, weight_decay=0.1, cautious_decay=True, maximize=True
    ),
    "sgd": lambda: fr.sgd(lr=0.1),
    "sgd_momentum_dampening": lambda: fr.sgd(lr=0.1, momentum=0.9, dampening=0.3),
    "sgd_nesterov_decay": lambda: fr.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd_decoupled": lambda: fr.sgd(lr=0.1, momentum=0.9, weight_decay=0.1, decoupled=True),
}

# The configurations whose every new value comes from a fused method (amsgrad's maximum,
# the cautious mask and SGD's separate decay make a new tensor, copied in).
ALL_IN_PLACE = {"adam", "adamw", "sgd", "sgd_momentum_dampening", "sgd_nesterov_decay"}


def make_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "b.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "b.bias": torch.randn(2, generator=g, dtype=torch.float64),
    }


def grads_for(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def clone(tree: Any) -> Any:
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_donated_step_in_place_equals_step_and_copies_nothing(name, lr_tensor, monkeypatch):
    opt = CONFIGS[name]()
    params = make_params()
    pure_params, pure_state = clone(params), opt.init(params)
    state = opt.init(params)
    copies: list[int] = []
    original = base._copy
    monkeypatch.setattr(base, "_copy", lambda t, v: copies.append(len(t)) or original(t, v))
    for step in range(4):
        grads = grads_for(params, step)
        # Tensor hyperparameters (a schedule's, the benchmark's) as 0-d operands on the
        # left of a product (weight_decay * p) keep the in-place path too.
        hyperparams: dict[str, Any] = (
            {"lr": torch.tensor(0.05 / (step + 1)), "weight_decay": torch.tensor(0.05)}
            if lr_tensor
            else {"lr": 0.05}
        )
        pointers = [p.data_ptr() for p in params.values()]
        copies.clear()
        opt.step_(params, grads, state, **hyperparams)
        pure_params, pure_state = opt.step(pure_params, grads, pure_state, **hyperparams)
        assert [p.data_ptr() for p in params.values()] == pointers
        if step > 0 and name in ALL_IN_PLACE:
            # Every new value was written in place by the rule's fused methods.
            assert sum(copies) == 0, copies
    torch.testing.assert_close(params, pure_params, rtol=0, atol=0)
    torch.testing.assert_close(state, pure_state, rtol=0, atol=0)


def test_a_raising_step_in_place_after_donated_steps_changes_nothing():
    opt = fr.adamw(lr=1e-2)
    params = make_params()
    state = opt.init(params)
    for step in range(2):  # the groups run elementwise, then donated
        opt.step_(params, grads_for(params, step), state)
    before = clone((params, state))
    # A state slot that shares memory with a param: refused before any write.
    shared = dict(state.exp_avg)
    shared["a.bias"] = params["a.bias"]
    bad_state = state._replace(exp_avg=shared)
    with pytest.raises(ValueError, match="memory"):
        opt.step_(params, grads_for(params, 2), bad_state)
    torch.testing.assert_close((params, state), before, rtol=0, atol=0)


def test_an_override_that_makes_the_rule_raise_is_caught_before_any_write():
    opt = fr.sgd(lr=0.1)  # no momentum: no buffer in the state
    params = make_params()
    state = opt.init(params)
    for step in range(2):
        opt.step_(params, grads_for(params, step), state)
    before = clone((params, state))
    with pytest.raises(ValueError, match="momentum"):
        opt.step_(params, grads_for(params, 2), state, momentum=0.9)
    torch.testing.assert_close((params, state), before, rtol=0, atol=0)


def test_a_donated_list_is_written_by_one_fused_method_only():
    storage = [torch.ones(3), torch.ones(2)]
    x = TensorList(storage, layout=base.layout_of(storage))
    x.donated = True
    y = x.mul(2.0)  # into the storage
    assert y.tensors[0] is storage[0] and storage[0].tolist() == [2.0] * 3
    z = x.mul(3.0)  # the donation is used up: a new tensor, storage untouched
    assert z.tensors[0] is not storage[0] and storage[0].tolist() == [2.0] * 3
    w = x * 5.0  # operators never write a donated list
    assert w.tensors[0] is not storage[0] and storage[0].tolist() == [2.0] * 3


def test_after_a_failed_compile_the_step_still_writes_in_place_and_names_are_safe(monkeypatch):
    # A frame torch.compile could not trace leaves every later call's operands with one
    # more reference (torch 2.13, CPython 3.11); temporaries are measured per step, so
    # the in-place path survives it and a named operand is still never overwritten.
    def fails(tree: dict[str, torch.Tensor]) -> None:
        raise ValueError("not traced")

    with pytest.raises(Exception, match="not traced"):
        torch.compile(fails, backend="eager", fullgraph=True)({"w": torch.zeros(1)})
    a = TensorList([torch.ones(3), torch.ones(2)], layout_of([torch.ones(3), torch.ones(2)]))
    b = a * 2.0
    c = b + 1.0  # b is named: a new list, b unchanged
    assert [t.tolist() for t in b.tensors] == [[2.0] * 3, [2.0] * 2]
    assert [t.tolist() for t in c.tensors] == [[3.0] * 3, [3.0] * 2]
    test_donated_step_in_place_equals_step_and_copies_nothing("adam", False, monkeypatch)


def test_many_cache_blocks_keep_writing_in_place(monkeypatch):
    """A step of more cache blocks than the remembered layouts once held (256) still
    writes every block in place from the second step on, with step's values."""
    monkeypatch.setattr(base, "CACHE_BLOCK", 8)  # bytes: blocks of two 1-element leaves
    params = {f"w{i:03d}": torch.randn(1) for i in range(600)}  # 300 blocks
    pure_params, opt = clone(params), fr.adamw(lr=1e-2, weight_decay=0.1)
    state, pure_state = opt.init(params), opt.init(params)
    copies: list[int] = []
    original = base._copy
    monkeypatch.setattr(base, "_copy", lambda t, v: copies.append(len(t)) or original(t, v))
    for step in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        copies.clear()
        opt.step_(params, grads, state)
        pure_params, pure_state = opt.step(pure_params, grads, pure_state)
        if step > 0:
            assert sum(copies) == 0, sum(copies)
    torch.testing.assert_close((params, state), (pure_params, pure_state), rtol=0, atol=0)
