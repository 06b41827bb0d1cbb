"""Behaviour of the update rules beyond parity: frozen leaves, skips, masks, prox,
overrides, vmap, checkpoints and bad input."""

from __future__ import annotations

import io

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch.func import vmap

import functorch_reg as fr
from functorch_reg.optim.base import leaf_table_field

from .conftest import mlp_params

OPTIMIZERS = {
    "sgd_momentum": lambda **kw: fr.sgd(lr=0.05, momentum=0.9, **kw),
    "adam": lambda **kw: fr.adam(lr=1e-2, **kw),
    "adamw_amsgrad": lambda **kw: fr.adamw(lr=1e-2, amsgrad=True, **kw),
}


def random_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        for k, v in params.items()
    }


def clone(tree):
    return fr.unstack(fr.stack([tree]))[0]


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_none_grad_freezes_the_leaf_and_its_state(name):
    opt = OPTIMIZERS[name]()
    params = mlp_params()
    state = opt.init(params)
    params, state = opt.step(params, random_grads(params, 0), state)
    before_params, before_state = clone(params), clone(state)
    grads = {**random_grads(params, 1), "0.bias": None}
    new_params, new_state = opt.step(params, grads, state)
    assert_identical(new_params["0.bias"], before_params["0.bias"])
    new_slots, before_slots = fr.state_dict(new_state), fr.state_dict(before_state)
    for field in set(new_slots) - {"skipped"}:
        assert_identical(new_slots[field]["0.bias"], before_slots[field]["0.bias"])
        assert not torch.equal(new_slots[field]["0.weight"], before_slots[field]["0.weight"])
    assert not torch.equal(new_params["0.weight"], before_params["0.weight"])
    opt.step_(params, grads, state)
    assert_identical(params["0.bias"], before_params["0.bias"])


def test_frozen_leaf_matches_torch_per_parameter_step_counts():
    """A leaf without a gradient for 5 steps then with one follows torch.optim.Adam,
    whose bias correction counts each parameter's own steps."""
    params = mlp_params(torch.float64)
    torch_params = [leaf.clone().requires_grad_() for leaf in params.values()]
    torch_opt = torch.optim.Adam(torch_params, lr=1e-2, foreach=False)
    opt = fr.adam(lr=1e-2)
    state = opt.init(params)
    for step in range(20):
        grads = random_grads(params, step)
        if step < 5:
            grads["0.bias"] = None
        params, state = opt.step(params, grads, state)
        for leaf, g in zip(torch_params, grads.values(), strict=True):
            leaf.grad = None if g is None else g.clone()
        torch_opt.step()
    torch.testing.assert_close(params, dict(zip(params, [p.detach() for p in torch_params])))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_nonfinite_leaves_everything_untouched_and_counts(name):
    opt = OPTIMIZERS[name](skip_nonfinite=True)
    params = mlp_params()
    state = opt.init(params)
    params, state = opt.step(params, random_grads(params, 0), state)
    bad = random_grads(params, 1)
    bad["2.weight"][1, 2] = float("nan")
    bad["0.bias"][0] = float("inf")
    skipped_params, skipped_state = opt.step(params, bad, state)
    assert_identical(skipped_params, params)
    assert_identical(skipped_state._replace(skipped=state.skipped), state)
    assert skipped_state.skipped.item() == 1
    in_place_params, in_place_state = clone(params), clone(state)
    opt.step_(in_place_params, bad, in_place_state)
    assert_identical(in_place_params, params)
    assert in_place_state.skipped.item() == 1
    # After the skip the run continues as if the bad step never came.
    good = random_grads(params, 2)
    assert_identical(
        opt.step(skipped_params, good, skipped_state)[0], opt.step(params, good, state)[0]
    )


def test_mask_limits_decay_and_prox_to_selected_leaves():
    params = mlp_params()
    zero_grads = {k: torch.zeros_like(v) for k, v in params.items()}
    opt = fr.sgd(
        lr=0.1, weight_decay=0.5, mask=fr.select.weights(), prox=fr.prox.l1, prox_strength=100.0
    )
    new, _ = opt.step(params, zero_grads, opt.init(params))
    assert (new["0.weight"] == 0).all() and (new["2.weight"] == 0).all()
    assert_identical(new["0.bias"], params["0.bias"])
    assert_identical(new["2.bias"], params["2.bias"])


def test_decoupled_sgd_shrinks_weights_before_the_step():
    params = {"w": torch.tensor([2.0])}
    opt = fr.sgd(lr=0.1, weight_decay=0.5, decoupled=True)
    new, _ = opt.step(params, {"w": torch.tensor([1.0])}, opt.init(params))
    assert new["w"].item() == pytest.approx(2.0 * (1 - 0.1 * 0.5) - 0.1)


