"""Train 32 MLPs on scikit-learn's digits at once, one per group-lasso strength.

Each member is pruned by proximal Adam with group lasso over the *columns* of the
first layer, i.e. over input pixels: a zeroed column is a pixel the network no longer
reads. One ``torch.compile(vmap(step))`` trains every member; the script prints a
table (prox_strength, validation loss and accuracy, sparsity, pixels kept) and writes
``lambda_sweep.png``: the regularization path and the validation curve (log scale), the
chosen strength marked.

    python examples/lambda_sweep.py            # 25-45 s on a 2-core CPU (longer if shared)
"""

from __future__ import annotations

import argparse
import functools

import torch
from sklearn.datasets import load_digits

import functorch_reg as fr


def digits(
    seed: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Train/validation split of the 8x8 digits, pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1400], order[1400:]
    return (x[train], y[train]), (x[val], y[val])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=32, help="number of strengths")
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    parser.add_argument("--output", default="lambda_sweep.png", help="where to save the plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="run the vmapped step eagerly")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, val = digits(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = fr.adam(
        lr=1e-2,
        prox=functools.partial(fr.prox.group_lasso, dim=1),  # groups = input pixels
        mask="0.weight",
    )
    result = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        optimizer,
        torch.logspace(-2, 0.2, args.members),  # 0.01 to 1.6: from all pixels to none
        train=train,
        val=val,
        hyperparameter="prox_strength",
        steps=args.steps,
        seed=args.seed,
        compile=not args.no_compile,
    )
    first_layer = result.params["0.weight"]  # (members, 64 hidden, 64 pixels)
    pixels_kept = (first_layer != 0).any(dim=1).sum(dim=1)
    print(result.table())
    print("\npixels kept per member:", pixels_kept.tolist())
    best = result.best_index
    print(
        f"chosen prox_strength {result.strengths[best].item():.3g}: val accuracy "
        f"{result.val_accuracy[best].item():.3f} reading {pixels_kept[best].item()} of 64 pixels"
    )
    result.plot(
        args.output,
        title=f"{args.members} MLPs 64-64-10 on digits, group lasso over input pixels "
        f"(proximal Adam, {args.steps} full-batch steps)",
        names={"prox_strength": "group-lasso strength"},
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
