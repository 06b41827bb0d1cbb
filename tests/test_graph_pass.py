"""functorch_reg._graph_pass, the compiler internals of train_step: loaded only by a
compiled step; a code object per step; static-address marks on every tensor leaf; the
Inductor options carry the graph pass. (The pass's effect on generated code is tested in
tests/test_train.py, where the compiled step's code is read.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functorch_reg as fr

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_an_eager_train_step_does_not_load_the_compiler_internals():
    # torch.func.grad loads torch._dynamo and parts of Inductor itself (torch 2.13), so
    # an eager step loads them whatever we do; our compiler internals stay out.
    code = (
        "import sys, torch\n"
        "import functorch_reg as fr\n"
        "params = {'w': torch.zeros(3)}\n"
        "opt = fr.sgd(lr=0.5)\n"
        "step = fr.train_step(lambda p, x: (p['w'] - x).square().sum(), opt, compile=False)\n"
        "step(params, opt.init(params), torch.ones(3))\n"
        "heavy = ('functorch_reg._graph_pass',)\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_own_code_gives_each_bound_method_a_code_object_of_its_own():
    from functorch_reg._graph_pass import own_code

    class Step:
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, x):
            return self.scale * x

        def method(self, x):
            return self.scale * x

    first, second = own_code(Step(2).method), own_code(Step(3).method)
    assert first.__func__.__code__ is not second.__func__.__code__
    assert first.__func__.__code__ is not Step.method.__code__
    assert (first(1), second(1)) == (2, 3)


def test_mark_static_marks_every_tensor_leaf_once():
    from functorch_reg._graph_pass import mark_static

    params = {"w": torch.zeros(3), "n": torch.tensor(2)}
    opt = fr.sgd(lr=0.1, momentum=0.9)
    state = opt.init(params)
    mark_static(params, state, None)
    leaves = [params["w"], params["n"], *state.momentum_buffer.values()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            assert hasattr(leaf, "_dynamo_static_input_type")
    mark_static(params, state)  # a second call changes nothing and does not raise


def test_inductor_options_carry_the_graph_pass():
    from functorch_reg._graph_pass import UnfuseGradientAddmm, inductor_options

    options = inductor_options("reduce-overhead")
    assert isinstance(options["post_grad_custom_post_pass"], UnfuseGradientAddmm)
    assert options["triton.cudagraphs"] is True
    assert "post_grad_custom_post_pass" in inductor_options(None)
