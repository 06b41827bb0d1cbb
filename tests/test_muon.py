"""fr.muon beyond parity: the closed-form update RMS, conv weights, the AdamW part,
the decay options and bad input."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr
from functorch_reg.optim.muon import newton_schulz, polar


def assert_identical(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5), (1, 4), (16, 2), (4, 2, 3, 3)])
def test_match_rms_adamw_with_an_exact_polar_factor_has_update_rms_0_2_lr(shape):
    """U V^T of an A x B matrix has RMS 1/sqrt(max(A, B)): the update's RMS is 0.2 lr."""
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(shape, generator=generator, dtype=torch.float64)}
    grads = {"w": torch.randn(shape, generator=generator, dtype=torch.float64)}
    lr = 0.037
    opt = fr.muon(
        lr=lr,
        weight_decay=0.0,
        momentum=0.0,
        nesterov=False,
        adjust_lr_fn="match_rms_adamw",
        orthogonalize=polar,
    )
    new, _ = opt.step(params, grads, opt.init(params))
    rms = (new["w"] - params["w"]).square().mean().sqrt().item()
    assert rms == pytest.approx(0.2 * lr, rel=1e-12, abs=0)


def test_conv_weights_equal_the_flattened_matrix_computation():
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 3, 3, generator=generator)
    opt = fr.muon(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    params, flat = {"w": conv}, {"w": conv.reshape(4, -1)}
    state, flat_state = opt.init(params), opt.init(flat)
    for _ in range(5):
        g = torch.randn(4, 3, 3, 3, generator=generator)
        params, state = opt.step(params, {"w": g}, state)
        flat, flat_state = opt.step(flat, {"w": g.reshape(4, -1)}, flat_state)
    assert params["w"].shape == (4, 3, 3, 3)
    assert_identical(params["w"].reshape(4, -1), flat["w"])


@pytest.mark.slow
def test_a_cnn_with_batchnorm_and_dropout_trains_with_muon_and_an_adamw_part():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    )
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    opt = fr.TorchOptimizer(
        model.named_parameters(),
        fr.muon(lr=0.05, weight_decay=0.01, adam=fr.adamw(lr=1e-2, weight_decay=0.01)),
    )
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # The conv weight and the head are Muon's; BatchNorm's and the biases AdamW's.
    state = opt.state_dict()["state"]
    assert state[0]["exp_avg_sq"].numel() == 0  # conv weight
    assert state[1]["exp_avg_sq"].shape == (4,)  # conv bias


def test_decay_uses_the_unadjusted_lr_as_torch_and_the_adjusted_one_on_request():
    """A zero gradient leaves only the decay: w (1 - lr wd) or w (1 - lr ratio wd)."""
    params = {"w": torch.randn(8, 2, dtype=torch.float64)}
    grads = {"w": torch.zeros(8, 2, dtype=torch.float64)}
    lr, wd, ratio = 0.1, 0.3, 2.0  # sqrt(max(1, 8 / 2)) = 2, "original"
    for decay_lr, expected in [("unadjusted", 1 - lr * wd), ("adjusted", 1 - lr * ratio * wd)]:
        opt = fr.muon(lr=lr, weight_decay=wd, decay_lr=decay_lr)
        new, _ = opt.step(params, grads, opt.init(params))
        torch.testing.assert_close(new["w"], params["w"] * expected, rtol=1e-15, atol=0)


def test_decay_to_cautious_decay_and_schedule_scaling_apply_to_matrices():
    params = {"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)}
    reference = {"w": torch.ones(2, 2, dtype=torch.float64)}
    zero = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    opt = fr.muon(lr=0.1, weight_decay=0.5, decay_to=reference)
    new, _ = opt.step(params, zero, opt.init(params))
    torch.testing.assert_close(new["w"], params["w"] - 0.05 * (params["w"] - 1.0))
    opt = fr.muon(lr=0.1, weight_decay=0.5, decay_scaling="schedule", decay_reference_lr=0.2)
    new, _ = opt.step(params, zero, opt.init(params))
    torch.testing.assert_close(new["w"], params["w"] * (1 - 0.25))
    # Cautious: with the gradient's direction, only the coordinates whose update and
    # weight agree in sign decay.
    grads = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)}
    direction = polar(grads["w"])
    opt = fr.muon(
        lr=0.1,
        weight_decay=0.5,
        momentum=0.0,
        nesterov=False,
        cautious_decay=True,
        orthogonalize=polar,
    )
    new, _ = opt.step(params, grads, opt.init(params))
    agree = torch.sign(direction) * torch.sign(params["w"]) >= 0
    decayed = torch.where(agree, params["w"] * 0.95, params["w"])
    torch.testing.assert_close(new["w"], decayed - 0.1 * direction)


def test_the_adamw_part_keeps_its_own_lr_and_decay_and_takes_adam_overrides():
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)}
    grads = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)}
    adamw = fr.adamw(lr=3e-3, weight_decay=0.2)
    opt = fr.muon(lr=0.02, adam=adamw)
    assert opt.hyperparams["adam_weight_decay"] == 0.2
    new, _ = opt.step(params, grads, opt.init(params), adam_lr=1e-2)
    alone, _ = adamw.step(
        {"b": params["b"]}, {"b": grads["b"]}, adamw.init({"b": params["b"]}), lr=1e-2
    )
    assert_identical(new["b"], alone["b"])


