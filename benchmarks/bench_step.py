"""One optimizer step over transformer-shaped parameter sets, against torch.optim and torchopt.

The parameters are fp32 tensors shaped like transformer layers: per layer four d×d
attention matrices, a d×4d and a 4d×d MLP matrix, their biases and two LayerNorms
(12 d² + 13 d parameters in 16 tensors). One AdamW step (or SGD with momentum, 0.9) is
timed for:

* functorch_reg ``step`` (pure) and ``step_`` (in place): eager (the default grouped
  path, and ``fused=True``), ``torch.compile`` (``fullgraph=True``) and, on CUDA,
  ``mode="reduce-overhead"`` (CUDA graphs);
* ``torch.optim.AdamW`` / ``SGD``: for-loop (``foreach=False``), foreach, fused;
* torchopt's functional ``adamw`` / ``sgd``: ``update(..., inplace=True)`` then
  ``apply_updates(..., inplace=True)``, for AdamW also with ``use_accelerated_op=True``.

functorch_reg gets lr and weight_decay as 0-d float32 tensors on the device at every
call, as a schedule passes them. Each case owns its parameters and state; the gradients
are shared, except torchopt's (it writes the update into them). Times are medians of
``torch.utils.benchmark`` blocks after three warm-up calls, in rounds that interleave the
cases; ratios are taken within a round. The first call of a compiled case (compile plus
one step; Inductor's caches may be warm) is reported apart. Bandwidth counts the floor of
28 bytes per parameter for AdamW (read p, g, m, v; write p, m, v) and 20 for SGD (read
p, g, b; write p, b); "% copy" divides it by a device-to-device copy timed in the same
rounds (bytes read + written).

Under CUDA graphs the pure ``step`` clones its outputs before feeding them back (a replay
reuses its output memory), and ``step_`` marks params and state as static addresses.

Compiling dominates the run time: 2 to 3 minutes per compiled case at 160 tensors on a
2-core CPU (about 15 minutes for the CPU defaults), 1 to 1.5 minutes at 100M on an H100
host, so on a machine with a per-command limit run one size per command.

    python benchmarks/bench_step.py --device cpu                    # sizes 1M, 8M, 32M
    python benchmarks/bench_step.py --device cuda --sizes 100M      # or 1M, 8M, 32M, 300M
    python benchmarks/bench_step.py --device cpu --optimizer sgd --sizes 32M

``--optimizer muon`` times ``fr.muon`` (Newton-Schulz in bfloat16 on the matrices, an
AdamW part on the vectors) against ``torch.optim.Muon`` on the matrices next to
``torch.optim.AdamW`` (for-loop) on the rest; ``--optimizer lion`` times ``fr.lion``
against ``lion_pytorch.Lion`` (its for-loop and, when installed, its foreach version).
Their "x ref" column divides by that reference; their floor counts 20 bytes per
parameter (read p, g, m; write p, m), which Muon's matmuls do not approach.

    python benchmarks/bench_step.py --device cpu --optimizer lion --sizes 1M
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import optree
import torch
from timing import (
    UnavailableError,
    add_common_arguments,
    first_call_seconds,
    interleaved_times,
    load,
    median_ratio,
    print_header,
    setup,
)
from torch import Tensor
from torch._dynamo.utils import counters

import functorch_reg as fr

# name: (d, layers). Few wide layers at 300M keep its compile time near the others'.
SIZES = {
    "0.1M": (64, 2),
    "1M": (128, 5),
    "8M": (256, 10),
    "32M": (512, 10),
    "100M": (1024, 8),
    "300M": (2048, 6),
}
DEFAULT_SIZES = {"cpu": "1M,8M,32M", "cuda": "1M,8M,32M,100M,300M"}
BYTES_PER_PARAM = {"adamw": 28, "sgd": 20, "muon": 20, "lion": 20}
HYPERPARAMS = {
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "sgd": {"lr": 1e-2, "weight_decay": 1e-4},
    "muon": {"lr": 2e-2, "weight_decay": 0.1},
    "lion": {"lr": 1e-4, "weight_decay": 1.0},
}
MUON_ADAMW = {"lr": 3e-4, "weight_decay": 1e-2}  # Muon's AdamW part, for the vectors
MOMENTUM = 0.9
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
COPY = "device copy (reference)"
FUSED = "torch.optim fused"
TORCH_MUON = "torch.optim.Muon + AdamW for-loop"
LION_PYTORCH = "lion-pytorch"
# What each optimizer's "x ref" column divides by.
BASELINE = {"adamw": FUSED, "sgd": FUSED, "muon": TORCH_MUON, "lion": LION_PYTORCH}
COMPILED_INPLACE = "fr step_ compiled"
COMPILED_INPLACE_GRAPHS = "fr step_ compiled reduce-overhead"
FLAT = "fr flat step_ compiled"
FLAT_GRAPHS = "fr flat step_ compiled reduce-overhead"
ADAPTER_FLAT = "fr TorchOptimizer(flat=True) compiled"
FLAT_GROUPS = {"decay": fr.select.weights(), "no_decay": lambda name, leaf: leaf.ndim < 2}
BIG = 100e6  # the CUDA target is stated for 100M+ parameters

Params = dict[str, Tensor]
Step = Callable[[], object]
Builder = Callable[[Params, Params, str], Step]


def numel(size: str) -> int:
    d, layers = SIZES[size]
    return layers * (12 * d * d + 13 * d)


def transformer_params(d: int, layers: int, device: str, seed: int) -> Params:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for name in ("q", "k", "v", "o"):
            shapes[f"{layer}.attn.{name}.weight"] = (d, d)
            shapes[f"{layer}.attn.{name}.bias"] = (d,)
        shapes[f"{layer}.mlp.up.weight"] = (4 * d, d)
        shapes[f"{layer}.mlp.up.bias"] = (4 * d,)
        shapes[f"{layer}.mlp.down.weight"] = (d, 4 * d)
        shapes[f"{layer}.mlp.down.bias"] = (d,)
        for norm in ("ln1", "ln2"):
            shapes[f"{layer}.{norm}.weight"] = (d,)
            shapes[f"{layer}.{norm}.bias"] = (d,)
    generator = torch.Generator(device).manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator, device=device) * 0.02
        for name, shape in shapes.items()
    }


def cloned(tree: Params) -> Params:
    return {name: tensor.clone() for name, tensor in tree.items()}


def functional(optimizer: str, fused: bool = False) -> fr.Optimizer:
    floats = HYPERPARAMS[optimizer]
    if optimizer == "adamw":
        return fr.adamw(**floats, fused=fused)
    if optimizer == "muon":
        return fr.muon(**floats, adam=fr.adamw(**MUON_ADAMW))
    if optimizer == "lion":
        return fr.lion(**floats)
    return fr.sgd(**floats, momentum=MOMENTUM, fused=fused)


def torch_muon_case() -> Builder:
    """torch.optim.Muon on the matrices (it takes nothing else), AdamW on the rest."""

    def build(params: Params, grads: Params, device: str) -> Step:
        tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for tensor, grad in zip(tensors, grads.values(), strict=True):
            tensor.grad = grad
        muon = torch.optim.Muon([p for p in tensors if p.ndim == 2], **HYPERPARAMS["muon"])
        adamw = torch.optim.AdamW([p for p in tensors if p.ndim != 2], **MUON_ADAMW, foreach=False)

        def step() -> None:
            muon.step()
            adamw.step()

        return step

    return build


def lion_pytorch_case(foreach: bool) -> Builder:
    def build(params: Params, grads: Params, device: str) -> Step:
        try:
            if foreach:
                from lion_pytorch.foreach import Lion
            else:
                from lion_pytorch import Lion
        except ImportError as error:
            raise UnavailableError(f"lion-pytorch is not installed ({error})") from None
        tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for tensor, grad in zip(tensors, grads.values(), strict=True):
            tensor.grad = grad
        return Lion(tensors, **HYPERPARAMS["lion"]).step

    return build


def functorch_reg_case(
    optimizer: str, in_place: bool, mode: str | None, fused: bool = False
) -> Builder:
    """``mode``: None for eager, else a ``torch.compile`` mode; ``fused``: the rules'
    ``fused=True`` (torch's fused kernels on the eager path; AdamW and SGD)."""

    def build(params: Params, grads: Params, device: str) -> Step:
        if mode == "reduce-overhead" and device != "cuda":
            raise UnavailableError("CUDA graphs need CUDA")
        floats = HYPERPARAMS[optimizer]
        if fused and optimizer not in ("adamw", "sgd"):
            raise UnavailableError("fused=True is for AdamW and SGD")
        opt = functional(optimizer, fused)
        hyperparams = {k: torch.tensor(v, device=device) for k, v in floats.items()}
        params = cloned(params)
        state = opt.init(params)
        if mode == "reduce-overhead" and in_place:
            # CUDA graphs are skipped for a graph that mutates inputs whose addresses
            # may change; params and state live for the whole run, so promise they don't.
            for tensor in optree.tree_leaves((params, state)):
                torch._dynamo.mark_static_address(tensor)
        step = opt.step_ if in_place else opt.step
        if mode is not None:
            step = torch.compile(step, fullgraph=True, mode=mode)
        if in_place:
            return lambda: step(params, grads, state, **hyperparams)
        box = [params, state]

        def pure_step() -> None:
            box[0], box[1] = step(box[0], grads, box[1], **hyperparams)

        def pure_step_graphed() -> None:
            # A replay writes its outputs where the last replay's were: keeping them as
            # the next inputs needs a copy, a cost of the pure API under CUDA graphs.
            torch.compiler.cudagraph_mark_step_begin()
            outputs = step(box[0], grads, box[1], **hyperparams)
            box[0], box[1] = optree.tree_map(torch.clone, outputs)

        return pure_step_graphed if mode == "reduce-overhead" else pure_step

    return build


def flat_case(optimizer: str, mode: str) -> Builder:
    """``fr.flat``: weights and the rest packed into two buffers, decay on weights."""

    def build(params: Params, grads: Params, device: str) -> Step:
        if mode == "reduce-overhead" and device != "cuda":
            raise UnavailableError("CUDA graphs need CUDA")
        floats = HYPERPARAMS[optimizer]
        if optimizer == "adamw":
            opt = fr.adamw(**floats, mask="decay")
        else:
            opt = fr.sgd(**floats, momentum=MOMENTUM, mask="decay")
        hyperparams = {k: torch.tensor(v, device=device) for k, v in floats.items()}
        flat = fr.flat.pack(params, FLAT_GROUPS)
        flat_grads = flat.pack_like(grads)
        state = opt.init(flat.buffers)
        if mode == "reduce-overhead":
            # The gradient buffer lives for the run too (as TorchOptimizer(flat=True)'s
            # does); unmarked, each replay would first copy it into the graph's memory.
            for tensor in optree.tree_leaves((flat.buffers, flat_grads, state)):
                torch._dynamo.mark_static_address(tensor)
        step = torch.compile(opt.step_, fullgraph=True, mode=mode)
        return lambda: step(flat.buffers, flat_grads, state, **hyperparams)

    return build


def adapter_case(optimizer: str, flat: bool, options: dict[str, object]) -> Builder:
    """``fr.TorchOptimizer(compile=True)``: weights and the rest as two param groups."""

    def build(params: Params, grads: Params, device: str) -> Step:
        floats = HYPERPARAMS[optimizer]
        if optimizer == "adamw":
            functional = fr.adamw(**floats)
        else:
            functional = fr.sgd(**floats, momentum=MOMENTUM)
        tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for tensor, grad in zip(tensors, grads.values(), strict=True):
            tensor.grad = grad.clone()
        groups = [
            {"params": [p for p in tensors if p.ndim >= 2]},
            {"params": [p for p in tensors if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = fr.TorchOptimizer(
            groups, functional, flat=flat, compile=True, compile_options=options or None
        )
        return opt.step

    return build


def torch_optim_case(optimizer: str, flags: dict[str, bool]) -> Builder:
    def build(params: Params, grads: Params, device: str) -> Step:
        tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for tensor, grad in zip(tensors, grads.values(), strict=True):
            tensor.grad = grad
        if optimizer == "adamw":
            opt = torch.optim.AdamW(tensors, **HYPERPARAMS["adamw"], **flags)
        else:
            opt = torch.optim.SGD(tensors, **HYPERPARAMS["sgd"], momentum=MOMENTUM, **flags)
        return opt.step

    return build


def torchopt_case(optimizer: str, accelerated: bool) -> Builder:
    def build(params: Params, grads: Params, device: str) -> Step:
        try:
            import torchopt
        except ImportError as error:
            raise UnavailableError(f"torchopt is not installed ({error})") from None
        if accelerated and importlib.util.find_spec("torchopt._C") is None:
            # Its Python fallback would run instead: e.g. the py3-none-any wheel (Python 3.12).
            raise UnavailableError("torchopt is installed without its C++/CUDA op (torchopt._C)")
        if accelerated and not torchopt.accelerated_op_available(torch.device(device)):
            raise UnavailableError("torchopt's accelerated op does not run on this device")
        floats = HYPERPARAMS[optimizer]
        if optimizer == "adamw":
            transform = torchopt.adamw(**floats, use_accelerated_op=accelerated)
        else:
            transform = torchopt.sgd(**floats, momentum=MOMENTUM)
        params, grads = cloned(params), cloned(grads)
        box = [transform.init(params)]

        def step() -> None:
            updates, box[0] = transform.update(grads, box[0], params=params, inplace=True)
            torchopt.apply_updates(params, updates, inplace=True)

        return step

    return build


def cases(optimizer: str) -> dict[str, Builder]:
    if optimizer in ("muon", "lion"):
        ours = {
            "fr step eager": functorch_reg_case(optimizer, in_place=False, mode=None),
            "fr step_ eager": functorch_reg_case(optimizer, in_place=True, mode=None),
            "fr step compiled": functorch_reg_case(optimizer, in_place=False, mode="default"),
            COMPILED_INPLACE: functorch_reg_case(optimizer, in_place=True, mode="default"),
        }
        if optimizer == "muon":
            return {**ours, TORCH_MUON: torch_muon_case()}
        return {
            **ours,
            LION_PYTORCH: lion_pytorch_case(foreach=False),
            "lion-pytorch foreach": lion_pytorch_case(foreach=True),
        }
    built = {
        "fr step eager": functorch_reg_case(optimizer, in_place=False, mode=None),
        "fr step_ eager": functorch_reg_case(optimizer, in_place=True, mode=None),
        "fr step eager fused=True": functorch_reg_case(
            optimizer, in_place=False, mode=None, fused=True
        ),
        "fr step_ eager fused=True": functorch_reg_case(
            optimizer, in_place=True, mode=None, fused=True
        ),
        "fr step compiled": functorch_reg_case(optimizer, in_place=False, mode="default"),
        COMPILED_INPLACE: functorch_reg_case(optimizer, in_place=True, mode="default"),
        "fr step compiled reduce-overhead": functorch_reg_case(
            optimizer, in_place=False, mode="reduce-overhead"
        ),
        COMPILED_INPLACE_GRAPHS: functorch_reg_case(
            optimizer, in_place=True, mode="reduce-overhead"
        ),
        FLAT: flat_case(optimizer, mode="default"),
        FLAT_GRAPHS: flat_case(optimizer, mode="reduce-overhead"),
        ADAPTER_FLAT: adapter_case(optimizer, flat=True, options={}),
        "fr TorchOptimizer compiled, combo kernels": adapter_case(
            optimizer, flat=False, options={"options": {"combo_kernels": True}}
        ),
        "torch.optim for-loop": torch_optim_case(optimizer, {"foreach": False}),
        "torch.optim foreach": torch_optim_case(optimizer, {"foreach": True}),
        FUSED: torch_optim_case(optimizer, {"fused": True}),
        "torchopt functional": torchopt_case(optimizer, accelerated=False),
    }
    if optimizer == "adamw":
        built["torchopt functional, accelerated op"] = torchopt_case(optimizer, accelerated=True)
    return built


@dataclass
class Row:
    times: list[float] | None = None  # seconds, one per round
    compile_s: float | None = None
    note: str = ""


def bench_size(size: str, args: argparse.Namespace) -> dict[str, Row]:
    d, layers = SIZES[size]
    params = transformer_params(d, layers, args.device, seed=0)
    grads = transformer_params(d, layers, args.device, seed=1)
    floor_bytes = BYTES_PER_PARAM[args.optimizer] * numel(size)
    print(
        f"\n## {size}: {numel(size) / 1e6:.1f}M fp32 parameters in {len(params)} tensors "
        f"(d={d}, {layers} layers), {args.optimizer}, floor {floor_bytes / 1e9:.2f} GB a step",
        flush=True,
    )
    torch._dynamo.reset()
    rows: dict[str, Row] = {}
    steps: dict[str, Step] = {}
    for name, build in cases(args.optimizer).items():
        baseline = BASELINE[args.optimizer]
        if args.cases and name != baseline and not any(part in name for part in args.cases):
            continue
        row = rows[name] = Row()
        skips = counters["inductor"]["cudagraph_skips"]
        try:
            steps[name] = step = build(params, grads, args.device)
            first = first_call_seconds(step, args.device)
            first_call_seconds(step, args.device)  # CUDA graphs record on the 2nd call
            first_call_seconds(step, args.device)
        except UnavailableError as reason:
            row.note = f"n/a: {reason}"
        except Exception as error:  # e.g. fused unsupported: report the case, keep the run
            row.note = f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        else:
            if "compiled" in name:
                row.compile_s = first
            if counters["inductor"]["cudagraph_skips"] > skips:
                row.note = "CUDA graphs skipped (TORCH_LOGS=perf_hints says why)"
        if row.note.startswith("n/a"):
            steps.pop(name, None)
        print(f"  ready: {name} {row.note}", flush=True)

    copy_elements = COPY_BYTES[args.device] // 4
    source = torch.ones(copy_elements, device=args.device)
    target = torch.empty_like(source)
    steps[COPY] = lambda: target.copy_(source)
    rows[COPY] = Row(note=f"{COPY_BYTES[args.device] // 2**20} MiB, read + written")
    for name, times in interleaved_times(steps, args.rounds, args.min_run_time).items():
        rows[name].times = times
    print_table(rows, floor_bytes, 2 * COPY_BYTES[args.device], BASELINE[args.optimizer])
    print(f"({load()} after timing)", flush=True)
    return rows


def print_table(
    rows: dict[str, Row], floor_bytes: int, copy_bytes: int, baseline: str = FUSED
) -> None:
    copy = rows[COPY].times
    fused = rows[baseline].times
    assert copy is not None
    column = "x fused" if baseline == FUSED else "x ref"
    print(f"\n| case | ms | {column} | GB/s | % copy | compile s | note |")
    print("|---|--:|--:|--:|--:|--:|---|")
    for name, row in rows.items():
        if row.times is None:
            print(f"| {name} | | | | | | {row.note} |")
            continue
        moved = copy_bytes if name == COPY else floor_bytes
        ms = statistics.median(row.times) * 1e3
        ratio = f"{median_ratio(row.times, fused):.2f}" if fused and name != COPY else ""
        gbps = moved / statistics.median(row.times) / 1e9
        # moved / t over copy_bytes / t_copy, per round
        percent = 100 * moved / copy_bytes * median_ratio(copy, row.times)
        compiled = "" if row.compile_s is None else f"{row.compile_s:.1f}"
        print(
            f"| {name} | {ms:.2f} | {ratio} | {gbps:.1f} | {percent:.0f} | {compiled} | "
            f"{row.note} |"
        )
    print(flush=True)


EAGER_GOALS = {
    # case: (anchor, at most this many times the anchor)
    "fr step_ eager": ("torch.optim foreach", 1.0),
    "fr step eager": ("torch.optim foreach", 1.5),
    "fr step_ eager fused=True": (FUSED, 1.25),
}


def report_eager_targets(results: dict[str, dict[str, Row]]) -> None:
    """Issue 21's eager goals, at every size run: the default step_ at most torch.optim's
    foreach, the pure step at most 1.5x foreach, step_ with fused=True at most 1.25x fused."""
    print("## Eager targets (median of per-round ratios)")
    for size, rows in results.items():
        for name, (anchor, goal) in EAGER_GOALS.items():
            row, base = rows.get(name), rows.get(anchor)
            if row is None or row.times is None or base is None or base.times is None:
                continue
            ratio = median_ratio(row.times, base.times)
            verdict = "holds" if ratio <= goal else "misses"
            print(f"{size}, {name}: {ratio:.2f}x {anchor} (target <= {goal}) -> {verdict}")


def report_targets(results: dict[str, dict[str, Row]], args: argparse.Namespace) -> None:
    """The design's goals: compiled per-leaf step_ within 1.1x of fused on CPU; the flat
    step_ at most 0.95x fused on CPU (32M) and 0.85x fused at >= 90% of the copy floor
    on CUDA (100M+)."""
    print("## Targets")
    if args.optimizer != "adamw":
        print("The targets are stated for AdamW; run with --optimizer adamw.")
        return
    goals = (
        {COMPILED_INPLACE: 1.1, FLAT: 0.95}
        if args.device == "cpu"
        else {COMPILED_INPLACE: 1.0, COMPILED_INPLACE_GRAPHS: 1.0, FLAT: 0.85, FLAT_GRAPHS: 0.85}
    )
    wanted = [size for size in results if (numel(size) >= BIG) == (args.device == "cuda")]
    if args.device == "cpu":
        wanted = [size for size in wanted if size == "32M"]
    if not wanted:
        print(f"{args.device}: the targets' size (32M on CPU, 100M+ on CUDA) was not run")
        return
    size = wanted[-1]
    rows = results[size]
    copy, fused = rows[COPY].times, rows[FUSED].times
    assert copy is not None
    floor_bytes = BYTES_PER_PARAM["adamw"] * numel(size)
    for name, goal in goals.items():
        row = rows.get(name)
        if row is None or row.times is None or fused is None:
            print(f"{args.device}, {name} at {size}: not run")
            continue
        fraction = floor_bytes / (2 * COPY_BYTES[args.device]) * median_ratio(copy, row.times)
        ratio = median_ratio(row.times, fused)
        floor_goal = args.device == "cpu" or fraction >= 0.9
        verdict = "holds" if ratio <= goal and floor_goal else "misses"
        print(
            f"{args.device}, {name} at {size}: {ratio:.2f}x fused (target <= {goal}), "
            f"{100 * fraction:.0f}% of the copy floor"
            f"{'' if args.device == 'cpu' else ' (target >= 90%)'} -> {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=5, min_run_time=0.5)
    parser.add_argument("--optimizer", choices=["adamw", "sgd", "muon", "lion"], default="adamw")
    parser.add_argument(
        "--sizes", help=f"comma-separated, from {', '.join(SIZES)}; default by device"
    )
    parser.add_argument(
        "--cases",
        help="comma-separated substrings of the case names to run (the reference, fused "
        "for adamw and sgd, always runs), "
        "e.g. 'flat,foreach' to skip the slow-to-compile per-leaf cases",
    )
    args = parser.parse_args()
    args.cases = args.cases.split(",") if args.cases else []
    setup(args)
    sizes = (args.sizes or DEFAULT_SIZES[args.device]).split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    print_header(f"bench_step: one {args.optimizer} step", args.device)
    results = {size: bench_size(size, args) for size in sizes}
    report_eager_targets(results)
    report_targets(results, args)


if __name__ == "__main__":
    main()
