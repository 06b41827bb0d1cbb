"""Reliability of the update rules, transforms, flat layout and adapter (issue 20):
one prox convention, ``validate`` with params, atomic in-place updates, flat vs per-leaf
equality, references, and checkpoints."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import pytest
import torch

import functorch_reg as fr

from .conftest import mlp_params


def random_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}


def clone(tree):
    return {k: v.clone() for k, v in tree.items()}


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- item 19: one prox convention, {leaf name: leaf} --------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda prox: fr.sgd(lr=0.1, momentum=0.9, prox=prox, prox_strength=5.0),
        lambda prox: fr.adamw(lr=0.1, prox=prox, prox_strength=5.0),
    ],
    ids=["sgd", "adamw"],
)
def test_prox_with_where_works_inside_an_optimizer(factory):
    """A ``where=`` glob in an optimizer's prox sees leaf names (it saw one leaf named '')."""
    params = mlp_params(torch.float64)
    grads = random_grads(params, 0)
    opt = factory(functools.partial(fr.prox.l1, where="0.*"))
    plain = factory(None)
    got, _ = opt.step(params, grads, opt.init(params))
    stepped, _ = plain.step(params, grads, plain.init(params))
    expected = fr.prox.l1(stepped, 0.1 * 5.0, where="0.*")
    assert_identical(got, expected)
    assert (got["0.weight"] == 0).any() and not (got["2.weight"] == 0).any()


def test_prox_with_where_works_on_flat_buffers_and_in_torch_optimizer():
    params = mlp_params(torch.float64)
    grads = random_grads(params, 1)
    opt = fr.sgd(lr=0.1, prox=functools.partial(fr.prox.l1, where="0.*"), prox_strength=2.0)
    expected, _ = opt.step(params, grads, opt.init(params))
    # Flat: the prox gets {group: buffer}; leafwise maps the group to its leaves.
    flat = fr.flat.pack(params, {"a": "0.*", "b": "2.*"})
    flat_opt = fr.sgd(
        lr=0.1, prox=fr.flat.leafwise(flat, fr.prox.l1, where="0.*"), prox_strength=2.0
    )
    flat_opt.step_(flat.buffers, flat.pack_like(grads), flat_opt.init(flat.buffers))
    assert_identical(flat.params, expected)
    # TorchOptimizer with named params: the prox sees the param names.
    module_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = fr.TorchOptimizer(list(module_params.items()), opt)
    for name, p in module_params.items():
        p.grad = grads[name].clone()
    torch_opt.step()
    assert_identical({k: v.detach() for k, v in module_params.items()}, expected)


def test_prox_returning_a_tensor_is_refused_with_the_convention():
    params = mlp_params()
    before = clone(params)
    for prox in (fr.prox.soft_threshold, lambda tree, t: torch.zeros(())):
        opt = fr.sgd(lr=0.1, prox=prox, prox_strength=0.1)
        with pytest.raises(TypeError, match="prox must map a dict"):
            opt.step_(params, random_grads(params, 0), opt.init(params))
        assert_identical(params, before)


# --- item 20: validate(params=None, **hyperparameters) ------------------------------


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (lambda: fr.adamw(lr=1e-3, mask="nope.*"), "where='nope.*' matches no"),
        (
            lambda: fr.sgd(
                lr=0.1, prox=functools.partial(fr.prox.l1, where="x.*"), prox_strength=1
            ),
            "where='x.*' matches no",
        ),
        (
            lambda: fr.adamw(lr=0.1, weight_decay=0.1, decay_to={"0.weight": torch.zeros(6, 4)}),
            "decay_to has no leaf",
        ),
        (
            lambda: fr.sgd(
                lr=0.1, prox=functools.partial(fr.prox.group_lasso, dim=1), prox_strength=1
            ),
            "group dim=1",
        ),
        (lambda: fr.adamw(lr=1e-3, mask="nope.*", clip_grad_norm=1.0), "matches no"),
    ],
    ids=["mask", "prox_where", "decay_to", "prox_shape", "clipped"],
)
def test_validate_with_params_checks_masks_prox_and_references(optimizer, match):
    """validate(params) raises what the first step would, on meta copies (no writes)."""
    opt = optimizer()
    params = mlp_params()
    before = clone(params)
    opt.validate(lr=1e-3)  # scalars alone pass, as before
    with pytest.raises(ValueError, match=match):
        opt.validate(params)
    with pytest.raises(ValueError, match=match):
        opt.step(params, random_grads(params, 0), opt.init(params))
    assert_identical(params, before)


