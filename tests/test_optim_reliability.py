"""Reliability of the update rules, transforms, flat layout and adapter (issue 20):
one prox convention, ``validate`` with params, atomic in-place updates, flat vs per-leaf
equality, references, and checkpoints."""

from __future__ import annotations

import functools

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
