"""``import functorch_reg`` stays light: the heavy machinery loads where it is used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEAVY = (
    "torch._dynamo",
    "torch._inductor",
    "torch.distributed.tensor",
    "matplotlib",
    "sklearn",
    "transformers",
)


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
    import torch

    from functorch_reg.tree import is_dtensor

    assert not is_dtensor(torch.zeros(2))
    assert not is_dtensor(None)


def test_glob_matcher_is_a_compiler_constant() -> None:
    # What torch.compiler.assume_constant_result sets, set without importing dynamo.
    from functorch_reg import select

    assert select._match_globs._dynamo_marked_constant is True  # type: ignore[attr-defined]