@pytest.mark.slow
def test_proximal_sgd_solves_the_lasso_with_exact_zeros():
    """Full-batch ISTA with fr.sgd(prox=fr.prox.l1) against scikit-learn's coordinate descent."""
    rng = np.random.default_rng(0)
    n, d, alpha = 60, 12, 0.1
    X = rng.standard_normal((n, d))
    true_w = np.zeros(d)
    true_w[:4] = [1.5, -2.0, 0.8, 0.3]
    y = X @ true_w + 0.3 * rng.standard_normal(n)
    expected = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X, y).coef_
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    lipschitz = torch.linalg.eigvalsh(Xt.T @ Xt / n).max().item()
    opt = fr.sgd(lr=1 / lipschitz, prox=fr.prox.l1, prox_strength=alpha)
    params = {"w": torch.zeros(d, dtype=torch.float64)}
    state = opt.init(params)
    for _ in range(3000):
        grads = {"w": Xt.T @ (Xt @ params["w"] - yt) / n}
        params, state = opt.step(params, grads, state)
    w = params["w"].numpy()
    np.testing.assert_allclose(w, expected, atol=1e-8)
    assert np.array_equal(w == 0, expected == 0) and (w == 0).sum() >= 3


def test_tensor_and_float_hyperparameters_agree():
    params, grads = mlp_params(), random_grads(mlp_params(), 0)
    opt = fr.adamw(lr=1e-2, weight_decay=0.1)
    state = opt.init(params)
    as_floats = opt.step(params, grads, state, lr=0.02, betas=(0.8, 0.9), weight_decay=0.2)
    as_tensors = opt.step(
        params,
        grads,
        state,
        lr=torch.tensor(0.02, dtype=torch.float64),
        betas=(torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)),
        weight_decay=torch.tensor(0.2, dtype=torch.float64),
    )
    torch.testing.assert_close(as_tensors, as_floats, rtol=0, atol=0)
    constructed = fr.adamw(lr=0.02, betas=(0.8, 0.9), weight_decay=0.2)
    torch.testing.assert_close(constructed.step(params, grads, state), as_floats, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_vmap_over_hyperparameters_equals_a_loop(name):
    opt = OPTIMIZERS[name](weight_decay=0.1)
    members = [mlp_params(seed=i) for i in range(4)]
    grads = [random_grads(p, 10 + i) for i, p in enumerate(members)]
    states = [opt.init(p) for p in members]
    lrs = torch.tensor([0.0, 1e-3, 1e-2, 1e-1])
    decays = torch.tensor([0.0, 0.1, 0.2, 0.3])

    def one(params, grads, state, lr, weight_decay):
        return opt.step(params, grads, state, lr=lr, weight_decay=weight_decay)

    batched = vmap(one)(fr.stack(members), fr.stack(grads), fr.stack(states), lrs, decays)
    for i, unbatched in enumerate(fr.unstack(batched)):
        torch.testing.assert_close(
            unbatched, one(members[i], grads[i], states[i], lrs[i], decays[i])
        )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_and_bit_identical_resume(name):
    opt = OPTIMIZERS[name](weight_decay=0.01)
    params = mlp_params()
    state = opt.init(params)
    for step in range(10):
        params, state = opt.step(params, random_grads(params, step), state)
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": fr.state_dict(state)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_params = checkpoint["params"]
    resumed_state = fr.load_state_dict(opt, resumed_params, checkpoint["optimizer"])
    for step in range(10, 20):
        grads = random_grads(params, step)
        params, state = opt.step(params, grads, state)
        resumed_params, resumed_state = opt.step(resumed_params, grads, resumed_state)
    assert_identical(resumed_params, params)
    assert_identical(resumed_state, state)


@pytest.mark.parametrize(
    ("name", "rows_after"),
    [
        ("sgd_momentum", lambda steps: torch.tensor(steps)),
        ("adam", lambda steps: torch.tensor([0.9, 0.999], dtype=torch.float64) ** steps),
    ],
)
def test_leaf_table_has_a_row_per_leaf_saved_under_its_name(name, rows_after):
    """Per-leaf scalars (SGD's counts, Adam's beta products) share one tensor, a row per
    leaf in flattening order; a frozen leaf's row stays put, and ``state_dict`` keys the
    rows by leaf name, leaving out non-floating leaves."""
    opt = OPTIMIZERS[name]()
    params = {**mlp_params(), "steps": torch.tensor([7])}
    state = opt.init(params)
    for step in range(3):
        grads = {**random_grads(mlp_params(), step), "steps": None}
        if step == 0:
            grads["0.bias"] = None
        params, state = opt.step(params, grads, state)
    table_field = leaf_table_field(state)
    assert table_field is not None
    table = getattr(state, table_field)
    assert table.shape[0] == len(fr.leaf_names(params))
    saved = fr.state_dict(state)[table_field]
    assert sorted(saved) == sorted(mlp_params())
    assert_identical(saved["0.bias"], rows_after(2))
    assert_identical(saved["0.weight"], rows_after(3))
    assert_identical(fr.load_state_dict(opt, params, fr.state_dict(state)), state)
    wrong_rows = state._replace(**{table_field: table[1:]})
    with pytest.raises(ValueError, match="rows for 4 leaves, the params have 5"):
        opt.step(params, grads, wrong_rows)


def test_load_state_dict_rejects_a_state_of_another_shape():
    params = mlp_params()
    sd = fr.state_dict(fr.adam().init(params))
    with pytest.raises(ValueError, match="fields"):
        fr.load_state_dict(fr.sgd(lr=0.1, momentum=0.9), params, sd)
    sd["exp_avg"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"exp_avg.0.weight should be torch.float32 \(6, 4\)"):
        fr.load_state_dict(fr.adam(), params, sd)
    del sd["exp_avg"]["0.weight"]
    with pytest.raises(ValueError, match="missing '0.weight'"):
        fr.load_state_dict(fr.adam(), params, sd)


def test_non_floating_leaves_are_left_alone():
    params = {**mlp_params(), "steps": torch.tensor([7])}
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    assert state.exp_avg["steps"] is None
    grads = {**random_grads(mlp_params(), 0), "steps": None}
    new, _ = opt.step(params, grads, state)
    assert new["steps"] is params["steps"]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: fr.sgd(lr=-0.1), ValueError, "lr=-0.1"),
        (lambda: fr.sgd(lr=0.1, momentum=float("nan")), ValueError, "momentum=nan"),
        (lambda: fr.sgd(lr=0.1, nesterov=True), ValueError, "nesterov needs momentum"),
        (lambda: fr.adam(betas=(0.9, 1.0)), ValueError, "beta2=1.0"),
        (lambda: fr.adam(betas=(-0.1, 0.9)), ValueError, "beta1=-0.1"),
        (lambda: fr.adam(betas=0.9), TypeError, "betas must be a pair"),
        (lambda: fr.adamw(eps=float("inf")), ValueError, "eps=inf"),
        (lambda: fr.adamw(weight_decay=-1e-2), ValueError, "weight_decay=-0.01"),
        (lambda: fr.adam(lr="fast"), TypeError, "lr must be a float or a tensor"),
        (lambda: fr.adam(lr=torch.tensor(-1.0)), ValueError, r"lr=-1.0"),
        (lambda: fr.adam(lr=torch.ones(2)), ValueError, "scalar"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, "lr=-1.0"),
        ({"lr": torch.tensor(float("nan"))}, ValueError, "lr=nan"),
        ({"betas": (0.9, torch.tensor(1.5))}, ValueError, "beta2=1.5"),
        ({"learning_rate": 0.1}, TypeError, "unknown hyperparameter 'learning_rate'"),
    ],
)
def test_bad_overrides_raise_before_anything_changes(overrides, error, message):
    opt = fr.adam(lr=1e-2)
    params = mlp_params()
    state = opt.init(params)
    before_params, before_state = clone(params), clone(state)
    with pytest.raises(error, match=message):
        opt.step_(params, random_grads(params, 0), state, **overrides)
    assert_identical(params, before_params)
    assert_identical(state, before_state)


