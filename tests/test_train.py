"""fr.train_step: the same trajectory as a hand-written grad + step_ loop, eager and
compiled; one graph whatever lr and lambda do; a pure variant that vmaps; clear errors
with nothing modified. Compiles are few and tiny: each costs seconds on CPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.func import functional_call, grad, vmap

import functorch_reg as fr
from functorch_reg.tree import flatten

from .conftest import mlp_params


def model_for(params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The architecture of ``conftest.mlp_params``; its own weights are never used."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return model.to(device=params["0.weight"].device, dtype=params["0.weight"].dtype)


def penalized_loss(model: torch.nn.Module):
    def loss(params, x, y, lam):
        mse = torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)
        return mse + lam * fr.penalties.l1(params, where=fr.select.weights())

    return loss


def batches(n: int, dtype=torch.float32, device="cpu", size: int = 16):
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(size, 4, generator=generator, dtype=dtype)
        y = torch.randn(size, 3, generator=generator, dtype=dtype)
        yield x.to(device), y.to(device)


def schedule(i: int, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A different lr and lambda every step, as 0-d tensors."""
    lr = torch.tensor(1e-2 / (1 + i), dtype=dtype, device=device)
    lam = torch.tensor(1e-3 * (1 + i % 3), dtype=dtype, device=device)
    return lr, lam


def reference_run(params, opt, loss, data, dtype=torch.float32, device="cpu"):
    """The loop train_step replaces: grad of the loss, then opt.step_."""
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    values = []
    for i, (x, y) in enumerate(data):
        lr, lam = schedule(i, dtype, device)
        values.append(loss(params, x, y, lam))
        opt.step_(params, grad(loss)(params, x, y, lam), state, lr=lr)
    return params, state, values


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_eager_step_equals_a_hand_written_loop_exactly_in_fp64():
    params = mlp_params(torch.float64)
    model, opt = model_for(params), fr.adamw(lr=1e-2, weight_decay=1e-2, mask="*.weight")
    loss = penalized_loss(model)
    expected, expected_state, expected_values = reference_run(
        params, opt, loss, batches(5, torch.float64), torch.float64
    )
    state = opt.init(params)
    step = fr.train_step(loss, opt, compile=False)
    for i, (x, y) in enumerate(batches(5, torch.float64)):
        lr, lam = schedule(i, torch.float64)
        value = step(params, state, x, y, lam, lr=lr)
        assert value.ndim == 0 and value.dtype == torch.float64
        assert torch.equal(value, expected_values[i])
    for name in params:
        assert torch.equal(params[name], expected[name]), name
    assert torch.equal(state.beta_powers, expected_state.beta_powers)
    assert all(torch.equal(state.exp_avg_sq[k], expected_state.exp_avg_sq[k]) for k in params)


def test_has_aux_returns_the_aux_of_the_params_before_the_update():
    params = mlp_params()
    model, opt = model_for(params), fr.sgd(lr=0.1)

    def loss(params, x, y):
        out = functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y), {"out": out}

    x, y = next(batches(1))
    before = {k: v.clone() for k, v in params.items()}
    step = fr.train_step(loss, opt, has_aux=True, compile=False)
    value, aux = step(params, opt.init(params), x, y)
    expected_out = functional_call(model, before, (x,))
    torch.testing.assert_close(aux["out"], expected_out, rtol=0, atol=0)
    torch.testing.assert_close(value, torch.nn.functional.mse_loss(expected_out, y))
    assert not torch.equal(params["0.weight"], before["0.weight"])


