"""A sweep over strengths as one vmapped compiled step vs a Python loop over the same members.

Each member is a 64-128-10 MLP trained with Adam on ``cross_entropy + lam * l1(weights)``
over a shared batch; K members, one per strength ``lam``. One training step of all K members:

* ``vmap+compile``: ``torch.compile(fr.ensemble_step(...))`` (what ``fr.sweep`` runs)
* ``vmap+compile flat``: the same over stacked flat buffers (``fr.sweep(flat=True)``)
* ``loop functional``: eager ``grad`` + ``opt.step`` per member
* ``loop functional compiled``: one compiled single-member step, called K times
* ``loop torch.optim``: an ``nn.Module`` and a ``torch.optim.Adam`` per member, ``backward()``

Medians from ``torch.utils.benchmark``; warm-up and compile excluded (compile time is
reported apart).

A second table compares K-fold cross-validation in one vmapped run (``fr.sweep(...,
folds=F)``'s step: F x K members on the shared batch, each with its held-out fold
weighted 0) with one K-member sweep on a single train/validation split (the batch's
first (F-1)/F samples), per step, next to as many unmasked members on the whole batch
(what the fold masks cost) and one member (what a launch-bound device pays for members).

    python benchmarks/bench_ensemble.py                      # CPU: K = 8, 32, 128
    python benchmarks/bench_ensemble.py --device cuda
    python benchmarks/bench_ensemble.py --members --folds 5 --strengths 16   # the CV row only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, grad
from torch.utils import benchmark

import functorch_reg as fr

BATCH, FEATURES, HIDDEN, CLASSES = 512, 64, 128, 10


def make_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
    )
    return model.to(device)


def penalty(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return fr.penalties.l1(params, where=fr.select.weights())


def median_ms(fn: Callable[[], object], device: str) -> float:
    fn()  # warm-up outside the timer
    if device == "cuda":
        torch.cuda.synchronize()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def bench(members: int, device: str) -> dict[str, float]:
    # Each size compiles afresh: Timer's thread setting is global state that Dynamo
    # guards on, and the sizes' graphs would add up to its recompile limit.
    torch._dynamo.reset()
    model = make_model(device)
    x = torch.randn(BATCH, FEATURES, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)
    values = torch.logspace(-4, -1, members, device=device)  # one strength per member
    optimizer = fr.adam(lr=1e-3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = torch.nn.functional.cross_entropy
    times: dict[str, float] = {}

    # vmap + compile, the sweep's step
    stacked = fr.stack([params] * members)
    states = fr.stack([optimizer.init(params)] * members)
    step = torch.compile(
        fr.ensemble_step(model, loss_fn, optimizer, penalty=penalty), fullgraph=True
    )
    started = time.perf_counter()
    stacked, states, _ = step(stacked, states, values, x, y)
    times["compile s"] = time.perf_counter() - started
    box = {"members": stacked, "states": states}

    def vmapped() -> None:
        box["members"], box["states"], _ = step(box["members"], box["states"], values, x, y)

    times["vmap+compile"] = median_ms(vmapped, device)

    # the same on stacked flat buffers: one buffer per member row, one kernel per update
    layout = fr.flat.pack(params)
    flat_step = torch.compile(
        fr.ensemble_step(model, loss_fn, optimizer, penalty=penalty, flat=layout), fullgraph=True
    )
    buffers = fr.stack([layout.pack_like(params)] * members)
    flat_box = {"members": buffers, "states": fr.stack([optimizer.init(layout.buffers)] * members)}

    def vmapped_flat() -> None:
        flat_box["members"], flat_box["states"], _ = flat_step(
            flat_box["members"], flat_box["states"], values, x, y
        )

    vmapped_flat()
    times["vmap+compile flat"] = median_ms(vmapped_flat, device)

    # a Python loop of functional single-member steps, eager and compiled
    def objective(p: dict[str, torch.Tensor], strength: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y) + strength * penalty(p)

    def one(p: dict, s: object, strength: torch.Tensor) -> tuple[dict, object]:
        return optimizer.step(p, grad(objective)(p, strength), s)

    for label, member_step in (
        ("loop functional", one),
        ("loop functional compiled", torch.compile(one, fullgraph=True)),
    ):
        looped = [(params, optimizer.init(params)) for _ in range(members)]

        def loop(step_one=member_step, looped=looped) -> None:
            for i in range(members):
                looped[i] = step_one(*looped[i], values[i])

        times[label] = median_ms(loop, device)

    # a Python loop of nn.Modules with torch.optim.Adam
    modules = [copy.deepcopy(model) for _ in range(members)]
    torch_optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in modules]

    def torch_loop() -> None:
        for module, torch_optimizer, strength in zip(
            modules, torch_optimizers, values, strict=True
        ):
            torch_optimizer.zero_grad()
            weights = {k: v for k, v in module.named_parameters() if v.ndim >= 2}
            loss = loss_fn(module(x), y) + strength * sum(w.abs().sum() for w in weights.values())
            loss.backward()
            torch_optimizer.step()

    times["loop torch.optim"] = median_ms(torch_loop, device)
    return times


def bench_folds(folds: int, strengths: int, device: str) -> dict[str, float]:
    """Per-step time of F x K cross-validation members vs K members on one split."""
    model = make_model(device)
    x = torch.randn(BATCH, FEATURES, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)
    optimizer = fr.adam(lr=1e-3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = torch.nn.functional.cross_entropy
    grid = torch.logspace(-4, -1, strengths, device=device)
    held_out = fr.sweep_data.kfold_masks(BATCH, folds).to(device)
    sample_losses = fr.sweep_data.per_sample(loss_fn, model(x[:2]).detach(), y[:2])
    times: dict[str, float] = {}
    split = BATCH * (folds - 1) // folds
    cases = {
        "one member": (1, False, grid[:1], x[:split], y[:split], ()),
        "one split": (strengths, False, grid, x[:split], y[:split], ()),
        # as many members as the folds, unmasked: isolates what the fold masks cost
        "members, no folds": (strengths * folds, False, grid.repeat_interleave(folds), x, y, ()),
        "folds": (
            strengths * folds,
            True,
            grid.repeat_interleave(folds),
            x,
            y,
            ((~held_out).float().repeat(strengths, 1),),
        ),
    }
    for label, (members, weighted, member_strengths, xs, ys, extra) in cases.items():
        # The step fr.sweep compiles (its public seam, member_step), timed without the loop.
        step = torch.compile(
            fr.ensemble.member_step(
                fr.ensemble.model_parts(model, "bench"),
                loss_fn,
                optimizer,
                {"penalty": penalty},
                samples="weighted" if weighted else "shared",
                sample_losses=sample_losses,
            ),
            fullgraph=True,
        )
        box = {
            "members": fr.stack([params] * members),
            "states": fr.stack([optimizer.init(params)] * members),
        }
        axes = {"penalty": member_strengths}

        def run(step=step, box=box, axes=axes, xs=xs, ys=ys, extra=extra) -> None:
            box["members"], _, box["states"], _ = step(
                box["members"], {}, box["states"], axes, xs, ys, *(extra or (None,))
            )

        started = time.perf_counter()
        run()
        times[f"{label} compile s"] = time.perf_counter() - started
        times[label] = median_ms(run, device)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--members", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--folds", type=int, default=5, help="folds of the CV row (0: none)")
    parser.add_argument("--strengths", type=int, default=16, help="strengths of the CV row")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"# bench_ensemble on {args.device} ({name}), torch {torch.__version__}, "
        f"{datetime.date.today()}, {torch.get_num_threads()} threads"
    )
    print(f"# MLP {FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH}, Adam, loss + lam * l1(weights)")
    columns = [
        "vmap+compile",
        "vmap+compile flat",
        "loop functional",
        "loop functional compiled",
        "loop torch.optim",
    ]
    print(
        f"{'K':>5} {'compile s':>10} "
        + " ".join(f"{c + ' ms':>26}" for c in columns)
        + f" {'speedup vs best loop':>21}"
    )
    for members in args.members:
        times = bench(members, args.device)
        best_loop = min(times[c] for c in columns[2:])
        cells = " ".join(f"{times[c]:>26.2f}" for c in columns)
        print(
            f"{members:>5} {times['compile s']:>10.1f} {cells} "
            f"{best_loop / times['vmap+compile']:>20.1f}x",
            flush=True,
        )
    if args.folds:
        times = bench_folds(args.folds, args.strengths, args.device)
        print(
            f"\n# {args.folds}-fold CV x {args.strengths} strengths in one vmapped step vs "
            f"{args.strengths} members on one split ({(args.folds - 1) * 100 // args.folds}% "
            "of the batch)"
        )
        print(
            f"{'members':>8} {'1 member ms':>12} {'one split ms':>13} {'no folds ms':>12} "
            f"{'folds ms':>9} {'folds / one split':>18} {'folds / no folds':>17}"
        )
        print(
            f"{args.folds * args.strengths:>8} {times['one member']:>12.2f} "
            f"{times['one split']:>13.2f} {times['members, no folds']:>12.2f} "
            f"{times['folds']:>9.2f} {times['folds'] / times['one split']:>17.2f}x "
            f"{times['folds'] / times['members, no folds']:>16.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