def test_mismatched_trees_raise_before_anything_changes():
    opt = fr.sgd(lr=0.1, momentum=0.9)
    params = mlp_params()
    state = opt.init(params)
    before = clone(params)
    grads = random_grads(params, 0)
    del grads["2.bias"]
    with pytest.raises(ValueError, match="leaf '2.bias' of params is missing from grads"):
        opt.step_(params, grads, state)
    wrong_shape = {**random_grads(params, 0), "0.weight": torch.ones(4, 6)}
    with pytest.raises(ValueError, match="leaf '0.weight' has shape"):
        opt.step_(params, wrong_shape, state)
    other_state = opt.init({**params, "extra": torch.ones(2)})
    with pytest.raises(ValueError, match="state.momentum_buffer has a leaf 'extra'"):
        opt.step_(params, random_grads(params, 0), other_state)
    with pytest.raises(TypeError, match="state must be a SGDState"):
        opt.step_(params, random_grads(params, 0), fr.adam().init(params))
    assert_identical(params, before)


def test_prox_error_on_one_leaf_leaves_every_leaf_untouched():
    """group_lasso over rows cannot apply to a 1-d bias: the error comes before any write."""
    opt = fr.sgd(lr=0.1, prox=lambda p, t: fr.prox.group_lasso(p, t, dim=1), prox_strength=0.1)
    params = mlp_params()
    before = clone(params)
    with pytest.raises(ValueError, match="group dim=1"):
        opt.step_(params, random_grads(params, 0), opt.init(params))
    assert_identical(params, before)


def test_momentum_override_without_buffers_is_an_error():
    opt = fr.sgd(lr=0.1)
    params = mlp_params()
    with pytest.raises(ValueError, match="momentum != 0"):
        opt.step(params, random_grads(params, 0), opt.init(params), momentum=0.9)


def test_init_rejects_params_without_floats():
    with pytest.raises(ValueError, match="no floating-point tensor"):
        fr.adam().init({"steps": torch.tensor([1])})


def test_skip_nonfinite_with_every_grad_none_is_a_no_op():
    opt = fr.adam(skip_nonfinite=True)
    params = mlp_params()
    state = opt.init(params)
    new_params, new_state = opt.step(params, {k: None for k in params}, state)
    assert_identical(new_params, params)
    assert new_state.skipped.item() == 0


# Decoupled decay options: decay_scaling, cautious_decay, decay_to.

