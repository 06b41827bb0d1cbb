"""The README's Python snippets run, in order, as a reader would paste them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_readme_snippets_run_in_order():
    namespace: dict = {}
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    objective, params = namespace["objective"], namespace["params"]
    start = {k: v.detach() for k, v in namespace["model"].named_parameters()}
    assert objective(params, 1e-3) < objective(start, 1e-3)  # the loop trained
    v = namespace["v"]
    fr = namespace["fr"]
    assert torch.equal(fr.prox.l1(v, 0.5)["w"], torch.tensor([[0.0, -1.5], [0.0, 0.0]]))
    assert torch.equal(fr.prox.group_lasso(v, 0.5, dim=0)["w"][1], torch.zeros(2))


def test_readme_has_the_two_commands_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert test_command in text
    assert "python -m pytest" in ci and 'pip install -e ".[test]"' in ci
    assert 'pip install -e ".[examples]" && python examples/lambda_sweep.py' in text
