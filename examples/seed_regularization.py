"""The three classic regularization recipes, written functionally, on a small MLP.

1. L2 added to the loss:       loss(w) + lam * sum(w**2)      (fr.penalties.l2)
2. L1 added to the loss:       loss(w) + lam * sum(|w|)       (fr.penalties.l1)
3. L2 through the optimizer:   fr.sgd(lr, weight_decay=2 * lam)

Recipes 1 and 3 are the *same* SGD trajectory: the gradient of lam * sum(w**2) is
2 * lam * w, and SGD's coupled weight_decay adds weight_decay * w to the gradient. So
weight_decay = 2 * lam, not lam / 2 as some tutorials have it (that claim is off by a
factor of four). The script prints the loss curves and the gap between 1 and 3.

    python examples/seed_regularization.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, grad

import functorch_reg as fr

Params = dict[str, torch.Tensor]


def problem(seed: int = 0) -> tuple[torch.nn.Module, Params, torch.Tensor, torch.Tensor]:
    """A 64-32-10 MLP and scikit-learn's digits (pixels scaled to [0, 1])."""
    torch.manual_seed(seed)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16, dtype=torch.float32)
    y = torch.tensor(labels)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return model, params, x, y


def train(
    recipe: str, lam: float, steps: int, lr: float = 0.5, seed: int = 0
) -> list[tuple[Params, float]]:
    """Full-batch SGD with one recipe; returns (params, data loss) after every step."""
    model, params, x, y = problem(seed)
    weights = fr.select.weights()  # no decay on biases, in every recipe

    def data_loss(params: Params) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    penalties: dict[str, Callable[[Params], torch.Tensor]] = {
        "l2_in_loss": lambda p: lam * fr.penalties.l2(p, where=weights),
        "l1_in_loss": lambda p: lam * fr.penalties.l1(p, where=weights),
    }
    if recipe in penalties:
        optimizer = fr.sgd(lr=lr)

        def objective(p: Params) -> torch.Tensor:
            return data_loss(p) + penalties[recipe](p)

    elif recipe == "weight_decay":
        optimizer = fr.sgd(lr=lr, weight_decay=2 * lam, mask=weights)
        objective = data_loss
    else:
        raise ValueError(f"unknown recipe {recipe!r}")

    state = optimizer.init(params)
    trajectory = []
    for _ in range(steps):
        params, state = optimizer.step(params, grad(objective)(params), state)
        trajectory.append((params, data_loss(params).item()))
    return trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    recipes = ("l2_in_loss", "l1_in_loss", "weight_decay")
    runs = {recipe: train(recipe, args.lam, args.steps) for recipe in recipes}
    print(f"data loss (cross-entropy) by step, lam = {args.lam}")
    print(f"{'step':>5}  " + "  ".join(f"{recipe:>12}" for recipe in recipes))
    for step in [0, *range(args.steps // 10 - 1, args.steps, args.steps // 10)]:
        losses = "  ".join(f"{runs[recipe][step][1]:>12.5f}" for recipe in recipes)
        print(f"{step + 1:>5}  {losses}")
    gap = max(
        (a[name] - b[name]).abs().max().item()
        for (a, _), (b, _) in zip(runs["l2_in_loss"], runs["weight_decay"], strict=True)
        for name in a
    )
    print(f"\nmax |w_l2_in_loss - w_weight_decay| over all steps: {gap:.2e}")
    print("SGD weight_decay = 2 * lam follows lam * sum(w**2) in the loss step for step.")


if __name__ == "__main__":
    main()
