"""Running a plan (functorch_reg/ensemble/loop.py): the progress bar, run and evaluate as
fr.sweep reports them, the metrics against direct computation, and refit(plan, index) of
any grid point against a plain loop on all the data."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import functorch_reg as fr

from .test_ensemble import classification_data, small_model, train_one


def test_progress_bar_says_compiling_and_counts_every_step(capsys):
    calls = []

    def step(members, buffers, states, grid, x, y, extra):
        calls.append(len(x))
        return members, buffers, states, torch.zeros(2)

    batches = [(torch.zeros(4, 1), torch.zeros(4), None)] * 5
    fr.ensemble.loop.train(
        step,
        {},
        {},
        (),
        {},
        batches,
        5,
        progress=True,
        compiling=True,
        desc="sweep",
    )
    err = capsys.readouterr().err
    assert "compiling" in err and "5/5" in err and len(calls) == 5


def a_plan(**kwargs):
    train, val = classification_data()
    options = dict(
        train=train,
        val=val,
        penalty=fr.penalties.l1,
        steps=5,
        batch_size=16,
        compile=False,
    )
    options.update(kwargs)
    return fr.ensemble.plan(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.2, momentum=0.5),
        [0.0, 0.01, 0.1],
        **options,
    )


@pytest.mark.parametrize("folds", [None, 3])
def test_run_and_evaluate_members_give_what_sweep_reports(folds):
    train, val = classification_data()
    plan = a_plan(val=None if folds else val, folds=folds)
    members, buffers, losses = fr.ensemble.loop.run(plan, progress=False)
    measured = fr.ensemble.loop.evaluate_members(plan, members, buffers)
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.2, momentum=0.5),
        [0.0, 0.01, 0.1],
        train=train,
        val=None if folds else val,
        folds=folds,
        penalty=fr.penalties.l1,
        steps=5,
        batch_size=16,
        compile=False,
        progress=False,
    )
    count, n = 3, folds or 1
    assert len(losses) == 5 and losses[0].shape == (count * n,)
    assert torch.equal(torch.stack(losses).view(5, count, n).squeeze(-1), result.train_loss)
    assert torch.equal(measured.loss.view(count, n).mean(1), result.val_loss)
    assert torch.equal(measured.sparsity, result.sparsity)
    assert torch.equal(measured.norm, result.param_norm)
    for name, leaf in members.items():
        assert torch.equal(leaf.view(count, n, *leaf.shape[1:]).squeeze(1), result.params[name])


def test_evaluate_members_measures_loss_accuracy_zeros_and_norm():
    _, (x, y) = classification_data()
    plan = a_plan()
    members = fr.init_ensemble(small_model(), 3, seed=3)
    members["0.weight"][1, :4] = 0.0  # 20 of member 1's 75 entries are exactly zero
    measured = fr.ensemble.loop.evaluate_members(plan, members, {})
    for k, member in enumerate(fr.unstack(members)):
        logits = functional_call(small_model(), member, (x,))
        torch.testing.assert_close(measured.loss[k], torch.nn.functional.cross_entropy(logits, y))
        assert measured.accuracy is not None
        torch.testing.assert_close(measured.accuracy[k], (logits.argmax(1) == y).float().mean())
        entries = torch.cat([leaf.flatten() for leaf in member.values()])
        torch.testing.assert_close(measured.norm[k], entries.norm())
        assert measured.sparsity[k] == (entries == 0).float().mean()
    assert measured.sparsity[1] == pytest.approx(20 / 75)


def test_refit_of_any_grid_point_equals_a_plain_loop_on_train_and_val():
    train, val = classification_data()
    plan = a_plan(batch_size=None, steps=4)
    everything = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    for index in (0, 2):
        refit = fr.ensemble.refit(plan, index)
        expected = train_one(
            small_model(),
            torch.nn.functional.cross_entropy,
            fr.sgd(lr=0.2, momentum=0.5),
            plan.grid["penalty"][index],
            everything,
            [torch.arange(96)] * 4,
            penalty=fr.penalties.l1,
        )
        torch.testing.assert_close(refit, expected)
