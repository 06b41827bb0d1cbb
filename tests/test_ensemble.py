"""fr.sweep end to end (functorch_reg/ensemble/search.py with the rooms it calls): vmapped
equals a loop, reproducible, folds, grids, flat buffers, plots. The rooms' own tests:
tests/test_ensemble_{members,grid,loop,search}.py."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, TensorDataset

import functorch_reg as fr


def classification_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:64], y[:64]), (x[64:], y[64:])


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train_one(model, loss_fn, optimizer, strength, train, batches, penalty=None, hp=None):
    """The reference: one member, eager, plain Python loop."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = optimizer.init(params)

    def objective(params, x, y):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        return loss if penalty is None else loss + strength * penalty(params)

    for index in batches:
        grads = grad(objective)(params, train[0][index], train[1][index])
        overrides = {} if hp is None else {hp: strength}
        params, state = optimizer.step(params, grads, state, **overrides)
    return params


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_vmapped_sweep_equals_members_trained_one_by_one():
    train, val = classification_data()
    model = small_model()
    optimizer = fr.adam(lr=0.05, prox=fr.prox.l1, mask=fr.select.weights())
    strengths = torch.tensor([0.0, 0.01, 0.1, 1.0])
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        train=train,
        val=val,
        hyperparameter="prox_strength",
        steps=30,
        batch_size=16,
        seed=3,
        progress=False,
    )
    batches = fr.sweep_data.sample_batches(64, 16, 30, seed=3, device=torch.device("cpu"))
    for i, strength in enumerate(strengths):
        expected = train_one(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            strength,
            train,
            batches,
            hp="prox_strength",
        )
        torch.testing.assert_close(fr.unstack(result.params)[i], expected, rtol=1e-5, atol=1e-6)
    assert result.sparsity[-1] > result.sparsity[0] == 0
    assert result.train_loss.shape == (30, 4) and result.val_accuracy.shape == (4,)


def test_penalty_sweep_equals_a_loop_and_reports_metrics():
    train, val = classification_data()
    model = small_model()
    optimizer = fr.sgd(lr=0.2, momentum=0.5)
    penalty = functools.partial(fr.penalties.group_lasso, where=fr.select.weights())
    strengths = torch.tensor([0.0, 0.05, 0.5])
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        train=train,
        val=val,
        penalty=penalty,
        steps=20,
        compile=False,
        progress=False,
    )
    batches = [torch.arange(64)] * 20
    for i, strength in enumerate(strengths):
        expected = train_one(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            strength,
            train,
            batches,
            penalty=penalty,
        )
        member = fr.unstack(result.params)[i]
        torch.testing.assert_close(member, expected)
        logits = functional_call(model, member, (val[0],))
        torch.testing.assert_close(
            result.val_loss[i], torch.nn.functional.cross_entropy(logits, val[1])
        )
        torch.testing.assert_close(
            result.val_accuracy[i], (logits.argmax(1) == val[1]).float().mean()
        )
        flat = torch.cat([v.flatten() for v in member.values()])
        torch.testing.assert_close(result.param_norm[i], flat.norm())
    assert result.best_index == int(result.val_loss.argmin())
    assert "<- best" in result.table()


def test_regression_sweep_has_no_accuracy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [0.0], [-2.0]])
    result = fr.sweep(
        torch.nn.Linear(3, 1),
        torch.nn.functional.mse_loss,
        fr.sgd(lr=0.1, weight_decay=0.0),
        [0.0, 0.5],
        train=(x[:30], y[:30]),
        val=(x[30:], y[30:]),
        hyperparameter="weight_decay",
        steps=10,
        compile=False,
        progress=False,
    )
    assert result.val_accuracy is None
    assert result.param_norm[1] < result.param_norm[0]


def test_sweep_is_reproducible_from_the_seed():
    train, val = classification_data()
    run = functools.partial(
        fr.sweep,
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 0.1],
        train=train,
        val=val,
        penalty=fr.penalties.l2,
        steps=6,
        batch_size=8,
        init="independent",
        compile=False,
        progress=False,
    )
    first, second, other = run(seed=1), run(seed=1), run(seed=2)
    torch.testing.assert_close(first.params, second.params, rtol=0, atol=0)
    assert not torch.equal(first.params["0.weight"], other.params["0.weight"])


