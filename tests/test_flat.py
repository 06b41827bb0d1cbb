"""The flat layout: packing, views, gradients, and equality with the per-leaf layout."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import grad

import functorch_reg as fr

from .conftest import mlp_params

GROUPS = {"decay": fr.select.weights(), "no_decay": fr.select.biases()}


def packed(device: str, dtype: torch.dtype = torch.float32):
    params = mlp_params(dtype, device)
    return params, fr.flat.pack(params, GROUPS)


def objective(params: dict, x: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return (hidden @ params["2.weight"].T + params["2.bias"]).square().mean()


def test_pack_copies_leaves_into_aligned_views(device):
    params, flat = packed(device)
    assert set(flat.buffers) == {"decay", "no_decay"}
    assert flat.leaves_of("decay") == ["0.weight", "2.weight"]
    for name, leaf in params.items():
        view = flat.params[name]
        assert torch.equal(view, leaf)
        assert view.untyped_storage().data_ptr() == flat.buffers[flat.slots[name].group].data_ptr()
        assert (view.data_ptr() - flat.buffers[flat.slots[name].group].data_ptr()) % 64 == 0
    # An in-place update of a buffer is visible through the views, and not in the input.
    flat.buffers["decay"].add_(1.0)
    assert torch.equal(flat.params["0.weight"], params["0.weight"] + 1)
    assert not torch.equal(flat.params["0.weight"], params["0.weight"])


def test_default_groups_follow_dtype_and_keep_non_floating_leaves():
    params = {"w": torch.ones(2, 2), "h": torch.ones(3, dtype=torch.float64), "n": torch.arange(3)}
    flat = fr.flat.pack(params)
    assert set(flat.buffers) == {"float32", "float64"}
    assert flat.params["n"] is params["n"]
    assert list(flat.params) == ["h", "n", "w"]


def test_gradient_through_unpack_is_flat_and_equals_the_per_leaf_gradient(device):
    params, flat = packed(device, torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    flat_grads = grad(lambda b: objective(flat.unpack(b), x))(flat.buffers)
    expected = flat.pack_like(grad(objective)(params, x))
    for group in flat.buffers:
        assert flat_grads[group].shape == flat.buffers[group].shape
        torch.testing.assert_close(flat_grads[group], expected[group], rtol=0, atol=1e-15)


def test_unpack_backward_is_one_concatenation():
    from torch.fx.experimental.proxy_tensor import make_fx

    _params, flat = packed("cpu")
    x = torch.randn(5, 4)
    graph = make_fx(grad(lambda b: objective(flat.unpack(b), x)))(flat.buffers)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("aten.cat.default") == len(flat.buffers)
    assert not any("slice_backward" in t or "index_put" in t for t in targets)


def test_unpack_of_stacked_buffers_gives_stacked_views(device):
    _params, flat = packed(device)
    stacked = fr.stack([flat.buffers, flat.pack_like({k: v * 2 for k, v in flat.params.items()})])
    views = flat.unpack(stacked)
    assert views["0.weight"].shape == (2, 6, 4)
    assert torch.equal(views["2.bias"][1], 2 * flat.params["2.bias"])


def test_pack_like_and_frozen_groups(device):
    params, flat = packed(device)
    grads = {name: torch.ones_like(leaf) for name, leaf in params.items()}
    buffers = flat.pack_like(grads)
    for name in params:
        assert torch.equal(flat.unpack(buffers)[name], grads[name])
    # padding stays zero
    assert buffers["decay"].sum() == sum(params[n].numel() for n in flat.leaves_of("decay"))
    frozen = flat.pack_like({**grads, "0.bias": None, "2.bias": None})
    assert frozen["no_decay"] is None
    with pytest.raises(ValueError, match="'0.bias' is None but other leaves of group 'no_decay'"):
        flat.pack_like({**grads, "0.bias": None})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: ({**p}, {"a": "*.weight", "b": "*.weight", "c": fr.select.biases()}),
            "two groups",
        ),
        (lambda p: ({**p}, {"w": fr.select.weights()}), "'0.bias' is in no group"),
        (lambda p: ({**p, "0.bias": p["0.bias"].double()}, {"all": None}), "mixes"),
        (lambda p: ({**p, "tied": p["0.weight"]}, {"all": None}), "share memory"),
        (lambda p: ({**p, "row": p["0.weight"][1]}, {"all": None}), "share memory"),
        (lambda p: ({"n": torch.arange(3)}, None), "no floating-point tensor"),
    ],
)
def test_pack_refuses_bad_layouts(make, message):
    params, groups = make(mlp_params())
    with pytest.raises(ValueError, match=message):
        fr.flat.pack(params, groups)


def test_unpack_refuses_buffers_of_another_layout():
    _params, flat = packed("cpu")
    other = fr.flat.pack({"w": torch.ones(100)}, {"decay": None})
    with pytest.raises(ValueError, match="groups"):
        flat.unpack(other.buffers)
    with pytest.raises(ValueError, match="buffer 'decay' should end in a dim of"):
        flat.unpack({"decay": torch.ones(5), "no_decay": flat.buffers["no_decay"]})


OPTIMIZERS = {
    "sgd": lambda mask: fr.sgd(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, mask=mask),
    "sgd_dampening": lambda mask: fr.sgd(lr=0.1, momentum=0.5, dampening=0.3, mask=mask),
    "sgd_prox": lambda mask: fr.sgd(lr=0.1, prox=fr.prox.l1, prox_strength=0.05, mask=mask),
    "adam": lambda mask: fr.adam(lr=0.01, weight_decay=0.1, amsgrad=True, mask=mask),
    "adamw": lambda mask: fr.adamw(lr=0.01, weight_decay=0.1, maximize=True, mask=mask),
    "adamw_prox": lambda mask: fr.adamw(
        lr=0.01, prox=fr.prox.elastic_net, prox_strength=0.1, mask=mask
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_flat_steps_equal_per_leaf_steps(device, name, dtype):
    params, flat = packed(device, dtype)
    per_leaf_opt = OPTIMIZERS[name](fr.select.weights())
    flat_opt = OPTIMIZERS[name]("decay")
    state, flat_state = per_leaf_opt.init(params), flat_opt.init(flat.buffers)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randn(5, 4, generator=generator, dtype=dtype).to(device)
        params, state = per_leaf_opt.step(params, grad(objective)(params, x), state)
        flat_grads = grad(lambda b, x=x: objective(flat.unpack(b), x))(flat.buffers)
        flat_opt.step_(flat.buffers, flat_grads, flat_state)
    tolerance = (
        {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 0, "atol": 1e-14}
    )
    for leaf_name, leaf in params.items():
        torch.testing.assert_close(flat.params[leaf_name], leaf, **tolerance)


def test_leafwise_group_lasso_equals_the_per_leaf_prox(device):
    params, flat = packed(device, torch.float64)
    prox = fr.flat.leafwise(flat, fr.prox.group_lasso, dim=0)
    out = prox({"decay": flat.buffers["decay"]}, 0.4)["decay"]
    expected = fr.prox.group_lasso(params, 0.4, dim=0, where=fr.select.weights())
    views = flat.unpack({**flat.buffers, "decay": out})
    for name in flat.leaves_of("decay"):
        torch.testing.assert_close(views[name], expected[name], rtol=0, atol=0)
    # As an optimizer's prox: a proximal SGD run equals the per-leaf one.
    flat_opt = fr.sgd(lr=0.5, prox=prox, prox_strength=0.6, mask="decay")
    opt = fr.sgd(lr=0.5, prox=fr.prox.group_lasso, prox_strength=0.6, mask=fr.select.weights())
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    state, flat_state = opt.init(params), flat_opt.init(flat.buffers)
    for _ in range(5):
        params, state = opt.step(params, grad(objective)(params, x), state)
        flat_opt.step_(
            flat.buffers, grad(lambda b: objective(flat.unpack(b), x))(flat.buffers), flat_state
        )
    for name, leaf in params.items():
        torch.testing.assert_close(flat.params[name], leaf, rtol=0, atol=1e-14)
    assert (params["2.weight"] == 0).all(dim=1).any(), "the test should zero a whole row"


def test_leafwise_finds_groups_by_name_not_by_length():
    """Two groups of one length: the key names the group (it was guessed by length)."""
    params = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
    flat = fr.flat.pack(params, {"x": "a", "y": "b"})
    prox = fr.flat.leafwise(flat, fr.prox.group_lasso, dim=1)
    out = prox(dict(flat.buffers), 0.9)
    expected = fr.prox.group_lasso(params, 0.9, dim=1)
    views = flat.unpack(out)
    for name in params:
        torch.testing.assert_close(views[name], expected[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="'z' is no group"):
        prox({"z": flat.buffers["x"]}, 0.1)
    with pytest.raises(TypeError, match="group name: buffer"):
        prox(flat.buffers["x"], 0.1)


@pytest.mark.parametrize(
    ("penalty", "kwargs"),
    [("l1", {}), ("l2", {}), ("elastic_net", {"l1_ratio": 0.3})],
)
def test_elementwise_penalties_on_buffers_equal_per_leaf(device, penalty, kwargs):
    params, flat = packed(device, torch.float64)
    fn = getattr(fr.penalties, penalty)
    torch.testing.assert_close(fn(flat.buffers, **kwargs), fn(params, **kwargs), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        fn(flat.buffers, where="decay", **kwargs),
        fn(params, where=fr.select.weights(), **kwargs),
        rtol=1e-14,
        atol=0,
    )
    flat_grads = grad(lambda b: fn(b, **kwargs))(flat.buffers)
    expected = flat.pack_like(grad(lambda p: fn(p, **kwargs))(params))
    for group in flat.buffers:
        torch.testing.assert_close(flat_grads[group], expected[group], rtol=0, atol=1e-14)


def test_l2_sp_on_buffers_and_structured_penalties_on_views(device):
    params, flat = packed(device, torch.float64)
    reference = {k: torch.zeros_like(v) + 0.1 for k, v in params.items()}
    torch.testing.assert_close(
        fr.penalties.l2_sp(flat.buffers, flat.pack_like(reference), where="decay"),
        fr.penalties.l2_sp(params, reference, where=fr.select.weights()),
    )
    for penalty in (fr.penalties.group_lasso, fr.penalties.orthogonal):
        torch.testing.assert_close(penalty(flat.unpack(flat.buffers)), penalty(params))
        flat_grads = grad(lambda b, penalty=penalty: penalty(flat.unpack(b)))(flat.buffers)
        expected = flat.pack_like(grad(penalty)(params))
        for group in flat.buffers:
            torch.testing.assert_close(flat_grads[group], expected[group], rtol=0, atol=1e-14)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_flat_step_is_one_graph_and_equals_eager(device):
    _params, flat = packed(device)
    _params, eager = packed(device)
    opt = fr.adamw(lr=0.01, weight_decay=0.1, mask="decay")
    state, eager_state = opt.init(flat.buffers), opt.init(eager.buffers)
    counter = CompileCounterWithBackend("inductor")
    compiled_step_ = torch.compile(opt.step_, fullgraph=True, backend=counter)
    x = torch.randn(5, 4, device=device)
    for t in range(4):
        lr = torch.tensor(0.01 / (t + 1), device=device)
        grads = grad(lambda b: objective(flat.unpack(b), x))(eager.buffers)
        compiled_step_(flat.buffers, grads, state, lr=lr)
        opt.step_(eager.buffers, grads, eager_state, lr=lr)
    assert counter.frame_count == 1
    for group in flat.buffers:
        torch.testing.assert_close(flat.buffers[group], eager.buffers[group], rtol=1e-6, atol=1e-7)
