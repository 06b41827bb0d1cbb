"""fr.sweep and SweepResult (functorch_reg/ensemble/search.py) as a package: every name of
the old functorch_reg.ensemble module keeps its path, the package __init__ only re-exports,
and a result keeps the plan it was trained from. End-to-end sweeps: tests/test_ensemble.py,
tests/test_sweep_*.py."""

from __future__ import annotations

import ast
import inspect

import torch

import functorch_reg as fr

from .test_ensemble import classification_data, small_model

OLD_NAMES = [
    "Folding",
    "Select",
    "Strengths",
    "SweepPlan",
    "SweepResult",
    "ensemble_step",
    "first_member_dtype",
    "init_ensemble",
    "refit",
    "sweep",
]


def test_every_name_of_the_old_ensemble_module_keeps_its_path():
    from functorch_reg import ensemble

    for name in OLD_NAMES + list(ensemble.__all__):
        assert getattr(ensemble, name) is not None, name
    assert fr.sweep is ensemble.sweep is ensemble.search.sweep
    assert fr.SweepResult is ensemble.SweepResult is ensemble.search.SweepResult
    assert fr.init_ensemble is ensemble.init_ensemble is ensemble.members.init_ensemble
    assert fr.ensemble_step is ensemble.ensemble_step is ensemble.members.ensemble_step
    assert ensemble.refit is ensemble.loop.refit and ensemble.SweepPlan is ensemble.grid.SweepPlan


def test_the_package_init_only_re_exports():
    from functorch_reg import ensemble

    tree = ast.parse(inspect.getsource(ensemble))
    docstring, *statements = tree.body
    assert isinstance(docstring, ast.Expr)
    *imports, names = statements
    assert all(isinstance(s, ast.ImportFrom) and s.level == 1 for s in imports)
    assert isinstance(names, ast.Assign) and names.targets[0].id == "__all__"  # type: ignore[attr-defined]
    exported = {alias.asname or alias.name for s in imports for alias in s.names}  # type: ignore[attr-defined]
    assert exported == set(ensemble.__all__)


def test_a_result_keeps_the_plan_it_was_trained_from():
    train, val = classification_data()
    result = fr.sweep(
        small_model(),
        torch.nn.functional.cross_entropy,
        fr.sgd(lr=0.2),
        [0.0, 0.1],
        train=train,
        val=val,
        penalty=fr.penalties.l2,
        steps=3,
        compile=False,
        progress=False,
    )
    plan = result.plan
    assert isinstance(plan, fr.ensemble.SweepPlan) and "plan" not in repr(result)
    assert plan.steps == 3 and plan.count == 2 and plan.folds == 1 and plan.folding is None
    assert torch.equal(plan.grid["penalty"].cpu(), result.grid["penalty"])
    refit = result.refit()
    again = fr.ensemble.refit(plan, result.best_index)
    assert refit.keys() == again.keys()
    assert all(torch.equal(refit[key], again[key]) for key in refit)
