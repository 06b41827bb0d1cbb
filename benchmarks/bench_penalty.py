"""What a penalty costs: in the gradient, and inside the whole compiled train step.

Two sections, each over the penalties of ``functorch_reg.penalties`` and models called
through ``functional_call``:

* ``grad``: ``torch.func.grad`` of ``loss + lam * penalty`` over that of ``loss``, eager
  and under ``torch.compile`` (``fullgraph=True``), each penalty at its default ``where``
  (every leaf; weights only for ``orthogonal``).
* ``train``: one AdamW step (lr 1e-3, weight decay 1e-2 on the weights) of
  ``fr.train_step``, forward, gradient, penalty and update compiled as one graph, with
  ``lam * penalty(params, where=fr.select.weights())`` over the same step without a
  penalty; on CUDA with ``mode="reduce-overhead"`` (CUDA graphs) too. For comparison,
  with and without ``l1``: the same step as a hand-written ``torch.compile`` of
  ``grad_and_value`` then ``opt.step_`` in one function, the usual two separately
  compiled functions (``grad_and_value``, then ``opt.step_``), and eager
  ``torch.optim.AdamW`` (foreach) after ``loss.backward()``.

Models:

* ``mlp``: 784-1024-1024-10 with ReLU, batch 256, cross-entropy (1.86M parameters);
* ``mlp512``: 784-512-512-10, batch 128 (0.67M), the train-step target of the issue;
* ``transformer``: one ``nn.TransformerEncoderLayer`` (d_model 256, 8 heads, feed-forward
  1024, no dropout), batch 16 x 128 tokens, mean squared error to a random target;
* ``mlp100m``: six 4096 x 4096 layers after a 784 x 4096 one, batch 32 (104M
  parameters), where the step is bound by memory bandwidth (CUDA only by default).

``lam`` and ``lr`` are 0-d tensors. Times are medians of ``torch.utils.benchmark``
blocks in rounds that interleave the cases; an overhead is the median per-round ratio to
the case without a penalty, minus one. Targets: at most 5% compiled for l1, l2, elastic
net and l2_sp, 10% for group lasso (2% at 100M on CUDA); ``orthogonal`` is reported
against its own matmul FLOPs. Compile time (first call; Inductor's caches may be warm)
is reported apart.

    python benchmarks/bench_penalty.py --device cpu --quick      # a few minutes on 2 cores
    python benchmarks/bench_penalty.py --device cpu              # both sections, all models
    python benchmarks/bench_penalty.py --device cuda --sections train --models mlp512,mlp100m
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
from torch.func import functional_call, grad, grad_and_value

import functorch_reg as fr

TARGETS = {"l1": 0.05, "l2": 0.05, "elastic_net": 0.05, "l2_sp": 0.05, "group_lasso": 0.10}
Params = dict[str, Tensor]
Penalty = Callable[[Params], Tensor]
Model = tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor]]


def mlp_of(widths: list[int], batch: int, device: str) -> Model:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(widths[-1], (batch,), device=device)
    return model.to(device), (x, y), nn.functional.cross_entropy


def transformer(device: str) -> Model:
    model = nn.TransformerEncoderLayer(
        d_model=256, nhead=8, dim_feedforward=1024, dropout=0.0, batch_first=True
    )
    x = torch.randn(16, 128, 256, device=device)
    target = torch.randn(16, 128, 256, device=device)
    return model.to(device), (x, target), nn.functional.mse_loss


MODELS: dict[str, Callable[[str], Model]] = {
    "mlp": functools.partial(mlp_of, [784, 1024, 1024, 10], 256),
    "mlp512": functools.partial(mlp_of, [784, 512, 512, 10], 128),
    "transformer": transformer,
    "mlp100m": functools.partial(mlp_of, [784, *[4096] * 7, 10], 32),
}
PENALTIES = ["none", "l1", "l2", "elastic_net", "group_lasso", "l2_sp", "orthogonal"]


def penalties(params: Params, where: fr.select.Where = None) -> dict[str, Penalty | None]:
    reference = {name: p + 0.01 * torch.randn_like(p) for name, p in params.items()}
    for leaf in reference.values():
        # A tensor the loss captures is a graph input too: static, CUDA graphs read it in
        # place rather than copying it in at every replay.
        torch._dynamo.mark_static_address(leaf)
    at = {} if where is None else {"where": where}
    return {
        "none": None,
        "l1": functools.partial(fr.penalties.l1, **at),
        "l2": functools.partial(fr.penalties.l2, **at),
        "elastic_net": functools.partial(fr.penalties.elastic_net, **at),
        "group_lasso": functools.partial(fr.penalties.group_lasso, **at),
        "l2_sp": lambda p: fr.penalties.l2_sp(p, reference, **at),
        "orthogonal": functools.partial(fr.penalties.orthogonal, **at),
    }


def objective(
    model: nn.Module, loss_fn: Callable[..., Tensor], penalty: Penalty | None
) -> Callable[..., Tensor]:
    def penalized(params: Params, inputs: Tensor, target: Tensor, lam: Tensor) -> Tensor:
        loss = loss_fn(functional_call(model, params, (inputs,)), target)
        return loss if penalty is None else loss + lam * penalty(params)

    return penalized


def orthogonal_flops(params: Params) -> float:
    """Multiply-adds x 2 of the Gram matrix and of its gradient, over the weights."""
    total = 0.0
    for p in params.values():
        if p.ndim >= 2:
            rows, cols = p.shape[0], p[0].numel()
            small, large = min(rows, cols), max(rows, cols)
            total += 2 * 2 * small * small * large  # W Wᵀ forward, (G - I) W backward
    return total


def ready(
    steps: dict[str, Callable[[], object]],
    compile_s: dict[str, float],
    failures: dict[str, str],
    key: str,
    call: Callable[[], object],
    device: str,
) -> None:
    """Run ``call`` twice (compile, then lazy initialization) and register it."""
    try:
        compile_s[key] = first_call_seconds(call, device)
        call()
    except Exception as error:  # report the case, keep the run
        failures[key] = f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
        return
    steps[key] = call


def overhead_cell(times: dict[str, list[float]], key: str, base: str) -> str:
    if key not in times or base not in times:
        return ""
    return f"{100 * (median_ratio(times[key], times[base]) - 1):+.1f}%"


def ms_cell(times: dict[str, list[float]], key: str) -> str:
    return f"{statistics.median(times[key]) * 1e3:.2f}" if key in times else ""


def bench_grad(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, (inputs, target), loss_fn = MODELS[name](args.device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    lam = torch.tensor(1e-4, device=args.device)
    torch._dynamo.reset()
    steps: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    failures: dict[str, str] = {}
    named = {k: v for k, v in penalties(params).items() if k in args.penalties}
    for penalty_name, penalty in named.items():
        eager = grad(objective(model, loss_fn, penalty))
        compiled = torch.compile(grad(objective(model, loss_fn, penalty)), fullgraph=True)
        for mode, fn in (("eager", eager), ("compiled", compiled)):
            call = functools.partial(fn, params, inputs, target, lam)
            ready(steps, compile_s, failures, f"{penalty_name} {mode}", call, args.device)
        print(f"  ready: grad {penalty_name}", flush=True)
    times = interleaved_times(steps, args.rounds, args.min_run_time)

    print(
        f"\n### grad: {name}\n\n| model | penalty | eager ms | eager overhead | compiled ms "
        "| compiled overhead | compile s |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    for penalty_name in named:
        cells = []
        for mode in ("eager", "compiled"):
            key = f"{penalty_name} {mode}"
            cells += [
                ms_cell(times, key) or failures.get(key, ""),
                overhead_cell(times, key, f"none {mode}"),
            ]
        first = compile_s.get(f"{penalty_name} compiled")
        compiled = "" if first is None else f"{first:.1f}"
        print(f"| {name} | {penalty_name} | {' | '.join(cells)} | {compiled} |")
    print(f"({load()} after timing)", flush=True)


def bench_train(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, (inputs, target), loss_fn = MODELS[name](args.device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    numel = sum(p.numel() for p in params.values())
    lam = torch.tensor(1e-4, device=args.device)
    lr = torch.tensor(1e-3, device=args.device)
    weights = fr.select.weights()
    opt = fr.adamw(lr=1e-3, weight_decay=1e-2, mask=weights)
    modes = ["compiled"] + (["cudagraphs"] if args.device == "cuda" else [])
    torch._dynamo.reset()
    steps: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    failures: dict[str, str] = {}

    def own_copy() -> tuple[Params, object]:
        mine = {k: v.clone() for k, v in params.items()}
        return mine, opt.init(mine)

    named = {k: v for k, v in penalties(params, weights).items() if k in args.penalties}
    for penalty_name, penalty in named.items():
        loss = objective(model, loss_fn, penalty)
        for mode in modes:
            step = fr.train_step(
                loss, opt, mode="reduce-overhead" if mode == "cudagraphs" else None
            )
            mine, state = own_copy()
            call = functools.partial(step, mine, state, inputs, target, lam, lr=lr)
            ready(steps, compile_s, failures, f"{penalty_name} {mode}", call, args.device)
        if penalty_name in ("none", "l1"):
            for variant, call in comparisons(loss, opt, own_copy, (inputs, target, lam), lr):
                key = f"{penalty_name} {variant}"
                ready(steps, compile_s, failures, key, call, args.device)
        print(f"  ready: train {penalty_name}", flush=True)
    if "none" in named:
        key = "none torch.optim eager"
        ready(steps, compile_s, failures, key, torch_optim_step(model, loss_fn, inputs, target),
              args.device)  # fmt: skip
    times = interleaved_times(steps, args.rounds, args.min_run_time)

    columns = " | ".join(f"{mode} ms | {mode} overhead" for mode in modes)
    rule = "|--:|--:" * len(modes)
    print(
        f"\n### train step: {name}, {numel / 1e6:.2f}M parameters in {len(params)} tensors, "
        f"AdamW\n\n| model | penalty | {columns} | compile s | target | met |"
    )
    print(f"|---|---{rule}|--:|--:|---|")
    for penalty_name in named:
        cells = []
        for mode in modes:
            key = f"{penalty_name} {mode}"
            cells += [
                ms_cell(times, key) or failures.get(key, ""),
                overhead_cell(times, key, f"none {mode}"),
            ]
        first = compile_s.get(f"{penalty_name} compiled")
        target = TARGETS.get(penalty_name)
        verdict = "-"
        if target is not None:
            if name == "mlp100m" and args.device == "cuda":
                target = 0.02
            best = [
                median_ratio(times[f"{penalty_name} {m}"], times[f"none {m}"]) - 1
                for m in modes
                if {f"{penalty_name} {m}", f"none {m}"} <= set(times)
            ]
            verdict = "yes" if best and best[-1] <= target else "no"
        print(
            f"| {name} | {penalty_name} | {' | '.join(cells)} | "
            f"{'' if first is None else f'{first:.1f}'} | "
            f"{'' if target is None else f'{100 * target:.0f}%'} | {verdict} |"
        )
    key = "orthogonal compiled"
    if key in times and "none compiled" in times:
        added = statistics.median(times[key]) - statistics.median(times["none compiled"])
        flops = orthogonal_flops(params)
        print(
            f"\northogonal adds {added * 1e3:.2f} ms for {flops / 1e9:.2f} GFLOP of Gram "
            f"matrices and their gradient: {flops / max(added, 1e-9) / 1e9:.0f} GFLOP/s"
        )

    print(
        "\n| model | step | none ms | x fr.train_step | l1 ms | l1 overhead |\n"
        "|---|---|--:|--:|--:|--:|"
    )
    base = "none compiled"
    for variant in ["compiled", *modes[1:], "one graph by hand", "grad + step_ apart",
                    "torch.optim eager"]:  # fmt: skip
        none, l1 = f"none {variant}", f"l1 {variant}"
        ratio = (
            f"{median_ratio(times[none], times[base]):.2f}"
            if none in times and base in times
            else failures.get(none, "")
        )
        label = {"compiled": "fr.train_step", "cudagraphs": "fr.train_step, CUDA graphs"}.get(
            variant, variant
        )
        print(
            f"| {name} | {label} | {ms_cell(times, none)} | {ratio} | {ms_cell(times, l1)} | "
            f"{overhead_cell(times, l1, none)} |"
        )
    print(f"({load()} after timing)", flush=True)


def comparisons(
    loss: Callable[..., Tensor],
    opt: fr.Optimizer,
    own_copy: Callable[[], tuple[Params, object]],
    args: tuple[Tensor, ...],
    lr: Tensor,
) -> list[tuple[str, Callable[[], object]]]:
    """The same step written by hand: one compiled function, and two."""

    def by_hand(params: Params, state: object, *args: Tensor) -> Tensor:
        grads, value = grad_and_value(loss)(params, *args)
        opt.step_(params, grads, state, lr=lr)
        return value

    one_graph = torch.compile(by_hand, fullgraph=True)
    compiled_grad = torch.compile(grad_and_value(loss), fullgraph=True)
    compiled_step = torch.compile(opt.step_, fullgraph=True)
    mine, state = own_copy()
    theirs, their_state = own_copy()

    def apart() -> Tensor:
        grads, value = compiled_grad(theirs, *args)
        compiled_step(theirs, grads, their_state, lr=lr)
        return value

    return [
        ("one graph by hand", functools.partial(one_graph, mine, state, *args)),
        ("grad + step_ apart", apart),
    ]


def torch_optim_step(
    model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Tensor, target: Tensor
) -> Callable[[], object]:
    """The eager loop most code has: zero_grad, forward, backward, torch.optim step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        weight_decay=1e-2,
    )

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=3, min_run_time=0.3)
    parser.add_argument("--models", help="comma-separated (default: all but mlp100m on CPU)")
    parser.add_argument("--sections", default="grad,train", help="grad, train or both")
    parser.add_argument("--penalties", default=",".join(PENALTIES), help="comma-separated")
    parser.add_argument(
        "--quick", action="store_true", help="the train section on mlp512 only, 2 rounds"
    )
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.sections, args.rounds = "train", min(args.rounds, 2)
        args.models = args.models or "mlp512"
    default_models = [m for m in MODELS if m != "mlp100m" or args.device == "cuda"]
    models = args.models.split(",") if args.models else default_models
    sections = args.sections.split(",")
    args.penalties = args.penalties.split(",")
    for kind, chosen, known in (
        ("model", models, MODELS),
        ("section", sections, ["grad", "train"]),
        ("penalty", args.penalties, PENALTIES),
    ):
        unknown = [item for item in chosen if item not in known]
        if unknown:
            parser.error(f"unknown {kind} {unknown[0]!r}; choose from {', '.join(known)}")
    if "none" not in args.penalties:
        parser.error("--penalties must include none, the baseline")
    # torch.func's grad wrapper, and opt.step_, are one code object for every case.
    torch._dynamo.config.recompile_limit = 64
    print_header("bench_penalty: the cost of a penalty, in the gradient and the train step",
                 args.device)  # fmt: skip
    for name in models:
        if "grad" in sections and name != "mlp100m":
            bench_grad(name, args)
        if "train" in sections:
            bench_train(name, args)


if __name__ == "__main__":
    main()