def test_validate_with_params_checks_overrides_and_passes_a_good_configuration():
    opt = fr.adamw(lr=1e-3, weight_decay=0.1, mask=fr.select.weights(), prox=fr.prox.l1)
    params = mlp_params()
    opt.validate(params, lr=torch.tensor(0.1), prox_strength=0.5)
    with pytest.raises(ValueError, match="lr"):
        opt.validate(params, lr=-1.0)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        opt.validate(params, momentum=0.9)


def test_torch_optimizer_refuses_a_mask_that_matches_nothing_at_construction():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="where='nope.*' matches no"):
        fr.TorchOptimizer(model.named_parameters(), fr.adamw(lr=1e-3, mask="nope.*"))


# --- item 3: decay_to given the live params -----------------------------------------


def test_decay_to_live_params_is_a_snapshot():
    """decay_to=dict(model.named_parameters()) decays toward the initial weights (the
    reference used to move with each in-place step and decay nothing)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    live = fr.TorchOptimizer(
        model.named_parameters(),
        fr.adamw(lr=0.1, weight_decay=0.5, decay_to=dict(model.named_parameters())),
    )
    twin = torch.nn.Linear(4, 3).double()
    twin.load_state_dict(model.state_dict())
    snapshot = fr.TorchOptimizer(
        twin.named_parameters(), fr.adamw(lr=0.1, weight_decay=0.5, decay_to=initial)
    )
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):
        for m, opt in ((model, live), (twin, snapshot)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for name, p in model.named_parameters():
        assert_identical(p, dict(twin.named_parameters())[name])


# --- item 4: decay_scaling="schedule" and a group with its own lr -------------------


def test_schedule_scaling_reference_lr_defaults_to_each_groups_own_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)).double()
    make = functools.partial(fr.adamw, weight_decay=0.1, decay_scaling="schedule")
    opt = fr.TorchOptimizer(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}],
        make(lr=0.01),
    )
    assert opt.param_groups[1]["decay_reference_lr"] == 0.1
    assert opt.param_groups[0]["decay_reference_lr"] == 0.01
    # The head group alone, as its own optimizer at lr=0.1: the same step.
    head = torch.nn.Linear(3, 2).double()
    head.load_state_dict(model[1].state_dict())
    alone = fr.TorchOptimizer(head.parameters(), make(lr=0.1))
    for p, q in zip(model[1].parameters(), head.parameters(), strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    for p in model[0].parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    alone.step()
    for p, q in zip(model[1].parameters(), head.parameters(), strict=True):
        assert_identical(p, q)


def test_schedule_scaling_refuses_a_decay_factor_that_is_not_positive():
    opt = fr.adamw(lr=0.01, weight_decay=0.2, decay_scaling="schedule")
    params = mlp_params()
    before = clone(params)
    state = opt.init(params)
    with pytest.raises(ValueError, match="1 - .* <= 0"):
        opt.step_(params, random_grads(params, 0), state, lr=0.05)
    assert_identical(params, before)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="param group 1.*<= 0"):
        fr.TorchOptimizer(
            [
                {"params": [model.weight]},
                {"params": [model.bias], "lr": 0.1, "decay_reference_lr": 0.01},
            ],
            opt,
        )


# --- item 12: meta-device leaves are not tied ---------------------------------------


def test_pack_and_flat_torch_optimizer_accept_meta_leaves():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = fr.flat.pack(params)
    assert flat.buffers["float32"].device.type == "meta"
    assert flat.params["1.weight"].shape == (2, 4)
    fr.TorchOptimizer(model.parameters(), fr.adamw(lr=1e-3), flat=True)
    # Two meta views of one meta tensor are still no tie; a real tie still is.
    shared = torch.randn(3, 3)
    with pytest.raises(ValueError, match="share memory"):
        fr.flat.pack({"a": shared, "b": shared})


# --- item 17: NumPy scalar hyperparameters ------------------------------------------


@pytest.mark.slow
def test_numpy_scalars_are_floats_on_every_path():
    import numpy as np

    params = mlp_params()
    grads = random_grads(params, 0)
    reference = fr.adamw(lr=0.1, weight_decay=0.01, betas=(0.9, 0.99))
    expected, _ = reference.step(params, grads, reference.init(params), lr=0.05)
    opt = fr.adamw(lr=np.float64(0.1), weight_decay=np.float32(0.01), betas=(np.float64(0.9), 0.99))
    assert type(opt.hyperparams["lr"]) is float
    eager, _ = opt.step(params, grads, opt.init(params), lr=np.float64(0.05))
    assert_identical(eager, expected)
    compiled, _ = torch.compile(opt.step, fullgraph=True)(
        params, grads, opt.init(params), lr=np.float64(0.05)
    )
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-7)


# --- items 2 and 11: flat == per-leaf for every option, 0-d leaves included ----------


class Tempered(torch.nn.Module):
    """An MLP with a learned 0-d temperature (a logit scale)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        )
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.net(x) * self.temperature


