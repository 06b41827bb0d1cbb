"""A group-lasso sweep on scikit-learn's digits, its grid of strengths split across ranks.

Each rank trains its slice of the grid with one vmapped step (``fr.sweep``), the
per-member results are gathered back in grid order, and rank 0 prints the table of
the whole grid: the same table a single process sweeping every strength prints. As
in ``lambda_sweep.py``, proximal Adam zeroes whole columns of the first layer, i.e.
input pixels the network stops reading.

    torchrun --nproc-per-node 2 examples/distributed_sweep.py --no-compile  # 15-30 s, 2-core CPU
    python examples/distributed_sweep.py --no-compile                       # one process

Gloo on CPU; NCCL with one GPU per rank when CUDA is available.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import functorch_reg as fr
from functorch_reg.distributed import gather_grid, shard_grid


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
    parser.add_argument("--members", type=int, default=8, help="strengths in the whole grid")
    parser.add_argument("--steps", type=int, default=200, help="full-batch Adam steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="run the vmapped step eagerly")
    args = parser.parse_args()

    device = torch.device("cpu")
    if "RANK" in os.environ:  # started by torchrun
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)  # all_gather_object over NCCL needs it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    # Every rank builds the same grid, data and initial model.
    grid = torch.logspace(-3, 1, args.members)
    strengths, indices = shard_grid(grid)
    torch.manual_seed(args.seed)
    train, val = digits(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(device)
    print(f"rank {rank}: strengths {[round(s, 4) for s in strengths.tolist()]}", flush=True)
    local = fr.sweep(
        model,
        torch.nn.functional.cross_entropy,
        fr.adam(
            lr=1e-2,
            prox=functools.partial(fr.prox.group_lasso, dim=1),  # groups = input pixels
            mask="0.weight",
        ),
        strengths,
        train=train,
        val=val,
        hyperparameter="prox_strength",
        steps=args.steps,
        seed=args.seed,
        compile=not args.no_compile,
        progress=rank == 0,
    )
    # gather_grid wants the member dim first; train_loss has it second.
    merged = gather_grid(
        {
            "params": local.params,
            "train_loss": local.train_loss.T,
            "val_loss": local.val_loss,
            "val_accuracy": local.val_accuracy,
            "sparsity": local.sparsity,
            "param_norm": local.param_norm,
        },
        indices,
    )
    result = fr.SweepResult(
        strengths=grid,
        grid={"prox_strength": grid},  # the table names the strength as fr.sweep's does
        **{**merged, "train_loss": merged["train_loss"].T},
    )
    if rank == 0:
        pixels_kept = (result.params["0.weight"] != 0).any(dim=1).sum(dim=1)
        print(result.table())
        print("\npixels kept per member:", pixels_kept.tolist())
        best = result.best_index
        accuracy = result.val_accuracy[best].item()
        print(
            f"chosen prox_strength {grid[best].item():.3g}: val accuracy {accuracy:.3f} "
            f"reading {pixels_kept[best].item()} of 64 pixels"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
