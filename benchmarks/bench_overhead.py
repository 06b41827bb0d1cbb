"""Where an eager ``step_`` spends its time outside the kernels, against torch.optim's foreach.

Two measures, both uncompiled, on one CPU thread:

* ``--size tiny`` (default): ``--leaves`` tensors of 16 floats each, so every step is
  almost all Python. Prints the median over interleaved steps of ``step_`` / torch.optim
  foreach, ``step`` / foreach, and ``step_`` minus foreach in ms.
* ``--size 1M`` or ``8M`` (``bench_step.py``'s transformer shapes): the wall time per step
  of the library's named phases (gather and check the inputs, group the leaves, check
  the write targets, the grouped rule with its kernels), next to one torch.optim foreach
  step on the same tensors.
* ``--blocks`` (with ``--size``): ``step_`` with its CPU cache blocks
  (``optim.base.CACHE_BLOCK``) and without them (one run per group), against
  torch.optim's foreach and for-loop steps, in rounds of ``--repeat`` consecutive calls
  per case: 1 interleaves the cases call by call, so each step finds the caches and
  the allocator as another case left them (as a step after a forward and backward
  pass does); 5 times the 5th of five calls in a row (as ``bench_step.py`` does). Also
  prints the median minor page faults of a timed call (``getrusage``).

    python benchmarks/bench_overhead.py --optimizer adamw --leaves 80
    python benchmarks/bench_overhead.py --optimizer sgd --size 1M
    python benchmarks/bench_overhead.py --optimizer adamw --size 8M --blocks --repeat 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_step import SIZES, transformer_params
from timing import load

import functorch_reg as fr
from functorch_reg.optim import base

PHASES = {"_gather": base._Lift, "_groups": base, "_check_writable": base, "_grouped_rule": base}


def problem(optimizer: str, size: str, leaves: int) -> tuple[Any, ...]:
    if size == "tiny":
        params = {f"layer{i}.weight": torch.randn(4, 4) for i in range(leaves)}
    else:
        params = transformer_params(*SIZES[size], "cpu", seed=0)
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    copies = [p.clone() for p in params.values()]
    for copy, grad in zip(copies, grads.values(), strict=True):
        copy.grad = grad
    lr, weight_decay = torch.tensor(1e-3), torch.tensor(1e-2)
    if optimizer == "adamw":
        opt = fr.adamw(lr=lr, weight_decay=weight_decay)
        reference = torch.optim.AdamW(copies, lr=1e-3, weight_decay=1e-2, foreach=True)
        overrides = {"lr": lr, "weight_decay": weight_decay}
    else:
        opt = fr.sgd(lr=lr, momentum=0.9)
        reference = torch.optim.SGD(copies, lr=1e-3, momentum=0.9, foreach=True)
        overrides = {"lr": lr}
    return opt, params, grads, reference, overrides


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tiny(args: argparse.Namespace) -> None:
    opt, params, grads, reference, overrides = problem(args.optimizer, "tiny", args.leaves)
    state = opt.init(params)
    cases = {
        "step_": lambda: opt.step_(params, grads, state, **overrides),
        "step": lambda: opt.step(params, grads, state, **overrides),
        "foreach": reference.step,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(5):
        for fn in cases.values():
            fn()
    for _ in range(args.steps):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    pairs = list(zip(times["step_"], times["step"], times["foreach"], strict=True))
    print(
        f"{args.optimizer}, {args.leaves} leaves of 16 floats, {args.steps} interleaved steps: "
        f"step_ {statistics.median(a / c for a, _, c in pairs):.2f}x foreach, "
        f"step {statistics.median(b / c for _, b, c in pairs):.2f}x, "
        f"step_ - foreach {1e3 * statistics.median(a - c for a, _, c in pairs):.3f} ms"
    )


def phases(args: argparse.Namespace) -> None:
    opt, params, grads, reference, overrides = problem(args.optimizer, args.size, 0)
    state = opt.init(params)
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    for name, owner in PHASES.items():
        original = getattr(owner, name)

        def wrapper(*a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(owner, name, wrapper)
    for _ in range(5):
        opt.step_(params, grads, state, **overrides)
        reference.step()
    spent.update(dict.fromkeys(PHASES, 0.0))
    total = sum(
        timed(lambda: opt.step_(params, grads, state, **overrides)) for _ in range(args.steps)
    )
    foreach = sum(timed(reference.step) for _ in range(args.steps))
    per_step = {name: 1e3 * seconds / args.steps for name, seconds in spent.items()}
    print(
        f"{args.optimizer} at {args.size}, ms per step_: total {1e3 * total / args.steps:.2f}, "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in per_step.items())
        + f"; torch.optim foreach step {1e3 * foreach / args.steps:.2f}"
    )


def blocks(args: argparse.Namespace) -> None:
    cases: dict[str, Callable[[], object]] = {}
    for name, block in (("step_ in cache blocks", base.CACHE_BLOCK), ("step_ whole", None)):
        opt, params, grads, _, overrides = problem(args.optimizer, args.size, 0)
        state = opt.init(params)

        def step(
            opt: Any = opt,
            params: Any = params,
            grads: Any = grads,
            state: Any = state,
            overrides: Any = overrides,
            block: int | None = block,
        ) -> None:
            base.CACHE_BLOCK = block if block is not None else 2**62
            opt.step_(params, grads, state, **overrides)

        cases[name] = step
    for foreach in (True, False):
        _, _, _, reference, _ = problem(args.optimizer, args.size, 0)
        reference.defaults["foreach"] = foreach
        for group in reference.param_groups:
            group["foreach"] = foreach
        cases[f"torch.optim {'foreach' if foreach else 'for-loop'}"] = reference.step
    times: dict[str, list[float]] = {name: [] for name in cases}
    faults: dict[str, list[int]] = {name: [] for name in cases}
    for _ in range(3):
        for fn in cases.values():
            fn()
    for _ in range(args.steps):
        for name, fn in cases.items():
            for _ in range(args.repeat - 1):
                fn()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name].append(timed(fn))
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    anchor = times["torch.optim foreach"]
    print(f"{args.optimizer} at {args.size}, {args.repeat} call(s) per case per round:")
    for name, values in times.items():
        ratio = statistics.median(a / b for a, b in zip(values, anchor, strict=True))
        print(
            f"  {name:22s} {1e3 * statistics.median(values):7.2f} ms  {ratio:.2f}x foreach  "
            f"{statistics.median(faults[name]):.0f} minor page faults"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--size", choices=("tiny", "1M", "8M"), default="tiny")
    parser.add_argument("--leaves", type=int, default=80, help="tensors, for --size tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blocks", action="store_true", help="cache blocks on and off")
    parser.add_argument("--repeat", type=int, default=1, help="calls per case per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {load()}")
    if args.size == "tiny":
        tiny(args)
    else:
        blocks(args) if args.blocks else phases(args)


if __name__ == "__main__":
    main()
