"""Learn one L2 strength per layer by hypergradient, against a 16-point grid sweep.

An MLP on scikit-learn's digits (a small training set, so that regularization
matters) gets one L2 strength per weight matrix. ``fr.hypergrad.tune`` trains it once,
stepping the three strengths along the implicit hypergradient of the validation loss
every few training steps. The baseline trains 16 members at once with ``fr.sweep``, one
per value of a single shared strength, each for as many steps as the tuned run, and
keeps the best. The script prints the validation loss, test accuracy and total training
steps of each; ``--output tune.png`` also draws the tuned strengths, one line per layer,
and the validation loss against training steps.

    python examples/learn_lambda.py            # 25-40 s on a 2-core CPU (longer if shared)
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call
from torch.nn.functional import cross_entropy

import functorch_reg as fr

LAYERS = ("0.weight", "2.weight", "4.weight")


def digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train (500) / validation (400) / test (the rest) split, pixels in [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:500], "val": order[500:900], "test": order[900:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="hypergradient steps")
    parser.add_argument("--steps-per-round", type=int, default=20, help="Adam steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="where to save the tuning plot (none by default)")
    args = parser.parse_args()
    steps = args.rounds * args.steps_per_round  # per grid member too: equal training length

    torch.manual_seed(args.seed)
    data = digits(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    params = {name: p.detach() for name, p in model.named_parameters()}
    optimizer = fr.adam(lr=3e-3)

    def loss_on(params: dict, part: str) -> torch.Tensor:
        x, y = data[part]
        return cross_entropy(functional_call(model, params, (x,)), y)

    def accuracy(params: dict, part: str) -> float:
        x, y = data[part]
        with torch.no_grad():
            return (functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()

    # Baseline: one shared strength, 16 values, all members trained at once.
    start = time.perf_counter()
    grid = fr.sweep(
        model,
        cross_entropy,
        optimizer,
        torch.logspace(-6, -1, 16),
        train=data["train"],
        val=data["val"],
        penalty=lambda p: fr.penalties.l2(p, where=list(LAYERS)),
        steps=steps,
        compile=False,
        progress=False,
    )
    grid_time = time.perf_counter() - start
    best = grid.best_member_params

    # Hypergradient: one strength per layer, tuned during a single training run.
    def train_loss(params: dict, strengths: torch.Tensor) -> torch.Tensor:
        penalty = sum(
            strength * fr.penalties.l2(params, where=name)
            for strength, name in zip(strengths, LAYERS, strict=True)
        )
        return loss_on(params, "train") + penalty

    start = time.perf_counter()
    tuned = fr.hypergrad.tune(
        train_loss,
        lambda p: loss_on(p, "val"),
        params,
        torch.full((len(LAYERS),), 1e-3),
        optimizer,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        hyper_lr=0.2,
        maxiter=10,
        damping=1e-2,
        progress=False,
    )
    tune_time = time.perf_counter() - start

    print(f"{'':28}{'val loss':>9}  {'test acc':>8}  {'train steps':>11}  {'seconds':>7}")
    print(
        f"{'grid, best shared strength':28}{grid.val_loss[grid.best_index].item():>9.4f}  "
        f"{accuracy(best, 'test'):>8.3f}  {16 * steps:>11}  {grid_time:>7.1f}"
    )
    print(
        f"{'hypergradient, per layer':28}{loss_on(tuned.params, 'val').item():>9.4f}  "
        f"{accuracy(tuned.params, 'test'):>8.3f}  {tuned.train_steps:>11}  {tune_time:>7.1f}"
    )
    print(f"\ngrid's best shared strength: {grid.strengths[grid.best_index].item():.3g}")
    strengths = ", ".join(f"{s:.3g}" for s in tuned.strengths.tolist())
    print(f"tuned strengths per layer ({', '.join(LAYERS)}): {strengths}")
    print(
        f"hypergradient cost: {args.rounds} implicit solves of at most 10 Hessian-vector "
        "products each"
    )
    if args.output:
        shapes = {name: tuple(params[name].shape) for name in LAYERS}  # (out, in)
        tuned.plot(
            args.output,
            title="MLP 64-64-64-10 on 500 digits: one L2 strength per layer tuned by "
            f"hypergradient ({args.rounds} rounds of {args.steps_per_round} Adam steps)",
            names=[f"{name} (Linear {shapes[name][1]}->{shapes[name][0]})" for name in LAYERS],
        )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
