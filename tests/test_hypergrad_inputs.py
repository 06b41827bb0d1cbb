"""fr.hypergrad on bad and non-finite input: NaN/inf strengths and params, saddle points,
torch.optim optimizers, zero step sizes, meta tensors, non-floating leaves with
optimizer state, and a tune run whose training diverges."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import functorch_reg as fr

F64 = torch.float64


def ridge(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 3, generator=generator, dtype=F64)
    y = torch.randn(20, generator=generator, dtype=F64)
    X_val = torch.randn(20, 3, generator=generator, dtype=F64)
    y_val = torch.randn(20, generator=generator, dtype=F64)

    def train(w, lam):
        return (X @ w - y).square().mean() + lam * w.square().sum()

    def val(w):
        return (X_val @ w - y_val).square().mean()

    lam = torch.tensor(0.1, dtype=F64)
    hessian = 2 * X.T @ X / 20 + 2 * lam * torch.eye(3, dtype=F64)
    w = torch.linalg.solve(hessian, 2 * X.T @ y / 20)
    return train, val, w, lam


# ---------------------------------------------------------------------------------------
# item 5: non-finite strengths and params


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_strengths_are_refused(value):
    # Before: implicit returned -0.0 without a word; tune accepted inf.
    train, val, w, _ = ridge()
    bad = torch.tensor(value, dtype=F64)
    with pytest.raises(ValueError, match="strengths must be finite"):
        fr.hypergrad.implicit(train, val, w, bad)
    with pytest.raises(ValueError, match="strengths must be finite"):
        fr.hypergrad.unrolled(train, val, w, bad, fr.sgd(lr=0.1), 2)
    with pytest.raises(ValueError, match="strengths must be finite"):
        fr.hypergrad.tune(
            train, val, w, bad.abs(), fr.sgd(lr=0.1), rounds=1, steps_per_round=1, progress=False
        )


def test_nan_params_are_refused_naming_the_leaf():
    # Before: a NaN hypergradient and none of the promised warnings.
    train, val, w, lam = ridge()
    params = {"good": w, "bad": torch.tensor([1.0, math.nan], dtype=F64)}

    def train_tree(p, lam):
        return train(p["good"], lam) + p["bad"].square().sum()

    with pytest.raises(ValueError, match="params leaf 'bad' holds NaN or inf"):
        fr.hypergrad.implicit(train_tree, lambda p: val(p["good"]), params, lam)
    with pytest.raises(ValueError, match="params leaf 'bad' holds NaN or inf"):
        fr.hypergrad.unrolled(train_tree, lambda p: val(p["good"]), params, lam, fr.sgd(lr=0.1), 1)


def test_a_nan_validation_loss_gives_nan_with_a_warning_not_zero():
    # Before: CG stopped at once on the NaN and the zero iterate made the result -0.0.
    train, val, w, lam = ridge()
    with pytest.warns(RuntimeWarning, match="hypergradient is NaN"):
        hyper = fr.hypergrad.implicit(train, lambda w: val(w) * math.nan, w, lam)
    assert torch.isnan(hyper)


@pytest.mark.slow
def test_tune_stops_when_training_diverges_and_keeps_the_last_finite_state():
    # Before: nan_to_num turned non-finite hypergradients into 0 and the run went on,
    # returning non-finite params after the full number of rounds.
    train, val, _, _ = ridge()
    w0 = torch.zeros(3, dtype=F64)
    opt = fr.sgd(lr=0.6)  # the strength grows until lr > 2 / L: the iterates diverge
    with pytest.warns(RuntimeWarning, match=r"tune: stopped at round \d+ of 200"):
        result = fr.hypergrad.tune(
            train, val, w0, torch.tensor(0.1, dtype=F64), opt,
            rounds=200, steps_per_round=5, progress=False,
        )  # fmt: skip
    history = result.history
    assert result.train_steps < 200 * 5
    assert int(history.train_steps[-1]) == result.train_steps
    assert len(history.strengths) == len(history.val_loss) == len(history.hypergradient) + 1
    assert torch.isfinite(history.val_loss).all() and torch.isfinite(history.hypergradient).all()
    assert torch.isfinite(result.params).all()
    assert torch.equal(result.strengths, history.strengths[-1])
    # The kept params are exactly the trajectory's params after result.train_steps steps.
    w, state = w0.clone(), opt.init(w0)
    for round_index in range(result.train_steps // 5):
        lam = history.strengths[round_index]
        for _ in range(5):
            w, state = opt.step(w, torch.func.grad(train)(w, lam), state)
    torch.testing.assert_close(result.params, w, rtol=0, atol=0)


def test_tune_refuses_a_bad_hyper_lr():
    train, val, w, lam = ridge()
    for hyper_lr in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="hyper_lr must be a positive, finite float"):
            fr.hypergrad.tune(
                train, val, w, lam, fr.sgd(lr=0.1), rounds=1, steps_per_round=1,
                hyper_lr=hyper_lr, progress=False,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------
# item 6: saddle points


def saddle():
    """``0.5 w'Aw + lam b'w`` with an indefinite A: w = 0 is stationary at lam = 0."""
    A = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=F64))
    b = torch.tensor([1.0, 0.5, 1.0], dtype=F64)
    ones = torch.ones(3, dtype=F64)

    def train(w, lam):
        return 0.5 * w @ A @ w + lam * b @ w

    def val(w):
        return w @ ones

    exact = -b @ torch.linalg.solve(A, ones)  # -(d grad / d lam)' H^-1 grad val
    return train, val, torch.zeros(3, dtype=F64), torch.tensor(0.0, dtype=F64), exact


def test_a_saddle_point_warns_negative_curvature_and_normal_cg_is_exact():
    # Before: "did not converge in maxiter=100" although CG stopped at the curvature.
    train, val, w, lam, exact = saddle()
    with pytest.warns(RuntimeWarning, match=r"negative curvature.*saddle.*damping=.*normal_cg"):
        hyper = fr.hypergrad.implicit(train, val, w, lam)
    assert not torch.isclose(hyper, exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normal = fr.hypergrad.implicit(train, val, w, lam, solver="normal_cg")
    torch.testing.assert_close(normal, exact, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------
# item 13: non-floating leaves with optimizer state


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: fr.sgd(lr=0.1, momentum=0.9), lambda: fr.adam(lr=0.1)],
    ids=["sgd_momentum", "adam"],
)
def test_unrolled_with_a_non_floating_leaf_and_optimizer_state(make_optimizer):
    # Before: "Expected tensors, got unsupported type NoneType" without checkpointing.
    train, val, _, lam = ridge()
    params = {"w": torch.zeros(3, dtype=F64), "count": torch.tensor(3)}

    def train_tree(p, lam):
        return train(p["w"], lam)

    def val_tree(p):
        return val(p["w"])

    plain, trained = fr.hypergrad.unrolled(train_tree, val_tree, params, lam, make_optimizer(), 4)
    stored, _ = fr.hypergrad.unrolled(
        train_tree, val_tree, params, lam, make_optimizer(), 4, checkpoint=True
    )
    reference, _ = fr.hypergrad.unrolled(train, val, params["w"], lam, make_optimizer(), 4)
    torch.testing.assert_close(plain, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(stored, reference, rtol=1e-12, atol=0)
    assert torch.equal(trained["count"], params["count"])
    result = fr.hypergrad.tune(
        train_tree, val_tree, params, lam, make_optimizer(), rounds=2, steps_per_round=2,
        method="unrolled", progress=False,
    )  # fmt: skip
    assert torch.isfinite(result.strengths)


# ---------------------------------------------------------------------------------------
# item 14: torch.optim optimizers, step_size, meta tensors


def test_a_torch_optim_optimizer_is_refused_with_the_fix():
    # Before: AttributeError: 'SGD' object has no attribute 'init'.
    train, val, w, lam = ridge()
    torch_sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"torch.optim.sgd.SGD.*pass .*fr.sgd"):
        fr.hypergrad.unrolled(train, val, w, lam, torch_sgd, 2)
    with pytest.raises(TypeError, match=r"torch.optim.sgd.SGD.*pass .*fr.sgd"):
        fr.hypergrad.tune(train, val, w, lam, torch_sgd, rounds=1, steps_per_round=1)


@pytest.mark.parametrize(
    "step_size",
    [0, 0.0, -0.1, math.inf, torch.tensor(0.0), torch.tensor(math.nan)],
    ids=["int0", "float0", "negative", "inf", "tensor0", "tensor_nan"],
)
def test_step_size_must_be_positive_and_finite(step_size):
    train, val, w, lam = ridge()
    with pytest.raises(ValueError, match="step_size must be a positive, finite number"):
        fr.hypergrad.implicit(train, val, w, lam, prox=fr.prox.l1, step_size=step_size)


def test_meta_tensors_and_mixed_devices_are_refused_naming_them():
    # Before: NotImplementedError "Cannot copy out of meta tensor".
    train, val, w, lam = ridge()
    meta = torch.tensor(0.1, dtype=F64, device="meta")
    with pytest.raises(ValueError, match="strengths is on the meta device"):
        fr.hypergrad.implicit(train, val, w, meta)
    with pytest.raises(ValueError, match="strengths is on the meta device"):
        fr.hypergrad.unrolled(train, val, w, meta, fr.sgd(lr=0.1), 1)
    params = {"w": w, "scale": torch.ones(2, dtype=F64, device="meta")}
    with pytest.raises(ValueError, match="params leaf 'scale' is on the meta device"):
        fr.hypergrad.implicit(lambda p, lam: train(p["w"], lam), lambda p: val(p["w"]), params, lam)