FLAT_OPTIONS = {
    "plain": lambda: fr.adamw(lr=0.05, weight_decay=0.1),
    "weights_mask": lambda: fr.adamw(lr=0.05, weight_decay=0.3, mask=fr.select.weights()),
    "glob_mask": lambda: fr.sgd(lr=0.1, momentum=0.9, weight_decay=0.3, mask="*.weight"),
    "group_lasso": lambda: fr.sgd(
        lr=0.1,
        prox=functools.partial(fr.prox.group_lasso, dim=1),
        prox_strength=0.5,
        mask=fr.select.weights(),
    ),
    "l1_where": lambda: fr.adamw(
        lr=0.05, prox=functools.partial(fr.prox.l1, where="net.0.*"), prox_strength=2.0
    ),
}
GROUPS = {"decay": fr.select.weights(), "other": lambda name, leaf: leaf.ndim < 2}


def tempered_data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (24,), generator=generator)


def tempered_loss(model):
    def loss(params, x, y):
        logits = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    return loss


@pytest.mark.parametrize("option", list(FLAT_OPTIONS))
@pytest.mark.slow
def test_flat_equals_per_leaf_in_train_step_and_torch_optimizer(option):
    model = Tempered().double()
    x, y = tempered_data()
    loss = tempered_loss(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    flat = fr.flat.pack(params, GROUPS)
    opt = FLAT_OPTIONS[option]()
    per_leaf = fr.train_step(loss, opt, compile=False)
    flat_step = fr.train_step(loss, opt, flat=flat, compile=False)
    state, flat_state = opt.init(params), opt.init(flat.buffers)
    for _ in range(3):
        per_leaf(params, state, x, y)
        flat_step(flat.buffers, flat_state, x, y)
    torch.testing.assert_close(flat.params, params, rtol=0, atol=1e-12)
    # TorchOptimizer: one param group per flat group, named params. A glob that one
    # group lacks is refused by both layouts alike.
    results = []
    for is_flat in (False, True):
        twin = Tempered().double()
        named = list(twin.named_parameters())
        groups = [
            {"params": [(n, p) for n, p in named if p.ndim >= 2]},
            {"params": [(n, p) for n, p in named if p.ndim < 2]},
        ]
        if option == "glob_mask":
            with pytest.raises(ValueError, match="param group 1: where='\\*.weight' matches no"):
                fr.TorchOptimizer(groups, FLAT_OPTIONS[option](), flat=is_flat)
            continue
        torch_opt = fr.TorchOptimizer(groups, FLAT_OPTIONS[option](), flat=is_flat)
        for _ in range(3):
            torch_opt.zero_grad()
            torch.nn.functional.cross_entropy(twin(x), y).backward()
            torch_opt.step()
        results.append({n: p.detach().clone() for n, p in twin.named_parameters()})
    if results:
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(results[0], params, rtol=0, atol=1e-12)


@pytest.mark.parametrize("option", ["weights_mask", "group_lasso", "l1_where"])
def test_flat_sweep_equals_the_per_leaf_sweep_for_leaf_options(option):
    x, y = tempered_data()
    common = dict(
        train=(x, y),
        val=(x, y),
        steps=4,
        batch_size=12,
        compile=False,
        progress=False,
    )
    strengths = {"lr": torch.tensor([0.02, 0.05], dtype=torch.float64)}
    loss = torch.nn.functional.cross_entropy
    per_leaf = fr.sweep(Tempered().double(), loss, FLAT_OPTIONS[option](), strengths, **common)
    flat = fr.sweep(
        Tempered().double(), loss, FLAT_OPTIONS[option](), strengths, flat=GROUPS, **common
    )
    torch.testing.assert_close(flat.params, per_leaf.params, rtol=0, atol=1e-12)
    torch.testing.assert_close(flat.val_loss, per_leaf.val_loss, rtol=0, atol=1e-12)


def test_flat_paths_refuse_a_mask_that_splits_a_group():
    model = Tempered().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = fr.flat.pack(params)  # one group: weights and biases together
    opt = fr.adamw(lr=0.1, weight_decay=0.1, mask=fr.select.weights())
    with pytest.raises(ValueError, match="'net.0.weight' but not 'net.0.bias'.*'float64'"):
        fr.train_step(tempered_loss(model), opt, flat=flat, compile=False)
    with pytest.raises(ValueError, match="param group 0.*decayed whole"):
        fr.TorchOptimizer(model.named_parameters(), opt, flat=True)


# --- item 1: accumulate_ and ema.update_ are atomic ----------------------------------


def test_accumulate_refuses_a_late_unwritable_leaf_before_writing():
    grads = {"a": torch.ones(3), "b": torch.ones(3)}
    with torch.inference_mode():
        frozen = torch.zeros(3)
    for bad, match in ((frozen, "inference tensor"), (torch.zeros(1).expand(3), "overlapping")):
        total = {"a": torch.zeros(3), "b": bad}
        with pytest.raises(ValueError, match=f"accumulate_: total 'b'.*{match}|{match}"):
            fr.accumulate_(total, grads)
        assert_identical(total["a"], torch.zeros(3))


def test_accumulate_refuses_tied_totals_and_promotion_alike():
    shared = torch.zeros(3)
    with pytest.raises(ValueError, match="'a' and total 'b' share memory"):
        fr.accumulate_({"a": shared, "b": shared}, {"a": torch.ones(3), "b": torch.ones(3)})
    assert_identical(shared, torch.zeros(3))
    total, grads = {"w": torch.zeros(2)}, {"w": torch.ones(2, dtype=torch.float64)}
    for fn in (fr.accumulate, fr.accumulate_):
        with pytest.raises(ValueError, match="total 'w' is torch.float32, grads torch.float64"):
            fn(total, grads)


def test_ema_update_is_atomic_and_keeps_integer_buffers_as_at_init():
    average = fr.ema(0.9)
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = average.init(params)
    with torch.inference_mode():
        frozen = torch.zeros(2)
    bad = fr.transforms.EMAState({"a": state.params["a"], "b": frozen}, state.n_averaged)
    with pytest.raises(ValueError, match="ema.update_: state.params 'b' is an inference"):
        average.update_({"a": torch.full((2,), 5.0), "b": torch.ones(2)}, bad)
    assert_identical(state.params["a"], torch.ones(2))
    assert int(state.n_averaged) == 0
    # Integer buffers (BatchNorm's num_batches_tracked) are copied at init.
    model = torch.nn.BatchNorm1d(2)
    tree = dict(model.state_dict())
    state = average.init(tree)
    for _ in range(3):
        model(torch.randn(4, 2))
        average.update_(dict(model.state_dict()), state)
    assert int(model.num_batches_tracked) == 3
    assert int(state.params["num_batches_tracked"]) == 0


# --- item 22a: l2_sp's reference needs only the leaves where= selects ---------------


def test_l2_sp_reference_may_lack_leaves_that_where_excludes():
    params = mlp_params(torch.float64)
    reference = {k: v + 1 for k, v in params.items() if k.endswith("weight")}
    got = fr.penalties.l2_sp(params, reference, where="*.weight")
    expected = sum((params[k] - reference[k]).square().sum() for k in reference)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference leaf '0.bias'.*no such leaf"):
        fr.penalties.l2_sp(params, reference, where="0.*")


# --- item 7: flat=True after model.double() / .to() ---------------------------------


def test_flat_torch_optimizer_refuses_a_cast_model_instead_of_undoing_it():
    model = torch.nn.Linear(3, 2)
    opt = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=0.1), flat=True)
    model.double()
    with pytest.raises(ValueError, match="param 0 of param group 0 is now torch.float64"):
        opt.zero_grad()
    assert model.weight.dtype == torch.float64  # not silently cast back
    with pytest.raises(ValueError, match="make the optimizer after moving or casting"):
        opt.step()
    assert model.weight.dtype == torch.float64


