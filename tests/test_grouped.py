"""The eager grouped path (one rule call per group of leaves over TensorLists, and the
opt-in fused kernels) against the per-leaf reference it replaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
import torch

import functorch_reg as fr
from functorch_reg._checks import NON_NEGATIVE
from functorch_reg.optim import base
from functorch_reg.optim._foreach import NotElementwiseError, Rows, TensorList, layout_of

STEPS = 3


class Plain(NamedTuple):
    skipped: torch.Tensor


def tricky_params() -> dict[str, Any]:
    """Two dtypes, a 0-d leaf, a zero-size leaf, a transposed (non-contiguous) leaf,
    a frozen leaf (its grad is None) and an integer leaf, in one tree."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "b.weight": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "b.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "scale": torch.randn((), generator=g),
        "scale64": torch.randn((), generator=g, dtype=torch.float64),
        "empty": torch.randn(0, 3, generator=g),
        "transposed": torch.randn(3, 7, generator=g).t(),
        "frozen": torch.randn(2, generator=g),
        "steps": torch.arange(3),
    }


def tricky_grads(params: dict[str, Any], seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    grads: dict[str, Any] = {}
    for name, p in params.items():
        if name in ("frozen", "steps"):
            grads[name] = None
        else:
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            grads[name] = grad.t().contiguous().t() if name == "transposed" else grad
    return grads


def clone(tree: Any) -> Any:
    return optree.tree_map(torch.clone, tree)


REFERENCE = {"b.weight": torch.zeros(4, 6, dtype=torch.float64), "a.weight": torch.ones(5, 3)}

CONFIGS: dict[str, Callable[[], fr.Optimizer]] = {
    "sgd": lambda: fr.sgd(lr=0.1),
    "sgd_momentum": lambda: fr.sgd(lr=0.1, momentum=0.9),
    "sgd_dampening_decay": lambda: fr.sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
    "sgd_nesterov_maximize": lambda: fr.sgd(
        lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True
    ),
    "sgd_decoupled_cautious_to": lambda: fr.sgd(
        lr=0.1,
        momentum=0.5,
        weight_decay=0.2,
        decoupled=True,
        cautious_decay=True,
        decay_to=REFERENCE,
        mask=["a.weight", "b.weight"],
    ),
    "sgd_prox_mask": lambda: fr.sgd(
        lr=0.1, prox=fr.prox.l1, prox_strength=0.5, mask=fr.select.weights()
    ),
    "sgd_skip": lambda: fr.sgd(lr=0.1, momentum=0.9, skip_nonfinite=True),
    "adam": lambda: fr.adam(lr=1e-2),
    "adam_coupled_amsgrad_maximize": lambda: fr.adam(
        lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True
    ),
    "adamw": lambda: fr.adamw(lr=1e-2, weight_decay=0.1),
    "adamw_schedule_cautious": lambda: fr.adamw(
        lr=1e-2, weight_decay=0.1, decay_scaling="schedule", cautious_decay=True
    ),
    "adamw_none_to": lambda: fr.adamw(
        lr=1e-2, weight_decay=0.1, decay_scaling="none", decay_to=REFERENCE, mask="*.weight"
    ),
    "adamw_prox_skip": lambda: fr.adamw(
        lr=1e-2, prox=fr.prox.l1, prox_strength=0.1, skip_nonfinite=True
    ),
    "adam_prox_preconditioned": lambda: fr.adam(
        lr=1e-2, prox=fr.prox.l1, prox_strength=0.1, prox_metric="preconditioned"
    ),
    "sgd_prox_preconditioned": lambda: fr.sgd(
        lr=0.1, momentum=0.9, prox=fr.prox.l1, prox_strength=0.5, prox_metric="preconditioned"
    ),
    "adamw_corrected": lambda: fr.adamw(lr=1e-2, weight_decay=0.1, decay_scaling="corrected"),
    # The rules written on another branch in the same per-leaf style, unchanged.
    "lion": lambda: fr.lion(lr=1e-3, weight_decay=0.1),
    "schedule_free_adamw": lambda: fr.schedule_free_adamw(lr=1e-2, weight_decay=0.1),
    "schedule_free_sgd": lambda: fr.schedule_free_sgd(lr=0.1, momentum=0.9),
}


def per_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every leaf steps alone, as under torch.compile: the reference."""
    monkeypatch.setattr(base, "_groups", lambda todo, *args: ([], list(todo)))


def run(
    make: Callable[[], fr.Optimizer],
    in_place: bool,
    nonfinite: bool = False,
    make_params: Callable[[], dict[str, Any]] = tricky_params,
) -> Any:
    opt = make()
    params = make_params()
    state = opt.init(params)
    for step in range(STEPS):
        grads = tricky_grads(params, step)
        if nonfinite and step == 1:
            grads["a.bias"][0] = float("nan")
        lr = torch.tensor(0.05 / (step + 1), dtype=torch.float64)  # a schedule's tensor
        if in_place:
            opt.step_(params, grads, state, lr=lr)
        else:
            params, state = opt.step(params, grads, state, lr=lr)
    return params, state


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_step_equals_the_per_leaf_rule_bit_for_bit(name, in_place, monkeypatch):
    grouped = run(CONFIGS[name], in_place, nonfinite="skip" in name)
    calls = []
    original = base._grouped_rule
    monkeypatch.setattr(base, "_grouped_rule", lambda *a: calls.append(1) or original(*a))
    again = run(CONFIGS[name], in_place, nonfinite="skip" in name)
    assert calls, "the grouped path ran"
    per_leaf(monkeypatch)
    reference = run(CONFIGS[name], in_place, nonfinite="skip" in name)
    torch.testing.assert_close(grouped, reference, rtol=0, atol=0)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    params = grouped[0]
    assert params["transposed"].stride() == (1, 7)  # layouts and dtypes kept
    assert params["scale"].dtype == torch.float32 and params["steps"].dtype == torch.int64


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize("name", ["adamw", "adam_coupled_amsgrad_maximize", "sgd_momentum", "lion"])
def test_cache_blocks_give_the_per_leaf_bits(name, in_place, monkeypatch):
    """A CPU group larger than two cache blocks runs block by block (each block's params,
    grads and state stay in cache across the rule's passes), with the same bits."""
    monkeypatch.setattr(base, "CACHE_BLOCK", 64)  # bytes: 16 float32, 8 float64
    calls = []
    original = base._grouped_rule
    monkeypatch.setattr(base, "_grouped_rule", lambda *a: calls.append(a[1]) or original(*a))
    blocked = run(CONFIGS[name], in_place)
    last_step = calls[-len(calls) // STEPS :]
    assert len(last_step) > 3 and all(len(block) <= 3 for block in last_step), last_step
    per_leaf(monkeypatch)
    torch.testing.assert_close(blocked, run(CONFIGS[name], in_place), rtol=0, atol=0)


def test_cache_blocks_split_a_large_cpu_group_only():
    leaves = [torch.zeros(2**18), torch.zeros(2**18), torch.zeros(2**20), torch.zeros(10)]
    assert base._cache_blocks([0, 1, 2, 3], leaves) == [[0, 1], [2], [3]]  # 2 MiB, 4 MiB, tail
    assert base._cache_blocks([0, 1], leaves) == [[0, 1]]  # two blocks or less: whole
    meta = [torch.zeros(2**21, device="meta") for _ in range(3)]
    assert base._cache_blocks([0, 1, 2], meta) == [[0, 1, 2]]  # off the CPU: whole


def no_scalar_leaves() -> dict[str, Any]:
    """tricky_params without its 0-d leaves: each dtype's group then has one leaf layout,
    so the rule's table values meet whole leaf lists (cast once for them)."""
    return {k: v for k, v in tricky_params().items() if k not in ("scale", "scale64")}


def half_leaves() -> dict[str, Any]:
    """no_scalar_leaves in bfloat16 and float16 (REFERENCE's leaves keep their dtypes)."""
    halves = (torch.bfloat16, torch.float16)
    return {
        k: v.to(halves[k.startswith("b.")]) if v.is_floating_point() else v
        for k, v in no_scalar_leaves().items()
    }


ONE_LAYOUT = [(no_scalar_leaves, name) for name in CONFIGS] + [
    # REFERENCE (decay_to) holds float32 and float64 tensors, not the half leaves' dtypes.
    (half_leaves, name)
    for name in CONFIGS
    if not name.endswith("_to")
]


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize(
    ("leaves", "name"), ONE_LAYOUT, ids=[f"{f.__name__}-{n}" for f, n in ONE_LAYOUT]
)
def test_groups_of_one_layout_equal_the_per_leaf_rule_bit_for_bit(
    leaves, name, in_place, monkeypatch
):
    """Schedule-free computes with its table's values (lr * (beta1 * (1 - ckp1) - 1))
    before they meet a leaf: in float64, as each leaf's rule does, not cast first. In
    half precision a product by a number is never made in place, nor is ``t * x`` for a
    0-d ``t`` turned into ``x * t`` (torch rounds them otherwise there)."""
    grouped = run(CONFIGS[name], in_place, "skip" in name, leaves)
    per_leaf(monkeypatch)
    reference = run(CONFIGS[name], in_place, "skip" in name, leaves)
    torch.testing.assert_close(grouped, reference, rtol=0, atol=0)


def test_a_grad_that_is_not_a_tensor_is_named_and_changes_nothing():
    params = {"a": torch.randn(3), "b": torch.randn(2)}
    opt = fr.adamw(lr=1e-2)
    state = opt.init(params)
    before = clone((params, state))
    for grad in (1.0, np.ones(2, dtype=np.float32)):
        with pytest.raises(TypeError, match="grad of leaf 'b' is a (float|ndarray)"):
            opt.step_(params, {"a": torch.randn(3), "b": grad}, state)
    torch.testing.assert_close((params, state), before, rtol=0, atol=0)


FUSED: dict[str, tuple[Callable[..., fr.Optimizer], str]] = {
    "adamw": (lambda **kw: fr.adamw(lr=1e-2, weight_decay=0.1, **kw), "_fused_adamw_"),
    "adam_amsgrad_maximize": (
        lambda **kw: fr.adam(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True, **kw),
        "_fused_adam_",
    ),
    "sgd_momentum_nesterov": (
        lambda **kw: fr.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, **kw),
        "_fused_sgd_",
    ),
    "sgd_dampening": (
        lambda **kw: fr.sgd(lr=0.1, momentum=0.9, dampening=0.2, maximize=True, **kw),
        "_fused_sgd_",
    ),
    "sgd_plain": (lambda **kw: fr.sgd(lr=0.1, weight_decay=0.1, **kw), "_fused_sgd_"),
    "adamw_prox_skip": (
        lambda **kw: fr.adamw(  # the prox on the weights; the rest fused
            lr=1e-2,
            prox=fr.prox.l1,
            prox_strength=0.1,
            skip_nonfinite=True,
            mask="*.weight",
            **kw,
        ),
        "_fused_adamw_",
    ),
}


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_kernels_match_the_rule(name, in_place, monkeypatch):
    make, kernel = FUSED[name]
    calls = []
    original = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = run(lambda: make(fused=True), in_place, nonfinite="skip" in name)
    assert calls, f"torch.{kernel} ran"
    default = run(make, in_place, nonfinite="skip" in name)
    for ours, reference in zip(fused[0].values(), default[0].values(), strict=True):
        tolerance = 1e-12 if ours.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fused[1], default[1], rtol=1e-6, atol=1e-7)


def test_fused_leaves_grads_alone_and_a_schedule_of_betas_to_the_rule(monkeypatch):
    calls = []
    original = torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: calls.append(1) or original(*a, **k))
    opt, default = fr.adam(lr=1e-2, fused=True), fr.adam(lr=1e-2)
    params = {"w": torch.randn(4)}
    state, default_state = opt.init(params), default.init(params)
    default_params = clone(params)
    for betas in [(0.9, 0.999), (0.8, 0.99), (0.8, 0.99)]:
        grads = {"w": torch.randn(4)}
        saved = grads["w"].clone()
        opt.step_(params, grads, state, betas=betas)
        default.step_(default_params, grads, default_state, betas=betas)
        assert torch.equal(grads["w"], saved)
        torch.testing.assert_close(params, default_params, rtol=1e-6, atol=1e-7)
        # The products of changed betas are no power of the current ones: the rule runs.
        assert len(calls) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: fr.adamw(cautious_decay=True, fused=True), "fused=True"),
        (lambda: fr.adamw(decay_scaling="none", fused=True), "fused=True"),
        (lambda: fr.sgd(lr=0.1, decoupled=True, fused=True), "fused=True"),
    ],
)
def test_fused_refuses_options_its_kernel_lacks(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_rule_that_reads_shapes_steps_leaf_by_leaf():
    """A rule written for one array that asks a leaf's size (as Muon asks its shape)."""

    def rule(p, g, slots, row, h, decay, reference):
        return p - h["lr"] * g / max(p.numel(), 1), slots

    opt = base.build(
        "scaled",
        state_type=Plain,  # no state but the count of skipped steps
        init_slots=lambda p: (),
        rule=rule,
        hyperparams={"lr": 0.5},
        intervals={"lr": NON_NEGATIVE},
        mask=None,
        prox=None,
        skip_nonfinite=False,
    )
    params = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    grads = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    new, _ = opt.step(params, grads, opt.init(params))
    assert torch.equal(new["a"], torch.full((4,), 1 - 0.5 / 4))
    assert torch.equal(new["b"], torch.full((2, 3), 1 - 0.5 / 6))


def test_tensor_list_never_writes_a_named_operand():
    torch.manual_seed(0)
    tensors = [torch.rand(3), torch.rand(2, 2)]
    layout = layout_of(tensors)
    x = TensorList([t.clone() for t in tensors], layout)
    y = TensorList([t.clone() for t in tensors], layout)
    rows = Rows(torch.rand(2, 2, dtype=torch.float64))
    first, second = rows.unbind()
    results = {
        "scaled": (2 * x + 1, [2 * a + 1 for a in tensors]),
        "chain": ((x - y) * 0.3 + x, [(a - a) * 0.3 + a for a in tensors]),
        "rows": (
            x.sqrt() / second + 1e-8,
            [a.sqrt() / s + 1e-8 for a, s in zip(tensors, second.tensors, strict=True)],
        ),
        "rsub": (1 - x * first, [1 - a * s for a, s in zip(tensors, first.tensors, strict=True)]),
        "sub_temp": (x - y * 2, [a - a * 2 for a in tensors]),
        "maximum": (torch.maximum(x, y * 0.5), [torch.maximum(a, a * 0.5) for a in tensors]),
    }
    named = x * 2
    kept = [t.clone() for t in named.tensors]
    _ = named * 3 + named
    assert all(torch.equal(a, b) for a, b in zip(named.tensors, kept, strict=True))
    for name, (got, expected) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got.tensors, expected, strict=True)), name
    for operand in (x, y):
        assert all(torch.equal(a, b) for a, b in zip(operand.tensors, tensors, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_scaled_addcdiv_is_one_foreach_call_with_the_per_leaf_bits(dtype, monkeypatch):
    """AdamW's p.addcdiv(m * step_size, denom, value=-1), with step_size a table row:
    torch.optim's p.addcdiv(m, denom, value=-step_size) without the product in memory
    (float32 and float64), the same bits as leaf by leaf in every dtype."""
    g = torch.Generator().manual_seed(1)
    shapes = [(33,), (7, 9), (1000,)]
    ps, ms = ([torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(2))
    ds = [torch.rand(s, generator=g).to(dtype) + 0.1 for s in shapes]
    table = torch.rand(3, 2, generator=g, dtype=torch.float64) * 1e-2
    if dtype != torch.bfloat16:
        table = table.to(dtype)  # as _grouped_rule casts the rows
    layout = layout_of(ps)
    p, m, d = (TensorList([t.clone() for t in ts], layout) for ts in (ps, ms, ds))
    step_size, _ = Rows(table).unbind()
    products = []
    original = torch._foreach_mul
    monkeypatch.setattr(torch, "_foreach_mul", lambda *a: products.append(1) or original(*a))
    new_p = p.addcdiv(m * step_size, d, value=-1)
    expected = [a.addcdiv(b * s, c, value=-1) for a, b, c, s in zip(ps, ms, ds, step_size.tensors)]
    assert all(torch.equal(x, y) for x, y in zip(new_p.tensors, expected, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(m.tensors, ms, strict=True))  # m kept
    assert products == ([1] if dtype == torch.bfloat16 else [])
    product = m * step_size  # read as a tensor list, it is the product
    assert all(torch.equal(x, b * s) for x, b, s in zip(product.tensors, ms, step_size.tensors))


def test_tensor_list_refuses_what_differs_between_leaves():
    x = TensorList([torch.ones(2), torch.ones(3)])
    for ask in (lambda: x.shape, lambda: len(x), lambda: bool(x), lambda: x.numel()):
        with pytest.raises(NotElementwiseError):
            ask()
    assert x.dtype == torch.float32


def test_a_raising_prox_on_the_grouped_path_changes_nothing():
    def prox(tree, threshold):
        if any(p.dtype == torch.float64 for p in tree.values()):
            raise ValueError("no float64 here")
        return tree

    # The biases are fused, their writes wait for the weights' prox, which raises.
    opt = fr.adamw(lr=1e-2, prox=prox, prox_strength=0.1, fused=True, mask="*.weight")
    params = tricky_params()
    state = opt.init(params)
    opt.step_(params, tricky_grads(params, 0), state, prox_strength=0.0)
    before = clone((params, state))
    with pytest.raises(ValueError, match="no float64"):
        opt.step_(params, tricky_grads(params, 1), state)
    torch.testing.assert_close((params, state), before, rtol=0, atol=0)


def test_remembered_layouts_still_catch_new_sharing_and_inference_tensors():
    opt = fr.sgd(lr=0.1, momentum=0.9)
    params = {"a": torch.ones(3), "b": torch.ones(3)}
    state = opt.init(params)
    grads = {"a": torch.ones(3), "b": torch.ones(3)}
    opt.step_(params, grads, state)
    opt.step_(params, grads, state)  # the same layout, remembered
    tied = {"a": params["a"], "b": params["a"]}
    with pytest.raises(ValueError, match="share memory"):
        opt.step_(tied, grads, state)
    with torch.inference_mode():
        frozen = {"a": torch.ones(3), "b": torch.ones(3)}
    with pytest.raises(ValueError, match="inference tensor"):
        opt.step_(frozen, grads, state)