def test_where_routes_a_matrix_to_the_adamw_part():
    generator = torch.Generator().manual_seed(0)
    params = {
        "embed": torch.randn(6, 3, generator=generator),
        "w": torch.randn(3, 3, generator=generator),
    }
    grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
    adamw = fr.adamw(lr=1e-2, weight_decay=0.1)
    opt = fr.muon(lr=0.02, adam=adamw, where=lambda name, leaf: name != "embed")
    new, state = opt.step(params, grads, opt.init(params))
    alone, _ = adamw.step(
        {"embed": params["embed"]},
        {"embed": grads["embed"]},
        adamw.init({"embed": params["embed"]}),
    )
    assert_identical(new["embed"], alone["embed"])
    assert state.exp_avg_sq["w"].numel() == 0


def test_a_vector_without_an_adamw_part_is_refused_before_anything_changes():
    params = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt = fr.muon(lr=0.02)
    state = opt.init(params)
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"leaf 'b' has shape \(3,\).*adam=fr.adamw"):
        opt.step_(params, grads, state)
    assert_identical(params, before)
    assert_identical(state.momentum_buffer, {k: torch.zeros_like(v) for k, v in params.items()})
    # A frozen vector (None gradient) is fine.
    opt.step_(params, {"w": grads["w"], "b": None}, state)
    assert_identical(params["b"], before["b"])


def test_a_matrix_with_no_elements_is_refused_at_init():
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(0, 3\)"):
        fr.muon().init({"w": torch.zeros(0, 3)})


def test_a_prox_that_couples_entries_is_refused_and_an_elementwise_one_gives_zeros():
    with pytest.raises(ValueError, match="prox must act entry by entry"):
        fr.muon(prox=fr.prox.group_lasso)
    opt = fr.muon(lr=0.02, prox=fr.prox.l1, prox_strength=20.0)
    params = {"w": torch.randn(4, 4)}
    new, _ = opt.step(params, {"w": torch.randn(4, 4)}, opt.init(params))
    assert (new["w"] == 0).any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        fr.muon(adjust_lr_fn="sqrt")
    with pytest.raises(ValueError, match="decay_lr"):
        fr.muon(decay_lr="both")
    with pytest.raises(ValueError, match="ns_steps"):
        fr.muon(ns_steps=100)
    with pytest.raises(TypeError, match="adam must be fr.adam"):
        fr.muon(adam=fr.sgd(lr=0.1))
    with pytest.raises(TypeError, match="no AdamW part"):
        opt = fr.muon()
        params = {"w": torch.ones(2, 2)}
        opt.step(params, params, opt.init(params), adam_lr=0.1)


def test_newton_schulz_approximates_the_polar_factor():
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(8, 5, generator=generator)
    approx = newton_schulz(g, dtype=torch.float32)
    singular_values = torch.linalg.svdvals(approx)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    assert approx.shape == g.shape


def test_step_refuses_tied_weights_in_place_before_anything_changes():
    weight = torch.randn(3, 3)
    params = {"a": weight, "b": weight}  # tied: one tensor under two names
    opt = fr.muon(lr=0.02)
    state = opt.init({"a": torch.zeros(3, 3), "b": torch.zeros(3, 3)})
    before = weight.clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step_(params, {"a": torch.ones(3, 3), "b": torch.ones(3, 3)}, state)
    assert_identical(weight, before)
    assert_identical(state.momentum_buffer["a"], torch.zeros(3, 3))


def test_the_adamw_part_in_the_flat_layout_equals_the_per_leaf_layout():
    """Vectors packed into one buffer (1-D, so the AdamW part's), matrices as leaves."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (5, 4), "0.bias": (5,), "1.weight": (2, 5), "1.bias": (2,)}
    params = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    vectors = {k: v for k, v in params.items() if v.ndim < 2}
    flat = fr.flat.pack(vectors, {"vectors": fr.select.all()})
    mixed = {**{k: v for k, v in params.items() if v.ndim >= 2}, **flat.buffers}
    opt = fr.muon(lr=0.02, adam=fr.adamw(lr=1e-2, weight_decay=0.1))
    state, mixed_state = opt.init(params), opt.init(mixed)
    assert mixed_state.exp_avg_sq["vectors"].shape == flat.buffers["vectors"].shape
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        mixed_grads = {**{k: grads[k] for k in mixed if k in grads}, **flat.pack_like(grads)}
        params, state = opt.step(params, grads, state)
        opt.step_(mixed, {k: mixed_grads[k] for k in mixed}, mixed_state)
    unpacked = flat.unpack({"vectors": mixed["vectors"]})
    for name in vectors:
        assert_identical(unpacked[name], params[name])
    for name in ("0.weight", "1.weight"):
        assert_identical(mixed[name], params[name])