# --- item 8: a checkpoint whose param_names come in another order -------------------


def test_checkpoint_with_reordered_param_names_loads_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    make = functools.partial(fr.adamw, lr=0.1, weight_decay=0.1, mask="0.*")
    opt = fr.TorchOptimizer(model.named_parameters(), make())
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    saved = opt.state_dict()
    reordered = fr.TorchOptimizer(list(model.named_parameters())[::-1], make())
    reordered.load_state_dict(saved)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert_identical(reordered.state[p][key], value)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    renamed = [(f"x{name}", p) for name, p in other.named_parameters()]
    before = fr.TorchOptimizer(renamed, fr.adamw(lr=0.1))
    with pytest.raises(ValueError, match="param group 0 of state_dict names other params"):
        before.load_state_dict(saved)
    assert not before.state


# --- item 15: flat=True refuses a flat=False checkpoint it cannot step, at load ------


@pytest.mark.parametrize("case", ["never_stepped", "uneven"])
def test_flat_load_refuses_a_checkpoint_it_cannot_step(case):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    per_leaf = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=0.1))
    for step in range(2):
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = None if case == "never_stepped" or step == 0 else torch.ones(2)
        per_leaf.step()
    saved = per_leaf.state_dict()
    flat = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=0.1), flat=True)
    match = "has no state while" if case == "never_stepped" else "different beta_powers"
    with pytest.raises(ValueError, match=match):
        flat.load_state_dict(saved)
    assert not flat.state