DECOUPLED = {
    "sgd": lambda **kw: fr.sgd(momentum=0.9, decoupled=True, **kw),
    "adam": lambda **kw: fr.adam(decoupled=True, **kw),
    "adamw": lambda **kw: fr.adamw(**kw),
}


@pytest.mark.parametrize("scaling", ["lr", "schedule", "none"])
@pytest.mark.parametrize("name", list(DECOUPLED))
def test_decay_scaling_under_a_cosine_schedule_follows_the_closed_form(name, scaling):
    """With zero gradients, w_t = w_0 * prod_s (1 - c_s), c_s = lr_s * wd, (lr_s / lr_0) * wd
    or wd; with "schedule" the result does not depend on the peak lr."""
    wd, steps = 0.05, 30
    # The multiplier of the peak, in float64 so that both peaks see the same lr / peak.
    multiplier = fr.schedules.cosine(1.0, total_steps=steps, warmup_steps=5)
    finals = []
    for peak in (0.5, 0.05):
        opt = DECOUPLED[name](lr=peak, weight_decay=wd, decay_scaling=scaling)
        params = mlp_params(torch.float64)
        initial = clone(params)
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        state = opt.init(params)
        factor = 1.0
        for t in range(steps):
            lr = peak * multiplier(torch.tensor(t)).double()
            params, state = opt.step(params, zeros, state, lr=lr)
            shrink = {"lr": lr.item() * wd, "schedule": lr.item() / peak * wd, "none": wd}
            factor = factor * (1 - shrink[scaling])
        expected = {k: v * factor for k, v in initial.items()}
        torch.testing.assert_close(params, expected, rtol=1e-12, atol=0)
        finals.append(params)
    if scaling == "lr":
        assert not torch.allclose(finals[0]["0.weight"], finals[1]["0.weight"])
    else:
        torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=0)


def test_decay_reference_lr_is_explicit_and_overridable():
    params = {"w": torch.tensor([2.0], dtype=torch.float64)}
    zeros = {"w": torch.zeros(1, dtype=torch.float64)}
    opt = fr.adamw(lr=0.1, weight_decay=0.5, decay_scaling="schedule", decay_reference_lr=0.2)
    assert opt.hyperparams["decay_reference_lr"] == 0.2
    new, _ = opt.step(params, zeros, opt.init(params))
    assert new["w"].item() == pytest.approx(2.0 * (1 - 0.1 / 0.2 * 0.5))
    new, _ = opt.step(params, zeros, opt.init(params), decay_reference_lr=torch.tensor(0.4))
    assert new["w"].item() == pytest.approx(2.0 * (1 - 0.1 / 0.4 * 0.5))


def hand_written_cautious(name, params, grads_seq, lr, wd, reference=None):
    """Cautious decoupled decay written out plainly: decay where sign(u) sign(w - ref) >= 0,
    u the step direction (SGD's momentum buffer, Adam's m_hat / (sqrt(v_hat) + eps))."""
    params = clone(params)
    state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    masks = []
    for t, grads in enumerate(grads_seq, start=1):
        for k, w in params.items():
            g, (m, v) = grads[k], state[k]
            if name == "sgd":
                m = g.clone() if t == 1 else 0.9 * m + g
                u = m
            else:
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                u = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            state[k] = (m, v)
            offset = w if reference is None else w - reference[k]
            mask = (torch.sign(u) * torch.sign(offset) >= 0).to(w.dtype)
            masks.append(mask)
            params[k] = w - lr * wd * mask * offset - lr * u
    return params, torch.cat([m.flatten() for m in masks])


@pytest.mark.parametrize("toward", ["zero", "reference"])
@pytest.mark.parametrize("name", list(DECOUPLED))
def test_cautious_decay_matches_a_hand_written_reference(name, toward):
    params = mlp_params(torch.float64)
    reference = None if toward == "zero" else mlp_params(torch.float64, seed=5)
    grads_seq = [random_grads(params, seed) for seed in range(20)]
    lr, wd = 0.02, 0.5
    opt = DECOUPLED[name](lr=lr, weight_decay=wd, cautious_decay=True, decay_to=reference)
    state = opt.init(params)
    ours = params
    for grads in grads_seq:
        ours, state = opt.step(ours, grads, state)
    expected, masks = hand_written_cautious(name, params, grads_seq, lr, wd, reference)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert 0.2 < masks.double().mean() < 0.8, "the sign test both keeps and drops decay"
    plain = DECOUPLED[name](lr=lr, weight_decay=wd, decay_to=reference)
    plain_params, plain_state = params, plain.init(params)
    for grads in grads_seq:
        plain_params, plain_state = plain.step(plain_params, grads, plain_state)
    assert not torch.allclose(plain_params["0.weight"], ours["0.weight"])


@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("name", list(DECOUPLED))
def test_decay_to_the_current_weights_is_a_no_op(name, cautious):
    params = mlp_params()
    grads = random_grads(params, 0)
    with_reference = DECOUPLED[name](
        lr=0.05, weight_decay=0.7, decay_to=clone(params), cautious_decay=cautious
    )
    without = DECOUPLED[name](lr=0.05, weight_decay=0.0)
    ours = with_reference.step(params, grads, with_reference.init(params))
    assert_identical(ours[0], without.step(params, grads, without.init(params))[0])


