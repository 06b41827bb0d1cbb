"""A lambda sweep as one vmapped compiled step vs a Python loop over the same members.

Each member is a 64-128-10 MLP trained with Adam on ``cross_entropy + lam * l1(weights)``
over a shared batch; K members, one per lambda. One training step of all K members:

* ``vmap+compile``: ``torch.compile(fr.ensemble_step(...))`` (what ``fr.sweep`` runs)
* ``loop functional``: eager ``grad`` + ``opt.step`` per member
* ``loop functional compiled``: one compiled single-member step, called K times
* ``loop torch.optim``: an ``nn.Module`` and a ``torch.optim.Adam`` per member, ``backward()``

Medians from ``torch.utils.benchmark``; warm-up and compile excluded (compile time is
reported apart).

    python benchmarks/bench_ensemble.py                      # CPU: K = 8, 32, 128
    python benchmarks/bench_ensemble.py --device cuda
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
    model = make_model(device)
    x = torch.randn(BATCH, FEATURES, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)
    lams = torch.logspace(-4, -1, members, device=device)
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
    stacked, states, _ = step(stacked, states, lams, x, y)
    times["compile s"] = time.perf_counter() - started
    box = {"members": stacked, "states": states}

    def vmapped() -> None:
        box["members"], box["states"], _ = step(box["members"], box["states"], lams, x, y)

    times["vmap+compile"] = median_ms(vmapped, device)

    # a Python loop of functional single-member steps, eager and compiled
    def objective(p: dict[str, torch.Tensor], lam: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y) + lam * penalty(p)

    def one(p: dict, s: object, lam: torch.Tensor) -> tuple[dict, object]:
        return optimizer.step(p, grad(objective)(p, lam), s)

    for label, member_step in (
        ("loop functional", one),
        ("loop functional compiled", torch.compile(one, fullgraph=True)),
    ):
        looped = [(params, optimizer.init(params)) for _ in range(members)]

        def loop(step_one=member_step, looped=looped) -> None:
            for i in range(members):
                looped[i] = step_one(*looped[i], lams[i])

        times[label] = median_ms(loop, device)

    # a Python loop of nn.Modules with torch.optim.Adam
    modules = [copy.deepcopy(model) for _ in range(members)]
    torch_optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in modules]

    def torch_loop() -> None:
        for module, torch_optimizer, lam in zip(modules, torch_optimizers, lams, strict=True):
            torch_optimizer.zero_grad()
            weights = {k: v for k, v in module.named_parameters() if v.ndim >= 2}
            loss = loss_fn(module(x), y) + lam * sum(w.abs().sum() for w in weights.values())
            loss.backward()
            torch_optimizer.step()

    times["loop torch.optim"] = median_ms(torch_loop, device)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"# bench_ensemble on {args.device} ({name}), torch {torch.__version__}, "
        f"{datetime.date.today()}, {torch.get_num_threads()} threads"
    )
    print(f"# MLP {FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH}, Adam, loss + lam * l1(weights)")
    columns = ["vmap+compile", "loop functional", "loop functional compiled", "loop torch.optim"]
    print(
        f"{'K':>5} {'compile s':>10} "
        + " ".join(f"{c + ' ms':>26}" for c in columns)
        + f" {'speedup vs best loop':>21}"
    )
    for members in args.members:
        times = bench(members, args.device)
        best_loop = min(times[c] for c in columns[1:])
        cells = " ".join(f"{times[c]:>26.2f}" for c in columns)
        print(
            f"{members:>5} {times['compile s']:>10.1f} {cells} "
            f"{best_loop / times['vmap+compile']:>20.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