# --- property: whatever raises leaves everything bit-identical ----------------------


def snapshot(tree):
    """Bit-exact copies of every tensor in a nested structure (dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return (
            type(tree)(snapshot(v) for v in tree)
            if not hasattr(tree, "_fields")
            else (type(tree)(*(snapshot(v) for v in tree)))
        )
    return tree


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


SHAPES = st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=2), min_size=2, max_size=4)


def random_tree(shapes, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {
        f"l{i}": torch.randn(shape, generator=generator, dtype=dtype)
        for i, shape in enumerate(shapes)
    }


def corrupt(tree, name, failure):
    """Make leaf ``name`` of ``tree`` unwritable in place, in the way ``failure`` says."""
    leaf = tree[name]
    if failure == "inference":
        with torch.inference_mode():
            tree[name] = leaf.clone()
    elif failure == "expanded":
        tree[name] = leaf.reshape(-1)[:1].reshape([1] * leaf.ndim).expand(leaf.shape)
        if leaf.numel() == 1:
            tree[name] = torch.zeros(1).expand(4)[:1].reshape(leaf.shape).expand(leaf.shape)
            hypothesis.assume(torch._debug_has_internal_overlap(tree[name]) == 1)
    elif failure == "tied":
        other = next(k for k in tree if k != name)
        hypothesis.assume(tree[other].shape == leaf.shape)
        tree[name] = tree[other]


@hypothesis.given(
    shapes=SHAPES,
    failure=st.sampled_from(["inference", "expanded", "tied", "dtype", "missing"]),
    victim=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_a_raising_accumulate_in_place_changes_nothing(shapes, failure, victim, seed):
    total = random_tree(shapes, seed)
    grads = random_tree(shapes, seed + 1)
    name = list(total)[-1 - victim % len(total)]
    if failure == "dtype":
        grads[name] = grads[name].double()
    elif failure == "missing":
        total[name] = None
    else:
        corrupt(total, name, failure)
    before = snapshot(total)
    with pytest.raises(ValueError):
        fr.accumulate_(total, grads)
    assert_same(total, before)


@hypothesis.given(
    shapes=SHAPES,
    failure=st.sampled_from(["inference", "expanded", "tied", "dtype", "decay"]),
    victim=st.integers(0, 3),
    warmup=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_a_raising_ema_update_in_place_changes_nothing(shapes, failure, victim, warmup, seed):
    average = fr.ema(0.9)
    params = random_tree(shapes, seed)
    state = average.init(params)
    for _ in range(warmup):
        average.update_(random_tree(shapes, seed + 2), state)
    name = list(params)[-1 - victim % len(params)]
    overrides = {}
    if failure == "dtype":
        params[name] = params[name].double()
    elif failure == "decay":
        overrides["decay"] = 1.5
    else:
        corrupt(state.params, name, failure)
    before = snapshot(state)
    with pytest.raises(ValueError):
        average.update_(params, state, **overrides)
    assert_same(state, before)


def module_and_optimizer(seed, flat, stepped):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = fr.TorchOptimizer(model.named_parameters(), fr.adamw(lr=0.1), flat=flat)
    for _ in range(stepped):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    return model, opt


@hypothesis.settings(max_examples=15)
@hypothesis.given(
    flat=st.booleans(),
    failure=st.sampled_from(["group_lr", "sparse", "cast"]),
    stepped=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_a_raising_torch_optimizer_step_changes_nothing(flat, failure, stepped, seed):
    model, opt = module_and_optimizer(seed, flat, stepped)
    opt.zero_grad()
    model(torch.randn(5, 3)).square().sum().backward()
    if failure == "group_lr":
        opt.param_groups[0]["lr"] = -1.0
    elif failure == "sparse":
        model[1].bias.grad = model[1].bias.grad.to_sparse()
    else:
        hypothesis.assume(flat)
        model.double()
    before = snapshot(([p for p in model.parameters()], dict(opt.state)))
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert_same(([p for p in model.parameters()], dict(opt.state)), before)


@hypothesis.settings(max_examples=15)
@hypothesis.given(
    flat=st.booleans(),
    failure=st.sampled_from(["shape", "key", "group_lr", "names", "partial"]),
    stepped=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_a_raising_load_state_dict_changes_nothing(flat, failure, stepped, seed):
    model, opt = module_and_optimizer(seed, flat, stepped)
    _, source = module_and_optimizer(seed + 1, False, 1)
    saved = source.state_dict()
    first = next(iter(saved["state"]))
    if failure == "shape":
        saved["state"][first]["exp_avg"] = torch.zeros(7)
    elif failure == "key":
        saved["state"][first]["extra"] = torch.zeros(())
    elif failure == "group_lr":
        saved["param_groups"][0]["lr"] = float("nan")
    elif failure == "names":
        saved["param_groups"][0]["param_names"][0] = "other"
    else:
        hypothesis.assume(flat)
        del saved["state"][first]
    before = snapshot(([p for p in model.parameters()], dict(opt.state)))
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert_same(([p for p in model.parameters()], dict(opt.state)), before)


@hypothesis.given(
    shapes=SHAPES,
    failure=st.sampled_from(["tied", "no_group", "mixed_dtype"]),
    seed=st.integers(0, 2**16),
)
def test_a_raising_pack_changes_nothing(shapes, failure, seed):
    params = random_tree(shapes, seed)
    names = list(params)
    groups = None
    if failure == "tied":
        corrupt(params, names[-1], "tied")
    elif failure == "no_group":
        groups = {"first": names[0]}
    else:
        params[names[-1]] = params[names[-1]].double()
        groups = {"all": fr.select.all()}
    before = snapshot(params)
    with pytest.raises(ValueError):
        fr.flat.pack(params, groups)
    assert_same(params, before)


@pytest.mark.slow
def test_numpy_scalars_in_compiled_train_step_and_torch_optimizer():
    """Also a compiled in-place step of a 0-d float64 leaf (the temperature), whose
    write torch.compile dropped."""
    import numpy as np

    model = Tempered().double()
    x, y = tempered_data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    eager_params = {k: v.clone() for k, v in params.items()}
    opt = fr.adamw(lr=np.float64(0.05), weight_decay=np.float64(0.1))
    compiled = fr.train_step(tempered_loss(model), opt, compile=True)
    eager = fr.train_step(tempered_loss(model), opt, compile=False)
    state, eager_state = opt.init(params), opt.init(eager_params)
    for _ in range(2):
        compiled(params, state, x, y, lr=np.float64(0.02))
        eager(eager_params, eager_state, x, y, lr=0.02)
    torch.testing.assert_close(params, eager_params, rtol=1e-6, atol=1e-7)
    twin = Tempered().double()
    torch_opt = fr.TorchOptimizer(
        [{"params": list(twin.parameters()), "lr": np.float64(0.02)}], opt, compile=True
    )
    for _ in range(2):
        torch_opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        torch_opt.step()
    torch.testing.assert_close(
        {k: v.detach() for k, v in twin.named_parameters()}, eager_params, rtol=1e-6, atol=1e-7
    )
