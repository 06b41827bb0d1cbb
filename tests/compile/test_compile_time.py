"""The compiled path's contracts that compile-time work must keep (issue 21, item 3):
under ``torch.compile`` a dict of tensors flattens to optree's leaves, names and
structure; the compiled step equals eager and compiles once while lr and decay change;
the library's own compiled steps say "compiling" on first use; TensorList answers
Python's protocol lookups as Python expects (Dynamo asks for ``__dict__``).

Dynamo alone (``backend="eager"``) is enough to check what is traced, so most of these
tests build no C++ kernel."""

from __future__ import annotations

import logging

import optree
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import functorch_reg as fr
from functorch_reg.optim._foreach import NotElementwiseError, TensorList
from functorch_reg.tree import flatten, matching_leaves, spec_names

pytestmark = pytest.mark.compile


def tree() -> dict[str, torch.Tensor | None]:
    # Keys out of order and a None leaf: the leaves come sorted, unflatten restores order.
    return {
        "head.weight": torch.randn(3, 4),
        "body.0.bias": torch.randn(4),
        "frozen": None,
        "body.0.weight": torch.randn(4, 4),
    }


def traced(function):
    """``function`` traced by Dynamo, run on the graph as is (no Inductor)."""
    counter = CompileCounter()
    return torch.compile(function, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize(
    "make",
    [tree, lambda: {"encoder": tree(), "scale": torch.ones(())}],
    ids=["flat dict", "nested dict (optree)"],
)
def test_flatten_under_compile_gives_optree_leaves_names_and_structure(make):
    params = make()
    leaves, spec = optree.tree_flatten(params, none_is_leaf=True)

    def structure(p):
        got, got_spec = flatten(p)
        doubled = [None if x is None else 2 * x for x in got]
        return got, spec_names(got_spec), got_spec.unflatten(doubled)

    compiled, counter = traced(structure)
    got, names, rebuilt = compiled(params)
    assert counter.frame_count == 1
    assert names == fr.leaf_names(params)
    assert len(got) == len(leaves)
    for a, b in zip(got, leaves, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    expected = spec.unflatten([None if x is None else 2 * x for x in leaves])
    assert optree.tree_structure(rebuilt, none_is_leaf=True) == spec
    assert list(rebuilt) == list(expected), "unflatten keeps the dict's own key order"
    for a, b in zip(
        optree.tree_leaves(rebuilt, none_is_leaf=True),
        optree.tree_leaves(expected, none_is_leaf=True),
        strict=True,
    ):
        assert (a is None and b is None) or torch.equal(a, b)


def test_matching_leaves_under_compile_still_names_the_missing_leaf():
    params = tree()
    grads = {k: v for k, v in params.items() if k != "head.weight"}

    def check(p, g):
        leaves, spec = flatten(p)
        return matching_leaves(leaves, spec, g)

    with pytest.raises(ValueError, match="head.weight"):
        check(params, grads)
    compiled, _ = traced(check)
    # Dynamo re-raises the traced ValueError from the frame it could not compile.
    with pytest.raises(Exception, match="head.weight"):
        compiled(params, grads)
    # A flat dict against a nested one with the same leaf names is still no match.
    nested = {"body": {"0": {"bias": None, "weight": None}}, "frozen": None, "head": {}}
    with pytest.raises(Exception, match="do not match"):
        compiled(params, nested)


def test_compiled_step_equals_eager_and_compiles_once_while_lr_and_decay_change():
    torch.manual_seed(0)
    params = {
        "w": torch.randn(5, 3, dtype=torch.float64),
        "b": torch.randn(3, dtype=torch.float64),
        "scale": torch.randn((), dtype=torch.float64),
    }
    eager = {k: v.clone() for k, v in params.items()}
    opt = fr.adamw(lr=1e-2, weight_decay=1e-2)
    state, eager_state = opt.init(params), opt.init(eager)
    step, counter = traced(opt.step_)
    for i in range(4):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        hyper = {
            "lr": torch.tensor(1e-2 / (i + 1), dtype=torch.float64),
            "weight_decay": torch.tensor(0.1 * i, dtype=torch.float64),
        }
        step(params, grads, state, **hyper)
        opt.step_(eager, grads, eager_state, **hyper)
    assert counter.frame_count == 1, "no recompile when lr and weight_decay change"
    # The traced per-leaf rule runs the eager grouped rule's kernels: equal to the bit.
    for k in params:
        assert torch.equal(params[k], eager[k]), k
    for got, want in zip(
        optree.tree_leaves(state, none_is_leaf=True),
        optree.tree_leaves(eager_state, none_is_leaf=True),
        strict=True,
    ):
        assert got is None or torch.equal(got, want)


@pytest.mark.slow
def test_a_compiled_torch_optimizer_says_it_is_compiling_once(caplog):
    model = torch.nn.Linear(3, 2)
    optimizer = fr.TorchOptimizer(
        model.parameters(), fr.sgd(lr=0.1), compile=True, compile_options={"backend": "eager"}
    )
    with caplog.at_level(logging.INFO, logger="functorch_reg"):
        for _ in range(3):
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
    messages = [r.getMessage() for r in caplog.records if r.name == "functorch_reg"]
    assert len(messages) == 2, messages  # before and after the first step only
    assert messages[0].startswith("TorchOptimizer: compiling")
    assert messages[1].startswith("TorchOptimizer: compiled in")


def test_tensor_list_answers_dunder_lookups_as_python_does():
    """Dynamo (and copy, pickle, NumPy) probe dunders such as ``__dict__`` with
    ``hasattr``, which only catches AttributeError; per-leaf metadata still raises."""
    x = TensorList([torch.ones(2), torch.zeros(3)])
    assert not hasattr(x, "__dict__")
    assert not hasattr(x, "__array_interface__")
    with pytest.raises(NotElementwiseError):
        _ = x.shape
    assert x.dtype == torch.float32