@pytest.mark.slow
def test_plot_draws_and_saves(tmp_path):
    pytest.importorskip("matplotlib")
    train, val = classification_data()
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 0.1, 1.0],
        train=train,
        val=val,
        penalty=fr.penalties.l1,
        steps=3,
        compile=False,
        progress=False,
    )
    figure = result.plot(tmp_path / "sweep.png")
    assert len(figure.axes) == 3 and (tmp_path / "sweep.png").stat().st_size > 10_000


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    train, val = classification_data()
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0],
        train=train,
        val=val,
        penalty=fr.penalties.l1,
        steps=1,
        compile=False,
        progress=False,
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install \"functorch_reg\[examples\]\""):
        result.plot()


# --- Data loaders, validation, select, refit, folds, grids ---------------------------


def sweep_kwargs(**kwargs):
    train, val = classification_data()
    return {
        "train": train,
        "val": val,
        "penalty": fr.penalties.l2,
        "steps": 6,
        "compile": False,
        "progress": False,
        **kwargs,
    }


def test_dataloader_sweep_equals_tensor_batches_and_val_is_the_exact_mean():
    train, val = classification_data()
    model, optimizer = small_model(), fr.sgd(lr=0.2, momentum=0.5)
    loader = DataLoader(TensorDataset(*train), batch_size=16)  # 4 batches: 6 steps = 1.5 epochs
    val_batches = [(val[0][i : i + 10], val[1][i : i + 10]) for i in range(0, 32, 10)]  # 10,10,10,2
    strengths = torch.tensor([0.0, 0.1])
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        **sweep_kwargs(train=loader, val=val_batches),
    )
    batches = [torch.arange(16 * (i % 4), 16 * (i % 4 + 1)) for i in range(6)]
    for i, strength in enumerate(strengths):
        expected = train_one(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            strength,
            train,
            batches,
            penalty=fr.penalties.l2,
        )
        member = fr.unstack(result.params)[i]
        torch.testing.assert_close(member, expected)
        logits = functional_call(model, member, (val[0],))
        torch.testing.assert_close(
            result.val_loss[i], torch.nn.functional.cross_entropy(logits, val[1])
        )
        torch.testing.assert_close(
            result.val_accuracy[i], (logits.argmax(1) == val[1]).float().mean()
        )


def test_select_val_accuracy_on_regression_is_refused():
    x = torch.randn(20, 5)
    with pytest.raises(ValueError, match="classification"):
        fr.sweep(
            torch.nn.Linear(5, 1),
            torch.nn.functional.mse_loss,
            fr.sgd(lr=0.1),
            [0.0],
            **sweep_kwargs(train=(x, x[:, :1]), val=(x, x[:, :1]), select="val_accuracy"),
        )


def result_with(val_loss, val_accuracy=None, select="val_loss"):
    count = len(val_loss)
    return fr.SweepResult(
        strengths=torch.arange(count, dtype=torch.float32),
        params={"w": torch.zeros(count, 2)},
        train_loss=torch.zeros(1, count),
        val_loss=torch.tensor(val_loss),
        val_accuracy=None if val_accuracy is None else torch.tensor(val_accuracy),
        sparsity=torch.zeros(count),
        param_norm=torch.zeros(count),
        select=select,
    )


def test_best_index_follows_select_and_never_picks_a_diverged_member():
    assert result_with([1.82, float("nan")]).best_index == 0
    assert result_with([float("inf"), 3.0, 2.0]).best_index == 2
    table = result_with([1.82, float("nan")]).table()
    assert "diverged" in table.splitlines()[3] and "<- best" in table.splitlines()[2]
    by_accuracy = result_with([0.5, 0.4, float("nan")], [0.9, 0.8, 1.0], select="val_accuracy")
    assert by_accuracy.best_index == 0
    assert result_with([0.5, 0.4], select=lambda r: 0).best_index == 0
    with pytest.raises(ValueError, match="not finite"):
        _ = result_with([0.5, float("nan")], select=lambda r: 1).best_index
    with pytest.raises(ValueError, match="all diverged"):
        _ = result_with([float("nan")]).best_index


