"""fr.train_step on awkward input: an aux that is a param, nn.Parameters that require
grad, Python floats that change between compiled calls, and the atomicity of a raising
call (params and state bit-identical), property-tested."""

from __future__ import annotations

import warnings

import hypothesis
import hypothesis.strategies as st
import optree
import pytest
import torch
from torch.func import functional_call

import functorch_reg as fr


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)


# ---------------------------------------------------------------------------------------
# item 9: an aux that is a param reports the value that produced the loss


def aux_of_params(model: torch.nn.Module):
    def loss(params, x, y):
        value = torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)
        aux = {"weight": params["0.weight"], "row": params["2.weight"][0], "scaled": 2 * value}
        return value, aux

    return loss


def test_an_aux_that_is_a_param_reports_its_value_before_the_update():
    # Before: aux["weight"] was the param itself, read after the in-place update.
    model = mlp()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in params.items()}
    opt = fr.sgd(lr=0.5, momentum=0.9)
    step = fr.train_step(aux_of_params(model), opt, has_aux=True, compile=False)
    value, aux = step(params, opt.init(params), *batch())
    assert not torch.equal(params["0.weight"], before["0.weight"])  # the step happened
    assert torch.equal(aux["weight"], before["0.weight"])
    assert torch.equal(aux["row"], before["2.weight"][0])
    torch.testing.assert_close(aux["scaled"], 2 * value, rtol=0, atol=0)


@pytest.mark.compile
@pytest.mark.slow
def test_a_compiled_step_reports_an_aux_param_before_the_update_too():
    def loss(params):
        value = params["scale"] * params["w"].square().sum()
        return value, {"scale": params["scale"], "head": params["w"][:2]}

    params = {"scale": torch.tensor(2.0), "w": torch.ones(3)}
    before = {k: v.clone() for k, v in params.items()}
    opt = fr.sgd(lr=0.1)
    step = fr.train_step(loss, opt, has_aux=True)
    _, aux = step(params, opt.init(params))
    assert not torch.equal(params["w"], before["w"])
    assert torch.equal(aux["scale"], before["scale"])
    assert torch.equal(aux["head"], before["w"][:2])


# ---------------------------------------------------------------------------------------
# item 21: nn.Parameters that require grad


def test_values_from_parameters_that_require_grad_hold_no_autograd_graph():
    # Before: each returned loss kept its step's autograd graph (and activations) alive.
    model = mlp()
    params = dict(model.named_parameters())  # the natural call: live, requires_grad
    reference = {k: v.detach().clone() for k, v in params.items()}
    opt = fr.adam(lr=0.01)
    step = fr.train_step(aux_of_params(model), opt, has_aux=True, compile=False)
    reference_step = fr.train_step(aux_of_params(model), opt, has_aux=True, compile=False)
    state, reference_state = opt.init(params), opt.init(reference)
    values = []
    for i in range(3):
        value, aux = step(params, state, *batch(i))
        expected, _ = reference_step(reference, reference_state, *batch(i))
        assert value.grad_fn is None and not value.requires_grad
        assert all(leaf.grad_fn is None for leaf in aux.values())
        assert torch.equal(value, expected)
        values.append(value)
    for name, param in params.items():  # the update itself is the detached one's
        assert torch.equal(param.detach(), reference[name]), name


# ---------------------------------------------------------------------------------------
# item 18: a Python float that changes every compiled call


def scaled_loss(params, lam):
    return lam * params["w"].square().sum()