def test_overrides_reach_the_optimizer():
    """weight_decay and prox_strength per call, as opt.step_ takes them."""
    params = mlp_params()
    opt = fr.sgd(lr=0.1, weight_decay=0.0, prox=fr.prox.l1, mask="*.weight")
    loss = penalized_loss(model_for(params))
    x, y = next(batches(1))
    lam, wd, rho = torch.tensor(0.0), torch.tensor(0.5), torch.tensor(2.0)
    expected = {k: v.clone() for k, v in params.items()}
    opt.step_(expected, grad(loss)(expected, x, y, lam), opt.init(expected), weight_decay=wd,
              prox_strength=rho)  # fmt: skip
    step = fr.train_step(loss, opt, compile=False)
    step(params, opt.init(params), x, y, lam, weight_decay=wd, prox_strength=rho)
    for name in params:
        assert torch.equal(params[name], expected[name]), name
    assert (params["0.weight"] == 0).any(), "the prox strength was applied"


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_step_matches_the_loop_in_one_graph_while_lr_and_lambda_change(device):
    """Then a new batch size recompiles once, and a third size not at all."""
    params = mlp_params(device=device)
    model = model_for(params)
    opt = fr.adamw(lr=1e-2, weight_decay=1e-2, mask=fr.select.weights())
    loss = penalized_loss(model)
    expected, expected_state, expected_values = reference_run(
        params, opt, loss, batches(6, device=device), device=device
    )
    state = opt.init(params)
    step = fr.train_step(loss, opt)
    before = graphs()
    for i, (x, y) in enumerate(batches(6, device=device)):
        lr, lam = schedule(i, device=device)
        if i == 0:
            value, code = run_and_get_code(step, params, state, x, y, lam, lr=lr)
        else:
            value = step(params, state, x, y, lam, lr=lr)
        torch.testing.assert_close(value, expected_values[i], rtol=1e-6, atol=1e-7)
    if device == "cpu":
        # The forward Linears' addmm only: the L1 gradient of each weight is added in the
        # update's loop, not written out as the bias of a backward addmm.
        assert "\n".join(code).count("extern_kernels.addmm(") == 2
    assert graphs() - before == 1
    torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.exp_avg, expected_state.exp_avg, rtol=1e-5, atol=1e-7)

    lr, lam = schedule(0, device=device)
    for size in (5, 7, 9):
        x, y = next(batches(1, device=device, size=size))
        expected_value = loss(params, x, y, lam)
        torch.testing.assert_close(step(params, state, x, y, lam, lr=lr), expected_value)
    assert graphs() - before == 2, "one recompile for the first new shape, then dynamic"


@pytest.mark.compile
@pytest.mark.slow
def test_reduce_overhead_mode_steps_in_place_and_returns_values_to_keep(device):
    """CUDA graphs on CUDA (static param and state addresses); on CPU the default mode."""
    params = mlp_params(device=device)
    model, opt = model_for(params), fr.sgd(lr=0.05, momentum=0.9)
    loss = penalized_loss(model)
    expected, _, expected_values = reference_run(
        params, opt, loss, batches(4, device=device), device=device
    )
    state = opt.init(params)
    step = fr.train_step(loss, opt, mode="reduce-overhead")
    values = []
    for i, (x, y) in enumerate(batches(4, device=device)):
        lr, lam = schedule(i, device=device)
        values.append(step(params, state, x, y, lam, lr=lr))
    torch.testing.assert_close(torch.stack(values), torch.stack(expected_values))
    torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
@pytest.mark.slow
def test_each_train_step_compiles_its_own_code():
    """Dynamo's recompile limit counts per code object; train steps do not share one."""
    torch._dynamo.config.recompile_limit, saved = 1, torch._dynamo.config.recompile_limit
    try:
        for scale in (1.0, 2.0):
            params = {"w": torch.ones(2)}
            opt = fr.sgd(lr=0.5)

            def loss(params, scale=scale):
                return scale * params["w"].square().sum()

            step = fr.train_step(loss, opt)
            torch.testing.assert_close(step(params, opt.init(params)), torch.tensor(2 * scale))
            torch.testing.assert_close(params["w"], torch.full((2,), 1 - 2 * scale * 0.5))
    finally:
        torch._dynamo.config.recompile_limit = saved


def test_pure_step_under_vmap_equals_a_loop_over_members():
    members = [mlp_params(seed=seed) for seed in range(3)]
    model, opt = model_for(members[0]), fr.adam(lr=1e-2, prox=fr.prox.l1, mask="*.weight")
    step = fr.train_step(penalized_loss(model), opt)
    lams = torch.tensor([0.0, 1e-2, 1e-1])
    rhos = torch.tensor([0.0, 0.5, 1.0])
    x, y = next(batches(1))

    def member(params, state, lam, rho):
        return step.pure(params, state, x, y, lam, prox_strength=rho)

    stacked = vmap(member)(fr.stack(members), fr.stack([opt.init(m) for m in members]), lams, rhos)
    for i, params in enumerate(members):
        state = opt.init(params)
        new_params, new_state, value = step.pure(
            params, state, x, y, lams[i], prox_strength=rhos[i]
        )
        torch.testing.assert_close(fr.unstack(stacked[0])[i], new_params)
        torch.testing.assert_close(fr.unstack(stacked[1])[i], new_state)
        torch.testing.assert_close(stacked[2][i], value)
        assert torch.equal(params["0.weight"], members[i]["0.weight"]), "pure: inputs untouched"


