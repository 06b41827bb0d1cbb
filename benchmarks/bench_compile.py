"""Compile time of a per-leaf ``step_``: the first call of ``torch.compile(opt.step_,
fullgraph=True)`` over many tensors, and the steady-state step after it.

One case per fresh process (run it several times, interleaving cases yourself), with
``torch._dynamo.reset()`` and, unless ``TORCHINDUCTOR_CACHE_DIR`` is set, a cold
Inductor cache in a fresh temporary directory. Prints one JSON line: the first call's
seconds, the compile phases over 1 s (``torch._dynamo.utils.compilation_time_metrics``,
nested, so they overlap) and the median steady-state step.

    python benchmarks/bench_compile.py --layers 10 --d 256 --optimizer adamw
    python benchmarks/bench_compile.py --backend eager        # Dynamo alone
    python benchmarks/bench_compile.py --option max_fusion_buffer_group_pairwise_attempts=8
    python benchmarks/bench_compile.py --case torch-optim   # torch.optim.AdamW's step, compiled
    python benchmarks/bench_compile.py --isa-probed         # as on a machine that compiled before
    python benchmarks/bench_compile.py --case floor-foreach  # a bare AdamW: what Inductor needs

``--case floor-foreach`` and ``floor-loop`` compile a bare AdamW written by hand (eight
``torch._foreach_*`` calls, or the same ops leaf by leaf: no checks, no pytrees, no state
type) over the same tensors: the compile time of the arithmetic alone, a floor for any
optimizer of these tensors.

``--isa-probed`` picks Inductor's vector ISA before the clock starts: a cold cache
directory makes Inductor build test programs for it (about 8 s here), which a machine
pays once per cache directory, not once per optimizer.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import tempfile
import time

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

import torch
from bench_step import transformer_params

import functorch_reg as fr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="16 tensors per layer")
    parser.add_argument("--d", type=int, default=256, help="layer width")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--steps", type=int, default=20, help="timed steady-state steps")
    parser.add_argument(
        "--case",
        choices=["fr", "torch-optim", "floor-foreach", "floor-loop"],
        default="fr",
        help="fr: the library's step_; torch-optim: torch.optim's step (foreach=False, "
        "lr and weight decay as floats; compiled without fullgraph, see below); floor-*: "
        "a bare AdamW by hand (--optimizer adamw only)",
    )
    parser.add_argument(
        "--isa-probed", action="store_true", help="pick Inductor's vector ISA before timing"
    )
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend: 'eager' times Dynamo alone, 'aot_eager' adds AOTAutograd",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for torch.compile(options=...), e.g. "
        "max_fusion_buffer_group_pairwise_attempts=8 (repeatable; VALUE is a Python literal)",
    )
    args = parser.parse_args()
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    # bench_step's transformer leaves: 16 tensors per layer (--layers 10 --d 256: 160, 8M)
    params = {k: v.to(dtype) for k, v in transformer_params(args.d, args.layers, "cpu", 0).items()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    if args.optimizer == "adamw":
        opt = fr.adamw(lr=1e-3, weight_decay=1e-2)
        hyper = {"lr": torch.tensor(1e-3), "weight_decay": torch.tensor(1e-2)}
    else:
        opt = fr.sgd(lr=1e-2, momentum=0.9, weight_decay=1e-4)
        hyper = {"lr": torch.tensor(1e-2), "weight_decay": torch.tensor(1e-4)}
    if args.case == "fr":
        state = opt.init(params)

        def run() -> None:
            step(params, grads, state, **hyper)

        function = opt.step_
    elif args.case.startswith("floor"):
        if args.optimizer != "adamw":
            parser.error("--case floor-* is an AdamW")
        lists = [list(params.values()), list(grads.values())]
        lists += [[torch.zeros_like(p) for p in lists[0]] for _ in range(2)]
        sizes = [torch.tensor(1e-3, dtype=dtype) for _ in lists[0]]

        def run() -> None:
            step(*lists, sizes)

        function = _floor_foreach if args.case == "floor-foreach" else _floor_loop
    else:
        leaves = [p.requires_grad_() for p in params.values()]
        for leaf, grad in zip(leaves, grads.values(), strict=True):
            leaf.grad = grad
        floats = {k: v.item() for k, v in hyper.items()}
        if args.optimizer == "adamw":
            reference = torch.optim.AdamW(leaves, foreach=False, **floats)
        else:
            reference = torch.optim.SGD(leaves, momentum=0.9, foreach=False, **floats)

        def run() -> None:
            step()

        function = reference.step
    if args.isa_probed:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        pick_vec_isa()
    torch._dynamo.reset()
    # torch.optim's step breaks the graph on purpose (torch._dynamo.graph_break in _use_grad)
    fullgraph = args.case != "torch-optim"
    step = torch.compile(
        function, fullgraph=fullgraph, backend=args.backend, options=options or None
    )
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    phases = {}
    for key, values in torch._dynamo.utils.compilation_time_metrics.items():
        phases[key] = round(sum(values), 2)
    print(
        json.dumps(
            {
                "tensors": len(params),
                "numel": sum(p.numel() for p in params.values()),
                "optimizer": args.optimizer,
                "case": args.case,
                "isa_probed": args.isa_probed,
                "backend": args.backend,
                "options": options,
                "first_call_s": round(first, 2),
                "step_ms_median": round(1000 * statistics.median(times), 3),
                "phases_s": {k: v for k, v in phases.items() if v >= 1.0},
                "loadavg": os.getloadavg()[0],
                "torch": torch.__version__,
            }
        )
    )


def _floor_foreach(
    ps: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    sizes: list[torch.Tensor],
) -> None:
    """AdamW's arithmetic by hand (lr 1e-3, decay 1e-2, constant bias corrections)."""
    torch._foreach_mul_(ps, 1 - 1e-5)
    torch._foreach_lerp_(ms, gs, 0.1)
    torch._foreach_mul_(vs, 0.999)
    torch._foreach_addcmul_(vs, gs, gs, 0.001)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, 0.5)
    torch._foreach_add_(denom, 1e-8)
    torch._foreach_addcdiv_(ps, torch._foreach_mul(ms, sizes), denom, value=-1)


def _floor_loop(
    ps: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    sizes: list[torch.Tensor],
) -> None:
    """:func:`_floor_foreach` leaf by leaf."""
    for p, g, m, v, size in zip(ps, gs, ms, vs, sizes, strict=True):
        p.mul_(1 - 1e-5)
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.addcdiv_(m * size, v.sqrt() / 0.5 + 1e-8, value=-1)


if __name__ == "__main__":
    main()
