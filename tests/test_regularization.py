# ruff: noqa: E501  (recorded signatures and messages, kept verbatim)
"""The keyword tail the factories share (functorch_reg.optim.regularization): the public
factories keep their signatures, hyperparameters (names and order: TorchOptimizer's
param groups show them) and errors, now that one helper reads the tail for all five.

The expected values were recorded from the factories before the helper existed."""

from __future__ import annotations

import inspect

import pytest
import torch

import functorch_reg as fr
from functorch_reg.optim.regularization import regularization

SIGNATURES = {
    "sgd": "(lr: 'Scalar', momentum: 'Scalar' = 0.0, dampening: 'Scalar' = 0.0, nesterov: 'bool' = False, weight_decay: 'Scalar' = 0.0, maximize: 'bool' = False, decoupled: 'bool' = False, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_scaling: 'DecayScaling' = 'lr', decay_reference_lr: 'Scalar | None' = None, decay_timescale: 'Scalar | None' = None, cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None, fused: 'bool' = False, prox_metric: 'ProxMetric' = 'euclidean') -> 'Optimizer'",
    "adam": "(lr: 'Scalar' = 0.001, betas: 'tuple[Scalar, Scalar]' = (0.9, 0.999), eps: 'Scalar' = 1e-08, weight_decay: 'Scalar' = 0.0, amsgrad: 'bool' = False, maximize: 'bool' = False, decoupled: 'bool' = False, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_scaling: 'DecayScaling' = 'lr', decay_reference_lr: 'Scalar | None' = None, decay_timescale: 'Scalar | None' = None, cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None, fused: 'bool' = False, prox_metric: 'ProxMetric' = 'euclidean') -> 'Optimizer'",
    "adamw": "(lr: 'Scalar' = 0.001, betas: 'tuple[Scalar, Scalar]' = (0.9, 0.999), eps: 'Scalar' = 1e-08, weight_decay: 'Scalar | None' = None, amsgrad: 'bool' = False, maximize: 'bool' = False, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_scaling: 'DecayScaling' = 'lr', decay_reference_lr: 'Scalar | None' = None, decay_timescale: 'Scalar | None' = None, cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None, fused: 'bool' = False, prox_metric: 'ProxMetric' = 'euclidean') -> 'Optimizer'",
    "lion": "(lr: 'Scalar' = 0.0001, betas: 'tuple[Scalar, Scalar]' = (0.9, 0.99), weight_decay: 'Scalar' = 0.0, decoupled_weight_decay: 'bool' = False, maximize: 'bool' = False, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_scaling: 'DecayScaling | None' = None, decay_reference_lr: 'Scalar | None' = None, cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None) -> 'Optimizer'",
    "muon": "(lr: 'Scalar' = 0.001, weight_decay: 'Scalar' = 0.1, momentum: 'Scalar' = 0.95, nesterov: 'bool' = True, ns_coefficients: 'tuple[float, float, float]' = (3.4445, -4.775, 2.0315), eps: 'float' = 1e-07, ns_steps: 'int' = 5, adjust_lr_fn: \"Literal['original', 'match_rms_adamw'] | None\" = None, *, adam: 'Optimizer | None' = None, where: 'Where' = None, decay_lr: \"Literal['unadjusted', 'adjusted']\" = 'unadjusted', orthogonalize: 'Callable[[Tensor], Tensor] | None' = None, ns_dtype: 'torch.dtype' = torch.bfloat16, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, decay_scaling: 'DecayScaling' = 'lr', decay_reference_lr: 'Scalar | None' = None, cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None) -> 'Optimizer'",
    "schedule_free_adamw": "(lr: 'Scalar' = 0.0025, betas: 'tuple[Scalar, Scalar]' = (0.9, 0.999), eps: 'Scalar' = 1e-08, weight_decay: 'Scalar' = 0.0, warmup_steps: 'Scalar' = 0.0, r: 'Scalar' = 0.0, weight_lr_power: 'Scalar' = 2.0, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_at: \"Literal['y', 'z']\" = 'y', decay_scaling: \"Literal['lr']\" = 'lr', cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None) -> 'Optimizer'",
    "schedule_free_sgd": "(lr: 'Scalar' = 1.0, momentum: 'Scalar' = 0.9, weight_decay: 'Scalar' = 0.0, warmup_steps: 'Scalar' = 0.0, r: 'Scalar' = 0.0, weight_lr_power: 'Scalar' = 2.0, mask: 'Where' = None, prox: 'Prox | None' = None, prox_strength: 'Scalar' = 0.0, skip_nonfinite: 'bool' = False, *, decay_at: \"Literal['y', 'z']\" = 'y', decay_scaling: \"Literal['lr']\" = 'lr', cautious_decay: 'bool' = False, decay_to: 'Params | None' = None, clip_grad_norm: 'Scalar | None' = None) -> 'Optimizer'",
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_factory_signatures_are_unchanged(name):
    assert str(inspect.signature(getattr(fr, name))) == SIGNATURES[name]
    assert getattr(fr.optim, name) is getattr(fr, name)


HYPERPARAMS = {
    "sgd": (lambda: fr.sgd(lr=0.1), "lr momentum dampening weight_decay prox_strength"),
    "sgd_decoupled_timescale": (
        lambda: fr.sgd(
            lr=0.1, momentum=0.9, decoupled=True, decay_timescale=100.0, clip_grad_norm=1.0
        ),
        "lr momentum dampening prox_strength decay_timescale decay_reference_lr clip_grad_norm",
    ),
    "adam": (lambda: fr.adam(), "lr betas eps weight_decay prox_strength"),
    "adamw_schedule": (
        lambda: fr.adamw(decay_scaling="schedule", decay_reference_lr=0.01),
        "lr betas eps weight_decay prox_strength decay_reference_lr",
    ),
    "adamw_timescale_corrected": (
        lambda: fr.adamw(
            decay_timescale=50.0, decay_scaling="corrected", prox=fr.prox.l1, prox_strength=0.1
        ),
        "lr betas eps prox_strength decay_timescale decay_reference_lr",
    ),
    "lion": (lambda: fr.lion(), "lr betas weight_decay prox_strength"),
    "lion_decoupled": (
        lambda: fr.lion(decoupled_weight_decay=True, clip_grad_norm=2.0),
        "lr betas weight_decay prox_strength decay_reference_lr clip_grad_norm",
    ),
    "muon": (lambda: fr.muon(), "lr weight_decay momentum prox_strength"),
    "muon_schedule_adam": (
        lambda: fr.muon(decay_scaling="schedule", adam=fr.adamw()),
        "lr weight_decay momentum prox_strength decay_reference_lr adam_lr adam_betas adam_eps "
        "adam_weight_decay adam_prox_strength",
    ),
    "schedule_free_adamw": (
        lambda: fr.schedule_free_adamw(),
        "lr betas eps weight_decay warmup_steps r weight_lr_power prox_strength",
    ),
    "schedule_free_sgd": (
        lambda: fr.schedule_free_sgd(clip_grad_norm=1.0),
        "lr momentum weight_decay warmup_steps r weight_lr_power prox_strength clip_grad_norm",
    ),
}


@pytest.mark.parametrize("name", list(HYPERPARAMS))
def test_hyperparameters_keep_their_names_and_order(name):
    factory, expected = HYPERPARAMS[name]
    assert list(factory().hyperparams) == expected.split()


BAD = {
    "adam_cautious_coupled": lambda: fr.adam(cautious_decay=True),
    "sgd_decay_to_coupled": lambda: fr.sgd(lr=0.1, decay_to={"w": torch.zeros(1)}),
    "adam_timescale_coupled": lambda: fr.adam(decay_timescale=10.0),
    "adam_scaling_coupled": lambda: fr.adam(decay_scaling="schedule"),
    "adamw_bad_scaling": lambda: fr.adamw(decay_scaling="bogus"),
    "adamw_reference_lr_unused": lambda: fr.adamw(decay_reference_lr=0.1),
    "adamw_both": lambda: fr.adamw(weight_decay=0.1, decay_timescale=10.0),
    "adamw_timescale_small": lambda: fr.adamw(decay_timescale=0.5),
    "sgd_reference_lr_zero": lambda: fr.sgd(lr=0.0, decoupled=True, decay_scaling="schedule"),
    "adam_bad_prox_metric": lambda: fr.adam(prox_metric="bogus"),
    "sgd_metric_without_prox": lambda: fr.sgd(lr=0.1, prox_metric="preconditioned"),
    "sgd_metric_dampening": lambda: fr.sgd(
        lr=0.1, momentum=0.9, dampening=1.0, prox=fr.prox.l1, prox_metric="preconditioned"
    ),
    "adam_fused_cautious": lambda: fr.adamw(fused=True, cautious_decay=True),
    "sgd_fused_decoupled": lambda: fr.sgd(lr=0.1, fused=True, decoupled=True),
    "sgd_nesterov": lambda: fr.sgd(lr=0.1, nesterov=True),
    "sgd_negative_decay": lambda: fr.sgd(lr=0.1, weight_decay=-1.0),
    "adam_negative_prox": lambda: fr.adam(prox_strength=-1.0),
    "adam_clip_negative": lambda: fr.adam(clip_grad_norm=-1.0),
    "adam_decay_to_not_tensor": lambda: fr.adamw(decay_to={"w": 1.0}),
    "sgd_factor": lambda: fr.sgd(
        lr=10.0, decoupled=True, weight_decay=0.5, decay_scaling="schedule", decay_reference_lr=1.0
    ),
    "lion_decoupled_scaling": lambda: fr.lion(decoupled_weight_decay=True, decay_scaling="lr"),
    "lion_bad_scaling": lambda: fr.lion(decay_scaling="bogus"),
    "lion_reference_lr_unused": lambda: fr.lion(decay_reference_lr=0.1),
    "lion_negative_decay": lambda: fr.lion(weight_decay=-1.0),
    "muon_bad_scaling": lambda: fr.muon(decay_scaling="bogus"),
    "muon_ns_steps": lambda: fr.muon(ns_steps=100),
    "muon_group_lasso": lambda: fr.muon(prox=fr.prox.group_lasso),
    "muon_adam_type": lambda: fr.muon(adam=fr.sgd(lr=0.1)),
    "muon_negative_prox": lambda: fr.muon(prox_strength=-1.0),
    "sf_scaling": lambda: fr.schedule_free_adamw(decay_scaling="schedule"),
    "sf_decay_at": lambda: fr.schedule_free_sgd(decay_at="x"),
    "sf_negative_decay": lambda: fr.schedule_free_adamw(weight_decay=-1.0),
    "sf_decay_to_not_tensor": lambda: fr.schedule_free_sgd(decay_to={"w": "a"}),
    "sf_clip": lambda: fr.schedule_free_sgd(clip_grad_norm=float("nan")),
}

ERRORS = {
    "adam_cautious_coupled": (
        ValueError,
        "adam: cautious_decay applies to decoupled decay only; coupled decay (g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True (or use adamw)",
    ),
    "sgd_decay_to_coupled": (
        ValueError,
        "sgd: decay_to applies to decoupled decay only; coupled decay (g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True (or use adamw)",
    ),
    "adam_timescale_coupled": (
        ValueError,
        "adam: decay_timescale applies to decoupled decay only; coupled decay (g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True (or use adamw)",
    ),
    "adam_scaling_coupled": (
        ValueError,
        "adam: decay_scaling applies to decoupled decay only; coupled decay (g <- g + weight_decay * w) is an L2 penalty: pass decoupled=True (or use adamw)",
    ),
    "adamw_bad_scaling": (
        ValueError,
        "adamw: decay_scaling must be one of 'lr', 'schedule', 'corrected', 'none', got 'bogus'",
    ),
    "adamw_reference_lr_unused": (
        ValueError,
        "adamw: decay_reference_lr needs decay_scaling='schedule' or 'corrected', or a decay_timescale (with 'lr' scaling)",
    ),
    "adamw_both": (
        ValueError,
        "adamw: pass either weight_decay or decay_timescale (which sets the decay as 1 / (lr * weight_decay) = decay_timescale steps), got both",
    ),
    "adamw_timescale_small": (
        ValueError,
        "adamw: decay_timescale=0.5 is outside [1.0, inf] or not finite",
    ),
    "sgd_reference_lr_zero": (
        ValueError,
        "sgd: decay_scaling='schedule' divides by the initial lr, which must be positive; got 0.0 (pass decay_reference_lr=)",
    ),
    "adam_bad_prox_metric": (
        ValueError,
        "adam: prox_metric must be 'euclidean' or 'preconditioned', got 'bogus'",
    ),
    "sgd_metric_without_prox": (
        ValueError,
        "sgd: prox_metric='preconditioned' sets the metric of the prox step; pass prox= (e.g. fr.prox.l1) and prox_strength=",
    ),
    "sgd_metric_dampening": (
        ValueError,
        "sgd: prox_metric='preconditioned' needs dampening < 1 (with dampening=1 the momentum buffer never takes a gradient after the first step)",
    ),
    "adam_fused_cautious": (
        ValueError,
        "adamw: fused=True runs torch's fused kernel, which implements decay_scaling='lr' without cautious_decay or decay_to; drop fused=True",
    ),
    "sgd_fused_decoupled": (
        ValueError,
        "sgd: fused=True runs torch's fused kernel, which implements coupled decay only; drop fused=True or decoupled=True",
    ),
    "sgd_nesterov": (ValueError, "sgd: nesterov needs momentum > 0 and dampening == 0"),
    "sgd_negative_decay": (
        ValueError,
        "sgd: weight_decay=-1.0 is outside [0.0, inf] or not finite",
    ),
    "adam_negative_prox": (
        ValueError,
        "adam: prox_strength=-1.0 is outside [0.0, inf] or not finite",
    ),
    "adam_clip_negative": (
        ValueError,
        "adam: clip_grad_norm=-1.0 is outside [0.0, inf] or not finite",
    ),
    "adam_decay_to_not_tensor": (TypeError, "adamw: decay_to leaf 'w' must be a tensor, got float"),
    "sgd_factor": (
        ValueError,
        "sgd: decay_scaling='schedule' shrinks the weights by 1 - c = -4.0 <= 0 (lr=10.0, decay_reference_lr=1.0, weight_decay=0.5), which zeroes them or flips their signs; lower weight_decay or lr, or set decay_reference_lr to this group's initial lr",
    ),
    "lion_decoupled_scaling": (
        ValueError,
        "lion: decoupled_weight_decay=True is decay_scaling='schedule' (the decay divided by the initial lr); it cannot combine with 'lr'",
    ),
    "lion_bad_scaling": (
        ValueError,
        "lion: decay_scaling must be one of 'lr', 'schedule', 'corrected', 'none', got 'bogus'",
    ),
    "lion_reference_lr_unused": (
        ValueError,
        "lion: decay_reference_lr needs decay_scaling='schedule' or 'corrected', or a decay_timescale (with 'lr' scaling)",
    ),
    "lion_negative_decay": (
        ValueError,
        "lion: weight_decay=-1.0 is outside [0.0, inf] or not finite",
    ),
    "muon_bad_scaling": (
        ValueError,
        "muon: decay_scaling must be one of 'lr', 'schedule', 'corrected', 'none', got 'bogus'",
    ),
    "muon_ns_steps": (ValueError, "muon: ns_steps must be an int in [0, 100), got 100"),
    "muon_group_lasso": (
        ValueError,
        "muon: prox must act entry by entry (e.g. fr.prox.l1, fr.prox.l2, fr.prox.elastic_net); this one couples entries (e.g. group_lasso), which has no meaning for an orthogonalized update; apply it to the AdamW part (adam=fr.adamw(prox=...)) or as a penalty",
    ),
    "muon_adam_type": (
        TypeError,
        "muon: adam must be fr.adam(...) or fr.adamw(...) (its state an AdamState), got an optimizer whose state is a SGDState",
    ),
    "muon_negative_prox": (
        ValueError,
        "muon: prox_strength=-1.0 is outside [0.0, inf] or not finite",
    ),
    "sf_scaling": (
        ValueError,
        "schedule_free_adamw: decay_scaling='schedule' does not apply: the decay enters the step direction, which both sequences follow with the scheduled lr (so it scales with the lr already); only 'lr' is accepted",
    ),
    "sf_decay_at": (ValueError, "schedule_free_sgd: decay_at must be 'y' or 'z', got 'x'"),
    "sf_negative_decay": (
        ValueError,
        "schedule_free_adamw: weight_decay=-1.0 is outside [0.0, inf] or not finite",
    ),
    "sf_decay_to_not_tensor": (
        TypeError,
        "schedule_free_sgd: decay_to leaf 'w' must be a tensor, got str",
    ),
    "sf_clip": (
        ValueError,
        "schedule_free_sgd: clip_grad_norm=nan is outside [0.0, inf] or not finite",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_errors_are_unchanged(name):
    error, message = ERRORS[name]
    with pytest.raises(error) as info:
        BAD[name]()
    assert str(info.value) == message


def test_one_helper_turns_the_tail_into_a_rule_with_decay_prox_and_clipping():
    """A plain gradient step built through the helper, with decoupled decay toward a
    reference, an L1 prox and clipping, equals the same step written by hand (float64)."""

    def rule(p, g, slots, row, h, decay, reference):
        if decay:
            p = p - h["lr"] * h["weight_decay"] * (p - reference)
        return p - h["lr"] * g, slots

    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    anchor = {"w": torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)}
    arguments = {
        "lr": 0.1,
        "weight_decay": 0.2,
        "decoupled": True,
        "mask": None,
        "prox": fr.prox.l1,
        "prox_strength": 0.3,
        "skip_nonfinite": False,
        "decay_to": anchor,
        "clip_grad_norm": 1.0,
    }
    options = regularization("gd", arguments)
    assert options.hyperparams == {"weight_decay": 0.2, "prox_strength": 0.3}
    assert options.check is None and not options.in_metric
    opt = options.finish(
        options.build({"lr": 0.1}, fr.optim.LionState, lambda p: (None,), rule, {})
    )
    assert list(opt.hyperparams) == ["lr", "weight_decay", "prox_strength", "clip_grad_norm"]
    grads = {"w": torch.tensor([3.0, 0.0, -4.0], dtype=torch.float64)}
    new, _ = opt.step(params, grads, opt.init(params))
    g = grads["w"] * (1.0 / (5.0 + 1e-6))  # clipped to norm 1, as clip_grad_norm_
    w = params["w"] - 0.1 * 0.2 * (params["w"] - anchor["w"]) - 0.1 * g
    expected = torch.sign(w) * torch.clamp(w.abs() - 0.1 * 0.3, min=0)
    torch.testing.assert_close(new["w"], expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="gd: cautious_decay applies to decoupled decay only"):
        regularization("gd", {**arguments, "decoupled": False, "cautious_decay": True})
    timescale = regularization("gd", {**arguments, "weight_decay": 0.0, "decay_timescale": 10.0})
    assert list(timescale.hyperparams) == ["prox_strength", "decay_timescale", "decay_reference_lr"]
    assert regularization("gd", arguments, check_factor=True).check is not None