def test_decay_to_pulls_toward_the_reference_on_masked_leaves_only():
    """w_t - w_ref = (1 - lr * wd)^t (w_0 - w_ref) with zero gradients; the reference
    needs only the leaves that mask selects."""
    params = mlp_params(torch.float64)
    reference = {k: v for k, v in mlp_params(torch.float64, seed=3).items() if "weight" in k}
    opt = fr.adamw(lr=0.1, weight_decay=0.2, decay_to=reference, mask=fr.select.weights())
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    state, new = opt.init(params), params
    for _ in range(10):
        new, state = opt.step(new, zeros, state)
    for k in reference:
        torch.testing.assert_close(
            new[k] - reference[k], (1 - 0.1 * 0.2) ** 10 * (params[k] - reference[k])
        )
    assert_identical(new["0.bias"], params["0.bias"])


def test_default_decay_is_unchanged_by_the_new_options():
    """decay_scaling="lr" without caution or reference is torch.optim.AdamW to the bit."""
    params, grads = mlp_params(), random_grads(mlp_params(), 0)
    default = fr.adamw(lr=1e-2, weight_decay=0.1)
    explicit = fr.adamw(lr=1e-2, weight_decay=0.1, decay_scaling="lr", cautious_decay=False)
    assert_identical(
        default.step(params, grads, default.init(params)),
        explicit.step(params, grads, explicit.init(params)),
    )


def test_vmap_over_weight_decay_with_every_decay_option():
    reference = mlp_params(seed=9)
    opt = fr.adamw(
        lr=1e-2,
        decay_scaling="schedule",
        cautious_decay=True,
        decay_to=reference,
        clip_grad_norm=1.0,
    )
    members = [mlp_params(seed=i) for i in range(3)]
    grads = [random_grads(p, 10 + i) for i, p in enumerate(members)]
    states = [opt.init(p) for p in members]
    decays = torch.tensor([0.0, 0.5, 2.0])

    def one(params, grads, state, weight_decay):
        return opt.step(params, grads, state, lr=torch.tensor(5e-3), weight_decay=weight_decay)

    batched = vmap(one)(fr.stack(members), fr.stack(grads), fr.stack(states), decays)
    for i, unbatched in enumerate(fr.unstack(batched)):
        torch.testing.assert_close(unbatched, one(members[i], grads[i], states[i], decays[i]))


@pytest.mark.compile
@pytest.mark.slow
def test_decay_options_compile_once_with_changing_tensor_hyperparameters():
    from torch._dynamo.testing import CompileCounterWithBackend

    opt = fr.sgd(
        lr=0.1,
        momentum=0.9,
        decoupled=True,
        decay_scaling="schedule",
        cautious_decay=True,
        decay_to=mlp_params(seed=4),
        clip_grad_norm=1.0,
    )
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(opt.step, fullgraph=True, backend=counter)
    params = eager_params = mlp_params()
    state = eager_state = opt.init(params)
    for t in range(4):
        grads = random_grads(params, t)
        hyper = {
            "lr": torch.tensor(0.1 / (1 + t)),
            "weight_decay": torch.tensor(0.1 * (t + 1)),
            "decay_reference_lr": torch.tensor(0.1 + t),
            "clip_grad_norm": torch.tensor(0.5 * (t + 1)),
        }
        params, state = compiled(params, grads, state, **hyper)
        eager_params, eager_state = opt.step(eager_params, grads, eager_state, **hyper)
    assert counter.frame_count == 1
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)


