"""What the benchmark scripts share: the device argument, the header, interleaved timing.

Not a benchmark itself; ``bench_step.py`` and ``bench_penalty.py`` import it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils import benchmark


class UnavailableError(Exception):
    """A case that cannot run on this device or install; the message says why."""


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int, min_run_time: float) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default)
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
    parser.add_argument(
        "--min-run-time", type=float, default=min_run_time, help="seconds per blocked_autorange"
    )


def setup(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def print_header(title: str, device: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {title}")
    print(f"# device: {device} = {device_name(device)}")
    print(
        f"# torch {torch.__version__}, Python {platform.python_version()}, {now:%Y-%m-%d %H:%M} UTC"
    )
    print(f"# command: python {' '.join(sys.argv)}")
    # OpenMP threads that spin at barriers stall for whole time slices when another
    # process holds a core: on a shared machine, PASSIVE or --threads 1 keeps times sane.
    print(f"# OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {load()}", flush=True)


def load() -> str:
    """The machine's load average: other processes' work skews CPU timings."""
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_call_seconds(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call, device work included: the compile time of a compiled fn."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def interleaved_times(
    cases: dict[str, Callable[[], object]], rounds: int, min_run_time: float
) -> dict[str, list[float]]:
    """Seconds per call of each case: one ``blocked_autorange`` median per round.

    Each round visits every case, starting one further along each time, so that the
    load of a shared or throttling machine falls on all cases alike; compare cases by
    ratios taken within a round. The ``Timer`` synchronizes CUDA around each block.
    """
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            timer = benchmark.Timer(
                stmt="fn()", globals={"fn": cases[name]}, num_threads=torch.get_num_threads()
            )
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