def test_zero_dim_parameter_and_refit_on_train_plus_val():
    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(5, 3)
            self.temperature = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return self.linear(x) * self.temperature

    train, val = classification_data()
    model, optimizer = Tempered(), fr.sgd(lr=0.2)
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        [0.0, 0.3],
        **sweep_kwargs(select="val_accuracy"),
    )
    assert result.params["temperature"].shape == (2,) and result.sparsity.shape == (2,)
    refit = result.refit()
    everything = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    expected = train_one(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        result.strengths[result.best_index],
        everything,
        [torch.arange(96)] * 6,
        penalty=fr.penalties.l2,
    )
    torch.testing.assert_close(refit, expected)
    model.load_state_dict(refit)


def test_kfold_members_equal_models_trained_on_each_fold():
    from sklearn.model_selection import KFold

    train, _ = classification_data()
    model, optimizer = small_model(), fr.sgd(lr=0.2)
    strengths = torch.tensor([0.0, 0.2])
    run = functools.partial(
        fr.sweep,
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths,
        **sweep_kwargs(val=None, steps=5),
    )
    result = run(folds=3)
    assert result.fold_val_loss.shape == (2, 3) and result.params["0.weight"].shape == (2, 3, 8, 5)
    torch.testing.assert_close(result.val_loss, result.fold_val_loss.mean(1))
    splits = list(KFold(3).split(train[0].numpy()))
    for i, strength in enumerate(strengths):
        for fold, (fit, held) in enumerate(splits):
            fit, held = torch.from_numpy(fit), torch.from_numpy(held)
            expected = train_one(
                model,
                torch.nn.functional.cross_entropy,
                optimizer,
                strength,
                train,
                [fit] * 5,
                penalty=fr.penalties.l2,
            )
            member = {k: v[i, fold] for k, v in result.params.items()}
            torch.testing.assert_close(member, expected)
            logits = functional_call(model, member, (train[0][held],))
            torch.testing.assert_close(
                result.fold_val_loss[i, fold],
                torch.nn.functional.cross_entropy(logits, train[1][held]),
            )
            torch.testing.assert_close(
                result.fold_val_accuracy[i, fold],
                (logits.argmax(1) == train[1][held]).float().mean(),
            )
    by_splitter = run(cv=KFold(3))
    torch.testing.assert_close(by_splitter.fold_val_loss, result.fold_val_loss)
    refit = result.refit()
    expected = train_one(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        strengths[result.best_index],
        train,
        [torch.arange(64)] * 5,
        penalty=fr.penalties.l2,
    )
    torch.testing.assert_close(refit, expected)


def test_grid_runs_the_product_of_its_axes():
    train, _ = classification_data()
    model, optimizer = small_model(), fr.sgd(lr=0.1)
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        {"penalty": [0.0, 0.5], "lr": [0.05, 0.2]},
        **sweep_kwargs(steps=4),
    )
    assert result.grid["penalty"].tolist() == [0.0, 0.0, 0.5, 0.5]
    assert result.grid["lr"].tolist() == pytest.approx([0.05, 0.2, 0.05, 0.2])
    header = result.table().splitlines()[0]
    assert "penalty" in header and "lr" in header

    def objective(params, strength):
        loss = torch.nn.functional.cross_entropy(
            functional_call(model, params, (train[0],)), train[1]
        )
        return loss + strength * fr.penalties.l2(params)

    for i in range(4):
        lr, strength = result.grid["lr"][i], result.grid["penalty"][i]
        params = {k: v.detach() for k, v in model.named_parameters()}
        state = optimizer.init(params)
        for _ in range(4):
            grads = grad(objective)(params, strength)
            params, state = optimizer.step(params, grads, state, lr=lr)
        torch.testing.assert_close(fr.unstack(result.params)[i], params)
    assert set(result.best) == {"penalty", "lr"}