@pytest.mark.compile
@pytest.mark.slow
def test_a_changing_python_float_warns_at_its_second_recompile_naming_it():
    # Before: every call recompiled silently and the 9th failed with
    # FailOnRecompileLimitHit, naming nothing.
    opt = fr.sgd(lr=0.1)
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    step = fr.train_step(scaled_loss, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(params, state, 0.1)
        step(params, state, 0.1)  # same value: no recompile, no warning
        step(params, state, 0.2)  # first recompile: a single change may be deliberate
        before = params["w"].clone()
        with pytest.raises(RuntimeWarning, match=r"args\[0\] .*Python float .*0-d tensor"):
            step(params, state, 0.3)
    assert torch.equal(params["w"], before)  # warned before anything ran
    step(params, state, torch.tensor(0.4))  # the advice: a tensor, silent from now on


@pytest.mark.compile
@pytest.mark.slow
def test_the_recompile_limit_error_names_the_changing_float():
    opt = fr.sgd(lr=0.1)
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    step = fr.train_step(scaled_loss, opt)
    lam = torch.tensor(0.5)
    with torch._dynamo.config.patch(recompile_limit=1):
        step(params, state, lam, lr=0.1)
        with pytest.raises(RuntimeError, match=r"recompile limit; override lr= .*0-d tensor"):
            step(params, state, lam, lr=0.05)


# ---------------------------------------------------------------------------------------
# atomicity: a raising call leaves params and state bit-identical


RULES = {
    "sgd_momentum": lambda: fr.sgd(lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda: fr.adam(lr=0.1),
    "adamw_amsgrad_prox": lambda: fr.adamw(
        lr=0.1, amsgrad=True, prox=fr.prox.l1, prox_strength=0.1
    ),
}
FAILURES = [
    "loss_not_scalar",
    "loss_raises",
    "aux_not_a_pair",
    "nan_lr",
    "negative_override",
    "state_dtype",
    "expanded_leaf",
    "inference_leaf",
    "tied_leaf",
]


class UserError(Exception):
    """What a user's loss raises half-way."""


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    shapes=st.lists(st.lists(st.integers(2, 3), min_size=1, max_size=2), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    rule=st.sampled_from(list(RULES)),
    failure=st.sampled_from(FAILURES),
    victim=st.integers(0, 2),
    warmup=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_a_raising_train_step_leaves_params_and_state_bit_identical(
    shapes, dtype, rule, failure, victim, warmup, seed
):
    generator = torch.Generator().manual_seed(seed)
    params = {
        f"layer{i}.w": torch.randn(shape, generator=generator, dtype=dtype)
        for i, shape in enumerate(shapes)
    }
    bad = list(params)[victim % len(params)]
    opt = RULES[rule]()

    def loss(params, target):
        total = sum((p - target).square().sum() for p in params.values())
        if failure == "loss_raises":
            raise UserError("the loss failed")
        if failure == "loss_not_scalar":
            return total * torch.ones(2, dtype=total.dtype)
        if failure == "aux_not_a_pair":
            return total, total, total
        return total, {"bad": params[bad]}

    step = fr.train_step(loss, opt, has_aux=True, compile=False)
    state = opt.init(params)
    target = torch.tensor(0.5, dtype=dtype)
    for _ in range(warmup):
        if failure in ("loss_raises", "loss_not_scalar", "aux_not_a_pair"):
            break
        step(params, state, target)
    overrides: dict = {}
    if failure == "nan_lr":
        overrides["lr"] = torch.tensor(float("nan"))
    elif failure == "negative_override":
        overrides["weight_decay"] = -1.0
    elif failure == "state_dtype":
        field = "momentum_buffer" if rule == "sgd_momentum" else "exp_avg"
        slots = dict(getattr(state, field))
        slots[bad] = slots[bad].to(torch.float16)
        state = state._replace(**{field: slots})
    elif failure == "expanded_leaf":
        p = params[bad]
        params[bad] = p.reshape(-1)[:1].reshape([1] * p.ndim).expand(p.shape)
    elif failure == "inference_leaf":
        with torch.inference_mode():
            params[bad] = params[bad].clone()
    elif failure == "tied_leaf":
        params["tied"] = params[bad]
        state = opt.init(params)
    before_params = {k: v.clone() for k, v in params.items()}
    before_state = fr.state_dict(state)
    with pytest.raises((TypeError, ValueError, RuntimeError, UserError)):
        step(params, state, target, **overrides)
    for name, value in params.items():
        assert value.dtype == before_params[name].dtype
        assert torch.equal(value, before_params[name]), name
    after_state = fr.state_dict(state)
    assert optree_equal(after_state, before_state)


def optree_equal(a, b) -> bool:
    leaves_a, spec_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, spec_b = optree.tree_flatten(b, none_is_leaf=True)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True
