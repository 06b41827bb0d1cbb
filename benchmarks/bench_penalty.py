"""What a penalty adds to a gradient: ``grad(loss + lam * penalty)`` over ``grad(loss)``.

For each penalty of ``functorch_reg.penalties`` (at its default ``where``: every leaf,
weights only for ``orthogonal``) and two models called through ``functional_call``:

* ``mlp``: 784-1024-1024-10 with ReLU, batch 256, cross-entropy;
* ``transformer``: one ``nn.TransformerEncoderLayer`` (d_model 256, 8 heads, feed-forward
  1024, no dropout), batch 16 x 128 tokens, mean squared error to a random target;

``torch.func.grad`` of the objective is timed eager and under ``torch.compile``
(``fullgraph=True``), with ``lam`` a 0-d tensor. Times are medians of
``torch.utils.benchmark`` blocks in rounds that interleave the cases; the overhead is the
median per-round ratio to the unpenalized gradient, minus one. The target is an
overhead under 5% compiled. Compile time (first call; Inductor's caches may be warm) is
reported apart.

    python benchmarks/bench_penalty.py --device cpu
    python benchmarks/bench_penalty.py --device cuda --models transformer --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
from timing import (
    add_common_arguments,
    first_call_seconds,
    interleaved_times,
    load,
    median_ratio,
    print_header,
    setup,
)
from torch import Tensor, nn
from torch.func import functional_call, grad

import functorch_reg as fr

TARGET = 0.05
Params = dict[str, Tensor]
Penalty = Callable[[Params], Tensor]


def mlp(device: str) -> tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor]]:
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    x = torch.randn(256, 784, device=device)
    y = torch.randint(10, (256,), device=device)
    return model.to(device), (x, y), nn.functional.cross_entropy


def transformer(device: str) -> tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor]]:
    model = nn.TransformerEncoderLayer(
        d_model=256, nhead=8, dim_feedforward=1024, dropout=0.0, batch_first=True
    )
    x = torch.randn(16, 128, 256, device=device)
    target = torch.randn(16, 128, 256, device=device)
    return model.to(device), (x, target), nn.functional.mse_loss


MODELS = {"mlp": mlp, "transformer": transformer}


def penalties(params: Params) -> dict[str, Penalty | None]:
    reference = {name: p + 0.01 * torch.randn_like(p) for name, p in params.items()}
    return {
        "none": None,
        "l1": fr.penalties.l1,
        "l2": fr.penalties.l2,
        "elastic_net": fr.penalties.elastic_net,
        "group_lasso": fr.penalties.group_lasso,
        "l2_sp": lambda p: fr.penalties.l2_sp(p, reference),
        "orthogonal": fr.penalties.orthogonal,
    }


def gradient(
    model: nn.Module, loss_fn: Callable[..., Tensor], penalty: Penalty | None
) -> Callable[..., Params]:
    def objective(params: Params, inputs: Tensor, target: Tensor, lam: Tensor) -> Tensor:
        loss = loss_fn(functional_call(model, params, (inputs,)), target)
        return loss if penalty is None else loss + lam * penalty(params)

    return grad(objective)


def bench_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, (inputs, target), loss_fn = MODELS[name](args.device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    lam = torch.tensor(1e-4, device=args.device)
    numel = sum(p.numel() for p in params.values())
    print(f"\n## {name}: {numel / 1e6:.2f}M parameters in {len(params)} tensors", flush=True)
    torch._dynamo.reset()
    steps: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    failures: dict[str, str] = {}
    named = penalties(params)
    for penalty_name, penalty in named.items():
        eager = gradient(model, loss_fn, penalty)
        compiled = torch.compile(gradient(model, loss_fn, penalty), fullgraph=True)
        for mode, fn in (("eager", eager), ("compiled", compiled)):
            key = f"{penalty_name} {mode}"
            call = functools.partial(fn, params, inputs, target, lam)
            try:
                first = first_call_seconds(call, args.device)
                call()  # a second warm-up: lazy initialization of libraries and allocator
            except Exception as error:  # report the case, keep the run
                failures[key] = f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
                continue
            steps[key] = call
            if mode == "compiled":
                compile_s[penalty_name] = first
        failed = [failures[k] for k in failures if k.startswith(f"{penalty_name} ")]
        print(f"  ready: {penalty_name} {' '.join(failed)}", flush=True)
    times = interleaved_times(steps, args.rounds, args.min_run_time)

    print(
        "\n| model | penalty | eager ms | eager overhead | compiled ms | compiled overhead "
        "| compile s | under 5% compiled |"
    )
    print("|---|---|--:|--:|--:|--:|--:|---|")
    for penalty_name in named:
        cells = []
        for mode in ("eager", "compiled"):
            key, base = f"{penalty_name} {mode}", f"none {mode}"
            if key not in times or base not in times:
                cells += ["", failures.get(key, failures.get(base, ""))]
                continue
            overhead = median_ratio(times[key], times[base]) - 1
            cells += [f"{statistics.median(times[key]) * 1e3:.2f}", f"{100 * overhead:+.1f}%"]
        verdict = "-"
        if penalty_name != "none" and {f"{penalty_name} compiled", "none compiled"} <= set(times):
            overhead = median_ratio(times[f"{penalty_name} compiled"], times["none compiled"]) - 1
            verdict = "yes" if overhead < TARGET else "no"
        compiled = f"{compile_s[penalty_name]:.1f}" if penalty_name in compile_s else ""
        print(f"| {name} | {penalty_name} | {' | '.join(cells)} | {compiled} | {verdict} |")
    print(f"({load()} after timing)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=3, min_run_time=0.3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    args = parser.parse_args()
    setup(args)
    models = args.models.split(",")
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    # Each penalty compiles its own graph of torch.func's grad wrapper: one code object.
    torch._dynamo.config.recompile_limit = 16
    print_header("bench_penalty: grad(loss + lam * penalty) over grad(loss)", args.device)
    for name in models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