def test_plot_names_layers_marks_the_choice_and_has_two_legends(tmp_path):
    pytest.importorskip("matplotlib")
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.1),
        [0.0, 0.1, 1.0],
        **sweep_kwargs(penalty=fr.penalties.l1, steps=2),
    )
    figure = result.plot()
    path_axis, val_axis = figure.axes[:2]
    names = [t.get_text() for t in path_axis.get_legend().get_texts()]
    assert "Linear 5->8 weight" in names and any(n.startswith("chosen penalty = ") for n in names)
    assert val_axis.get_legend() is not None
    assert path_axis.get_xlabel() == "penalty strength (penalty)"


@pytest.mark.compile
@pytest.mark.slow
def test_kfold_grid_sweep_is_one_compiled_graph_without_recompiles(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, **kw))
    run = functools.partial(
        fr.sweep,
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.adam(lr=0.05),
        {"penalty": [0.0, 0.1], "lr": [0.01, 0.05]},
        **sweep_kwargs(val=None, steps=8, batch_size=16),
    )
    torch._dynamo.reset()
    compiled = run(folds=4, compile=True)
    assert counter.frame_count == 1, "folds x grid x minibatches: one graph, no recompile"
    eager = run(folds=4, compile=False)
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.fold_val_loss, eager.fold_val_loss, rtol=1e-5, atol=1e-6)


def test_per_layer_strengths_are_grid_axes_of_named_penalties():
    train, _ = classification_data()
    model, optimizer = small_model(), fr.sgd(lr=0.1)
    penalties = {
        "first": functools.partial(fr.penalties.l2, where="0.*"),
        "last": functools.partial(fr.penalties.l1, where="2.weight"),
    }
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        {"first": [0.0, 0.5], "last": [0.0, 0.2]},
        **sweep_kwargs(penalty=penalties, steps=4),
    )
    assert result.grid["first"].tolist() == [0.0, 0.0, 0.5, 0.5]

    def objective(params, first, last):
        logits = functional_call(model, params, (train[0],))
        loss = torch.nn.functional.cross_entropy(logits, train[1])
        return loss + first * penalties["first"](params) + last * penalties["last"](params)

    for i in range(4):
        params = {k: v.detach() for k, v in model.named_parameters()}
        state = optimizer.init(params)
        for _ in range(4):
            grads = grad(objective)(params, result.grid["first"][i], result.grid["last"][i])
            params, state = optimizer.step(params, grads, state)
        torch.testing.assert_close(fr.unstack(result.params)[i], params)
    with pytest.raises(ValueError, match="without an axis: \\['last'\\]"):
        fr.sweep(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            {"first": [0.1]},
            **sweep_kwargs(penalty=penalties),
        )
    with pytest.raises(ValueError, match="one axis per penalty"):
        fr.sweep(
            model,
            torch.nn.functional.cross_entropy,
            optimizer,
            [0.1],
            **sweep_kwargs(penalty=penalties),
        )


@pytest.mark.parametrize("folds", [None, 3])
def test_flat_sweep_equals_the_per_leaf_sweep(folds):
    train, val = classification_data()
    strengths = torch.tensor([0.0, 0.01, 0.1])
    common = dict(
        train=train,
        val=None if folds else val,
        folds=folds,
        penalty=fr.penalties.group_lasso,
        steps=15,
        batch_size=16,
        compile=False,
        progress=False,
    )
    per_leaf = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.adamw(lr=0.05, mask=fr.select.weights(), prox=fr.prox.l1, prox_strength=0.01),
        strengths,
        **common,
    )
    flat = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.adamw(lr=0.05, mask="decay", prox=fr.prox.l1, prox_strength=0.01),
        strengths,
        flat={"decay": fr.select.weights(), "no_decay": fr.select.biases()},
        **common,
    )
    for name, leaf in per_leaf.params.items():
        assert flat.params[name].shape == leaf.shape
        torch.testing.assert_close(flat.params[name], leaf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat.val_loss, per_leaf.val_loss, rtol=1e-5, atol=1e-6)
    # refit trains the flat buffers too, and hands back leaves by name
    refit, flat_refit = per_leaf.refit(steps=5), flat.refit(steps=5)
    for name, leaf in refit.items():
        torch.testing.assert_close(flat_refit[name], leaf, rtol=1e-5, atol=1e-6)