def test_decay_options_through_torch_optimizer_with_a_scheduler():
    """TorchOptimizer passes decay_reference_lr and clip_grad_norm per group, and the
    scheduler's lr reaches the "schedule" scaling; equal to the functional loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    reference = {k: torch.zeros_like(v) + 0.1 for k, v in start.items()}

    def make():
        return fr.adamw(
            lr=0.05,
            weight_decay=0.3,
            decay_scaling="schedule",
            cautious_decay=True,
            decay_to=reference,
            clip_grad_norm=0.5,
        )

    optimizer = fr.TorchOptimizer(model.named_parameters(), make())
    assert optimizer.param_groups[0]["decay_reference_lr"] == 0.05
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    opt = make()
    params, state = start, opt.init(start)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    for t in range(8):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        params, state = opt.step(params, grads, state, lr=0.05 * 0.5 ** (t // 3))
        optimizer.step()
        scheduler.step()
        model_params = {k: v.detach() for k, v in model.named_parameters()}
        torch.testing.assert_close(model_params, params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: fr.adamw(decay_scaling="peak"), ValueError, "decay_scaling must be one of"),
        (lambda: fr.adam(weight_decay=0.1, decay_scaling="none"), ValueError, "decoupled"),
        (lambda: fr.sgd(lr=0.1, cautious_decay=True), ValueError, "cautious_decay applies"),
        (lambda: fr.adam(decay_to=mlp_params()), ValueError, "decay_to applies"),
        (lambda: fr.adamw(decay_reference_lr=0.1), ValueError, "needs decay_scaling='schedule'"),
        (
            lambda: fr.adamw(decay_scaling="schedule", decay_reference_lr=0.0),
            ValueError,
            "must be positive",
        ),
        (lambda: fr.adamw(lr=0.0, decay_scaling="schedule"), ValueError, "must be positive"),
        (lambda: fr.adamw(decay_to={"w": 1.0}), TypeError, "decay_to leaf 'w' must be a tensor"),
    ],
)
def test_bad_decay_options_raise_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (lambda p: {k: v for k, v in p.items() if k != "2.weight"}, "no leaf '2.weight'"),
        (lambda p: {**p, "0.bias": torch.zeros(5)}, r"'0.bias' is torch.float32 \(5,\)"),
        (lambda p: {**p, "0.weight": p["0.weight"].double()}, "'0.weight' is torch.float64"),
    ],
)
def test_decay_to_not_matching_the_params_raises_before_anything_changes(reference, message):
    params = mlp_params()
    opt = fr.adamw(lr=0.1, weight_decay=0.1, decay_to=reference(mlp_params(seed=2)))
    state = opt.init(params)
    before_params, before_state = clone(params), clone(state)
    with pytest.raises(ValueError, match=message):
        opt.step_(params, random_grads(params, 0), state)
    assert_identical(params, before_params)
    assert_identical(state, before_state)


def test_decoupled_sgd_toward_a_reference_is_the_l2_sp_penalty():
    """Plain SGD: w - lr * wd * (w - ref) - lr * g is a gradient step on
    loss + wd / 2 * l2_sp(w, ref)."""
    params = mlp_params(torch.float64)
    reference = mlp_params(torch.float64, seed=7)
    wd = 0.3
    opt = fr.sgd(lr=0.05, weight_decay=wd, decoupled=True, decay_to=reference)
    plain = fr.sgd(lr=0.05)
    ours, state = params, opt.init(params)
    penalized, plain_state = params, plain.init(params)
    for step in range(20):
        grads = random_grads(params, step)
        ours, state = opt.step(ours, grads, state)
        penalty_grads = torch.func.grad(lambda p: wd / 2 * fr.penalties.l2_sp(p, reference))(
            penalized
        )
        total = {k: grads[k] + penalty_grads[k] for k in grads}
        penalized, plain_state = plain.step(penalized, total, plain_state)
    torch.testing.assert_close(ours, penalized, rtol=1e-12, atol=1e-12)


def test_clipping_keeps_a_nonfinite_step_skipped():
    """A NaN gradient makes the global norm NaN; the step is still skipped and counted."""
    opt = fr.adamw(lr=1e-2, clip_grad_norm=1.0, skip_nonfinite=True)
    params = mlp_params()
    state = opt.init(params)
    bad = random_grads(params, 0)
    bad["0.bias"][1] = float("nan")
    new_params, new_state = opt.step(params, bad, state)
    assert_identical(new_params, params)
    assert new_state.skipped.item() == 1


# Reliability: everything that can fail is checked before the first write, and no
# step changes a param's dtype.


def sgd_plain():
    return fr.sgd(lr=0.1)


def test_step_in_place_refuses_an_expanded_leaf_before_writing_any():
    params = {"a": torch.ones(3), "z": torch.ones(1).expand(3)}
    opt = sgd_plain()
    state = opt.init(params)
    with pytest.raises(ValueError, match="'z'.*overlapping memory"):
        opt.step_(params, {"a": torch.ones(3), "z": torch.ones(3)}, state)
    assert_identical(params["a"], torch.ones(3))


def test_step_in_place_refuses_an_inference_tensor_before_writing_any():
    params = {"a": torch.ones(3)}
    with torch.inference_mode():
        params["z"] = torch.ones(3)
    opt = fr.adam(lr=0.1)
    state = opt.init({k: v.clone() for k, v in params.items()})
    before = fr.state_dict(state)
    with pytest.raises(ValueError, match="'z'.*inference"):
        opt.step_(params, {"a": torch.ones(3), "z": torch.ones(3)}, state)
    assert_identical(params["a"], torch.ones(3))
    assert_identical(fr.state_dict(state), before)


def test_step_in_place_refuses_tied_leaves_naming_both():
    w = torch.ones(3)
    params = {"dec": w, "enc": w}
    opt = sgd_plain()
    state = opt.init(params)
    with pytest.raises(ValueError, match="params 'dec' and params 'enc' share memory"):
        opt.step_(params, {"dec": torch.ones(3), "enc": torch.ones(3)}, state)
    assert_identical(w, torch.ones(3))


def test_step_in_place_refuses_overlapping_views_but_not_disjoint_ones():
    weight = torch.ones(2, 3)
    opt = fr.adam(lr=0.1)
    params = {"W": weight, "W0": weight[0]}
    state = opt.init(params)
    with pytest.raises(ValueError, match="params 'W' and params 'W0'"):
        opt.step_(params, {"W": torch.ones(2, 3), "W0": torch.ones(3)}, state)
    assert_identical(weight, torch.ones(2, 3))
    rows = {"r0": weight[0], "r1": weight[1], "c": torch.ones(4)[::2]}
    state = opt.init(rows)
    opt.step_(rows, {"r0": torch.ones(3), "r1": torch.ones(3), "c": torch.ones(2)}, state)
    assert torch.all(weight < 1)
    columns = {"c0": weight[:, 0], "c1": weight[:, 1]}
    opt.step_(columns, {"c0": torch.ones(2), "c1": torch.ones(2)}, opt.init(columns))


def test_step_in_place_refuses_state_that_shares_memory_with_params():
    params = {"w": torch.ones(3)}
    opt = fr.sgd(lr=0.1, momentum=0.9)
    state = opt.init(params)
    state = state._replace(momentum_buffer={"w": params["w"]})
    with pytest.raises(ValueError, match="params 'w' and state.momentum_buffer 'w'"):
        opt.step_(params, {"w": torch.ones(3)}, state)
    assert_identical(params["w"], torch.ones(3))


@pytest.mark.parametrize("in_place", [False, True])
def test_a_grad_of_another_dtype_is_refused_naming_the_leaf(in_place):
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    grads = {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match="'b'.*float64.*float32"):
        (opt.step_ if in_place else opt.step)(params, grads, state)
    assert_identical(params["a"], torch.ones(2))


def test_a_grad_on_another_device_is_refused_naming_the_leaf():
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    opt = sgd_plain()
    grads = {"a": torch.ones(2), "b": torch.ones(2, device="meta")}
    with pytest.raises(ValueError, match="'b'.*meta.*cpu"):
        opt.step_(params, grads, opt.init(params))
    assert_identical(params["a"], torch.ones(2))


def test_state_of_another_dtype_is_refused_naming_the_leaf():
    params = {"w": torch.ones(2)}
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    state = state._replace(exp_avg={"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(TypeError, match="state.exp_avg 'w'.*float64"):
        opt.step(params, {"w": torch.ones(2)}, state)


@pytest.mark.parametrize(
    "make, overrides",
    [
        (lambda: fr.adam(lr=0.1), {}),
        (lambda: fr.adamw(lr=0.1, amsgrad=True), {}),
        (lambda: fr.sgd(lr=0.1), {"lr": torch.tensor(0.1, dtype=torch.float64)}),
        (lambda: fr.sgd(lr=0.1, momentum=0.9), {"lr": torch.tensor(0.1, dtype=torch.float64)}),
        (lambda: fr.adam(lr=0.1), {"lr": torch.tensor(0.1, dtype=torch.float64)}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_never_changes_a_params_dtype(make, overrides, dtype):
    """A 0-d parameter (a learned temperature) met float64 bias corrections and lr."""
    params = {"temperature": torch.tensor(1.5, dtype=dtype), "w": torch.ones(2, dtype=dtype)}
    opt = make()
    state = opt.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    new_params, new_state = opt.step(params, grads, state, **overrides)
    for name in params:
        assert new_params[name].dtype == dtype
    for before, after in zip(fr.state_dict(state).values(), fr.state_dict(new_state).values()):
        if isinstance(before, dict):
            for name in before:
                assert after[name].dtype == before[name].dtype
    # The checkpoint of the new state loads back.
    fr.load_state_dict(opt, new_params, fr.state_dict(new_state))
    expected = new_params["temperature"].clone()
    opt.step_(params, grads, state, **overrides)
    assert_identical(params["temperature"], expected)


def test_complex_leaves_are_refused_with_the_real_view_fix_which_matches_torch():
    z = torch.tensor([1.0 + 2.0j, -0.5 + 0.25j])
    opt = fr.adam(lr=0.1)
    with pytest.raises(TypeError, match="'z'.*complex.*view_as_real"):
        opt.init({"z": z})
    with pytest.raises(TypeError, match="'z'.*complex"):
        opt.step({"z": z}, {"z": z}, opt.init({"z": torch.ones(2)}))
    # The suggested fix follows torch.optim.Adam on the complex parameter.
    torch_z = z.clone().requires_grad_()
    torch_opt = torch.optim.Adam([torch_z], lr=0.1, weight_decay=0.1)
    opt = fr.adam(lr=0.1, weight_decay=0.1)
    params = {"z": torch.view_as_real(z.clone())}
    state = opt.init(params)
    for step in range(20):
        g = torch.randn(2, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
        torch_z.grad = g
        torch_opt.step()
        params, state = opt.step(params, {"z": torch.view_as_real(g)}, state)
    torch.testing.assert_close(torch.view_as_complex(params["z"]), torch_z.detach())


def test_step_refuses_parameters_that_require_grad_with_the_fix():
    model = torch.nn.Linear(2, 1)
    params = dict(model.named_parameters())
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    opt = fr.adam(lr=0.1)
    state = opt.init({k: v.detach() for k, v in params.items()})
    with pytest.raises(TypeError, match=r"'bias'.*requires grad.*\.detach\(\)"):
        opt.step(params, grads, state)
    with torch.no_grad():
        opt.step(params, grads, state)
    before = model.weight.detach().clone()
    opt.step_(params, grads, state)
    assert not torch.equal(model.weight.detach(), before)


def test_colliding_leaf_names_are_refused_at_init():
    opt = fr.adam(lr=0.1)
    with pytest.raises(ValueError, match="two leaves named 'a.b'"):
        opt.init({"a.b": torch.ones(2), "a": {"b": torch.ones(3)}})


def test_init_of_a_generator_names_the_fix():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"generator.*named_parameters\(\)"):
        fr.adam(lr=0.1).init(model.parameters())


def test_batch_norm_buffers_in_params_are_named_as_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    params = {k: v.detach() for k, v in model.state_dict().items()}
    opt = fr.sgd(lr=0.1)
    state = opt.init(params)
    grads = {k: torch.ones_like(v) for k, v in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match="'1.num_batches_tracked' looks like a module buffer.*buffers are not parameters",
    ):
        opt.step(params, grads, state)


def test_plain_sgd_state_round_trips():
    opt = fr.sgd(lr=0.1)
    params = {"w": torch.ones(2)}
    saved = fr.state_dict(opt.init(params))
    assert set(saved) == {"skipped"}
    state = fr.load_state_dict(opt, params, saved)
    params, state = opt.step(params, {"w": torch.ones(2)}, state)
    assert_identical(params["w"], torch.full((2,), 0.9))


def test_numpy_scalars_are_accepted_as_hyperparameters():
    params = {"w": torch.ones(2)}
    for lr in (np.float32(0.1), np.float64(0.1)):
        opt = fr.sgd(lr=lr)
        new, _ = opt.step(params, {"w": torch.ones(2)}, opt.init(params), lr=lr)
        assert new["w"].dtype == torch.float32
        torch.testing.assert_close(new["w"], torch.full((2,), 0.9))


def test_a_meta_device_lr_tensor_is_a_clear_error():
    params = {"w": torch.ones(2)}
    opt = fr.sgd(lr=0.1)
    with pytest.raises(ValueError, match="lr.*meta device"):
        opt.step(
            params, {"w": torch.ones(2)}, opt.init(params), lr=torch.tensor(0.1, device="meta")
        )


FAILURES = [
    "grad_dtype",
    "grad_device",
    "grad_shape",
    "expanded_leaf",
    "inference_leaf",
    "tied_leaf",
    "nan_lr",
    "negative_override",
    "state_dtype",
]
RULES = {
    "sgd": lambda: fr.sgd(lr=0.1),
    "sgd_momentum": lambda: fr.sgd(lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda: fr.adam(lr=0.1),
    "adamw_amsgrad_prox": lambda: fr.adamw(
        lr=0.1, amsgrad=True, prox=fr.prox.l1, prox_strength=0.1
    ),
}


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    shapes=st.lists(st.lists(st.integers(2, 3), min_size=1, max_size=2), min_size=1, max_size=4),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=4, max_size=4),
    rule=st.sampled_from(list(RULES)),
    failure=st.sampled_from(FAILURES),
    victim=st.integers(0, 3),
    warmup=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_a_raising_step_in_place_leaves_params_and_state_bit_identical(
    shapes, dtypes, rule, failure, victim, warmup, seed
):
    generator = torch.Generator().manual_seed(seed)
    params = {
        f"layer{i}.w": torch.randn(shape, generator=generator, dtype=dtypes[i])
        for i, shape in enumerate(shapes)
    }
    names = list(params)
    bad = names[victim % len(names)]
    if failure == "tied_leaf":
        params["tied"] = params[bad]
    opt = RULES[rule]()
    state = opt.init(params)
    for step in range(warmup):
        params, state = opt.step(params, random_grads(params, step), state)
    grads = random_grads(params, seed)
    overrides: dict = {}
    if failure == "grad_dtype":
        other = torch.float64 if params[bad].dtype == torch.float32 else torch.float32
        grads[bad] = grads[bad].to(other)
    elif failure == "grad_device":
        grads[bad] = grads[bad].to("meta")
    elif failure == "grad_shape":
        grads[bad] = grads[bad].reshape(-1)[:1]
    elif failure == "expanded_leaf":
        p = params[bad]
        params[bad] = p.reshape(-1)[:1].reshape([1] * p.ndim).expand(p.shape)
    elif failure == "inference_leaf":
        with torch.inference_mode():
            params[bad] = params[bad].clone()
    elif failure == "tied_leaf":
        params["tied"] = params[bad]
    elif failure == "nan_lr":
        overrides["lr"] = torch.tensor(float("nan"))
    elif failure == "negative_override":
        overrides["weight_decay"] = -1.0
    elif failure == "state_dtype":
        field = "exp_avg" if rule.startswith("adam") else "momentum_buffer"
        if rule == "sgd":
            overrides["lr"] = float("inf")
        else:
            slots = dict(getattr(state, field))
            slots[bad] = slots[bad].to(torch.float16)
            state = state._replace(**{field: slots})
    before_params = {k: v.clone() for k, v in params.items()}
    before_state = fr.state_dict(state)
    with pytest.raises((TypeError, ValueError)):
        opt.step_(params, grads, state, **overrides)
    assert_identical({k: v.clone() for k, v in params.items()}, before_params)
    assert_identical(fr.state_dict(state), before_state)
