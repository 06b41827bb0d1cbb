"""Sweep a small CNN with BatchNorm and Dropout over weight decay on scikit-learn's digits.

Every member is the CNN trained by AdamW at its own ``weight_decay``, all in one vmapped
step: each member has its own BatchNorm running statistics (updated by its own batches,
as ``model.train()`` would) and draws its own dropout masks (``randomness="different"``);
validation runs in eval mode on each member's statistics. The chosen member comes back as
a state dict that ``model.load_state_dict`` takes as is, and is scored on a test split.

    python examples/cnn_sweep.py             # 66 s (`time`, 31 s of it the sweep) on a
                                             # busy 2-core CPU, eager
    python examples/cnn_sweep.py --compile   # one compiled step; compiling takes longer
                                             # than this small run saves
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import functorch_reg as fr


def digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test splits of the 8x8 digits as (N, 1, 8, 8) images in [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:1200], "val": order[1200:1500], "test": order[1500:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


def cnn() -> nn.Module:
    """Two conv blocks (conv, BatchNorm, ReLU, pool), dropout, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(16 * 2 * 2, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8, help="number of weight decays")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps of 64 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile the vmapped step")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = digits(args.seed)
    model = cnn()  # in train mode: BatchNorm uses batch statistics, dropout is on
    start = time.perf_counter()
    result = fr.sweep(
        model,
        nn.functional.cross_entropy,
        fr.adamw(lr=3e-3, mask=fr.select.weights()),
        torch.logspace(-3, 1, args.members),  # weight decay 0.001 to 10
        train=data["train"],
        val=data["val"],
        hyperparameter="weight_decay",
        steps=args.steps,
        batch_size=64,
        seed=args.seed,
        randomness="different",  # each member its own dropout masks
        select="val_accuracy",
        compile=args.compile,
        progress=False,
    )
    seconds = time.perf_counter() - start
    print(result.table())
    print(
        f"\n{args.members} members x {args.steps} steps in {seconds:.1f} s; running means of "
        f"the first BatchNorm per member: {tuple(result.buffers['1.running_mean'].shape)}"
    )
    best = copy.deepcopy(model)
    best.load_state_dict(result.best_state_dict)  # parameters and running statistics
    best.eval()
    x, y = data["test"]
    with torch.no_grad():
        accuracy = (best(x).argmax(1) == y).float().mean().item()
    print(f"chosen weight decay {result.best['weight_decay']:.3g}: test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