def snapshot(tree):
    return [leaf.clone() for leaf in flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def assert_untouched(tree, saved):
    leaves = [leaf for leaf in flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(leaves, saved, strict=True))


@pytest.mark.parametrize(
    ("output", "has_aux", "error", "match"),
    [
        (lambda v: v.expand(3), False, ValueError, r"0-d floating-point tensor, got .* \(3,\)"),
        (lambda v: (v, v), False, TypeError, "has_aux=True"),
        (lambda v: v, True, TypeError, r"pair \(value, aux\), got a torch.float32 tensor"),
        (lambda v: (v.expand(2), v), True, ValueError, "0-d floating-point tensor"),
        (lambda v: 1.0, False, ValueError, "got float"),
    ],
)
def test_a_bad_loss_output_raises_before_anything_changes(output, has_aux, error, match):
    params = {"w": torch.ones(3)}
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    saved = snapshot((params, state))
    step = fr.train_step(lambda p: output(p["w"].square().sum()), opt, has_aux=has_aux,
                         compile=False)  # fmt: skip
    with pytest.raises(error, match=match):
        step(params, state)
    assert_untouched((params, state), saved)


def test_mismatched_state_or_bad_hyperparameter_raises_before_anything_changes():
    params = mlp_params()
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    other_state = opt.init({k: v for k, v in params.items() if k != "2.bias"})
    saved = snapshot((params, state))
    step = fr.train_step(penalized_loss(model_for(params)), opt, compile=False)
    x, y = next(batches(1))
    with pytest.raises(ValueError, match="leaf '2.bias' of params is missing from state"):
        step(params, other_state, x, y, torch.tensor(0.1))
    with pytest.raises(ValueError, match="lr=-1.0 is outside"):
        step(params, state, x, y, torch.tensor(0.1), lr=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="unknown hyperparameter 'momentum'"):
        step(params, state, x, y, torch.tensor(0.1), momentum=0.9)
    assert_untouched((params, state), saved)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_step_raises_the_eager_error_and_changes_nothing():
    params = {"w": torch.ones(3), "b": torch.zeros(1)}
    opt = fr.sgd(lr=0.1, momentum=0.9)
    state = opt.init({"w": params["w"]})
    saved = snapshot((params, state))
    step = fr.train_step(lambda p: p["w"].sum() + p["b"].sum(), opt)
    with pytest.raises(ValueError, match="leaf 'b' of params is missing from state") as info:
        step(params, state)
    assert isinstance(info.value.__cause__, torch._dynamo.exc.TorchDynamoException)
    assert_untouched((params, state), saved)


def test_bad_arguments_to_train_step():
    opt = fr.sgd(lr=0.1)
    with pytest.raises(TypeError, match="loss must be callable"):
        fr.train_step(3.0, opt)
    with pytest.raises(TypeError, match="must be a functorch_reg Optimizer"):
        fr.train_step(lambda p: p, torch.optim.SGD)
    with pytest.raises(ValueError, match="needs compile=True"):
        fr.train_step(lambda p: p, opt, compile=False, mode="reduce-overhead")
    with pytest.raises(TypeError, match=r"fr.flat.pack"):
        fr.train_step(lambda p: p, opt, flat={"decay": torch.ones(3)})


def flat_and_per_leaf(dtype=torch.float32, device="cpu"):
    params = mlp_params(dtype, device)
    flat = fr.flat.pack(params, {"decay": fr.select.weights(), "no_decay": fr.select.biases()})
    return params, flat


def test_flat_step_follows_the_per_leaf_trajectory_exactly_in_fp64():
    params, flat = flat_and_per_leaf(torch.float64)
    loss = penalized_loss(model_for(params))
    per_leaf_opt = fr.adamw(lr=1e-2, weight_decay=1e-2, mask=fr.select.weights())
    flat_opt = fr.adamw(lr=1e-2, weight_decay=1e-2, mask="decay")
    per_leaf_state, flat_state = per_leaf_opt.init(params), flat_opt.init(flat.buffers)
    per_leaf_step = fr.train_step(loss, per_leaf_opt, compile=False)
    flat_step = fr.train_step(loss, flat_opt, flat=flat, compile=False)
    for i, (x, y) in enumerate(batches(5, torch.float64)):
        lr, lam = schedule(i, torch.float64)
        value = flat_step(flat.buffers, flat_state, x, y, lam, lr=lr)
        assert torch.equal(value, per_leaf_step(params, per_leaf_state, x, y, lam, lr=lr))
    for name in params:
        assert torch.equal(flat.params[name], params[name]), name
    packed = flat.pack_like(per_leaf_state.exp_avg_sq)
    assert all(torch.equal(flat_state.exp_avg_sq[g], packed[g]) for g in flat.buffers)


def test_flat_step_rejects_per_leaf_params_before_anything_changes():
    params, flat = flat_and_per_leaf()
    opt = fr.sgd(lr=0.1, momentum=0.9)
    state = opt.init(flat.buffers)
    saved = snapshot((flat.buffers, state, params))
    step = fr.train_step(penalized_loss(model_for(params)), opt, flat=flat, compile=False)
    x, y = next(batches(1))
    with pytest.raises(ValueError, match="expected buffers for the groups"):
        step(params, state, x, y, torch.tensor(0.1))
    assert_untouched((flat.buffers, state, params), saved)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_flat_step_is_one_graph_and_matches_eager(device):
    params, flat = flat_and_per_leaf(device=device)
    eager_flat = fr.flat.pack(
        params, {"decay": fr.select.weights(), "no_decay": fr.select.biases()}
    )
    loss = penalized_loss(model_for(params))
    opt = fr.adamw(lr=1e-2, weight_decay=1e-2, mask="decay")
    state, eager_state = opt.init(flat.buffers), opt.init(eager_flat.buffers)
    step = fr.train_step(loss, opt, flat=flat)
    eager_step = fr.train_step(loss, opt, flat=eager_flat, compile=False)
    before = graphs()
    for i, (x, y) in enumerate(batches(4, device=device)):
        lr, lam = schedule(i, device=device)
        if i == 0:
            value, code = run_and_get_code(step, flat.buffers, state, x, y, lam, lr=lr)
        else:
            value = step(flat.buffers, state, x, y, lam, lr=lr)
        expected = eager_step(eager_flat.buffers, eager_state, x, y, lam, lr=lr)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert graphs() - before == 1
    if device == "cpu":
        # The L1 gradient joins the copy into the flat gradient, not a backward addmm.
        assert "\n".join(code).count("extern_kernels.addmm(") == 2
    torch.testing.assert_close(flat.buffers, eager_flat.buffers, rtol=1e-5, atol=1e-6)


def test_pure_flat_step_under_vmap_equals_a_loop_over_members():
    members = [mlp_params(seed=seed) for seed in range(3)]
    groups = {"decay": fr.select.weights(), "no_decay": fr.select.biases()}
    flats = [fr.flat.pack(member, groups) for member in members]
    opt = fr.sgd(lr=0.1, momentum=0.9, weight_decay=1e-2, mask="decay")
    step = fr.train_step(penalized_loss(model_for(members[0])), opt, flat=flats[0])
    lams = torch.tensor([0.0, 1e-2, 1e-1])
    x, y = next(batches(1))
    stacked = vmap(lambda b, s, lam: step.pure(b, s, x, y, lam))(
        fr.stack([f.buffers for f in flats]), fr.stack([opt.init(f.buffers) for f in flats]), lams
    )
    for i, flat in enumerate(flats):
        buffers, state, value = step.pure(flat.buffers, opt.init(flat.buffers), x, y, lams[i])
        torch.testing.assert_close(fr.unstack(stacked[0])[i], buffers)
        torch.testing.assert_close(fr.unstack(stacked[1])[i], state)
        torch.testing.assert_close(stacked[2][i], value)
