"""``import functorch_reg`` stays light: the heavy machinery loads where it is used."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

HEAVY = (
    "torch._dynamo",
    "torch._inductor",
    "torch.distributed.tensor",
    "matplotlib",
    "sklearn",
    "transformers",
)


@pytest.mark.slow
def test_import_loads_no_heavy_module() -> None:
    # A fresh process: this one has imported them all through other tests.
    code = (
        "import sys, torch\n"
        f"before = {{m for m in {HEAVY!r} if m in sys.modules}}\n"
        "import functorch_reg\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_is_dtensor_without_the_module() -> None:
    from functorch_reg.tree import is_dtensor

    assert not is_dtensor(torch.zeros(2))
    assert not is_dtensor(None)


def test_glob_matcher_is_a_compiler_constant() -> None:
    # What torch.compiler.assume_constant_result sets, set without importing dynamo.
    from functorch_reg import select

    assert select._match_globs._dynamo_marked_constant is True  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.compile
def test_a_compiled_step_says_it_is_compiling(caplog):
    import functorch_reg as fr

    params = {"w": torch.zeros(3)}
    opt = fr.sgd(lr=0.5)
    state = opt.init(params)
    step = fr.train_step(lambda p, x: (p["w"] - x).square().sum(), opt, compile=True)
    with caplog.at_level(logging.INFO, logger="functorch_reg"):
        step(params, state, torch.ones(3))
        step(params, state, torch.ones(3))
    messages = [r.getMessage() for r in caplog.records if r.name == "functorch_reg"]
    assert len(messages) == 2, messages  # once, on the first call
    assert messages[0].startswith("train_step: compiling")
    assert messages[1].startswith("train_step: compiled in")
