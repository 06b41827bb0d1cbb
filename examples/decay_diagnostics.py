"""What weight decay does to each layer of a small CNN, under two decay settings.

A conv without bias followed by BatchNorm is scale-invariant: its gradient is orthogonal
to it, and weight decay only sets how fast its direction turns. With AdamW the angular
update per step settles at sqrt(2 lr wd (1 - beta1) / (1 + beta1)) (Kosson et al.,
arXiv 2305.17212) once training has run for a few decay timescales 1 / (lr wd). Two
settings on scikit-learn's digits, logged every few steps with
``TorchOptimizer.step_and_report``:

* ``weight_decay=1e-2``: a timescale of 10,000 steps, far longer than the run: the norms
  barely move and the rotation is set by the initial norms, not the decay;
* ``decay_timescale=60`` (steps): the same lr, a decay that equilibrates within the run:
  the conv layers' measured rotation meets the prediction, the head's (not scale-
  invariant, cos(grad, w) far from 0) does not have to.

Run ``python examples/decay_diagnostics.py --output decay.png`` (25 s of CPU time; longer if
the CPU is shared).
"""

from __future__ import annotations

import argparse

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import nn

import functorch_reg as fr


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def train(setting: dict, steps: int, every: int) -> tuple[list[int], list[dict]]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    model = cnn()
    # Decay on conv and linear weights, not on BatchNorm and biases.
    functional = fr.adamw(lr=1e-2, mask=fr.select.weights(), **setting)
    opt = fr.TorchOptimizer(model.named_parameters(), functional)
    generator = torch.Generator().manual_seed(0)
    logged_steps, history = [], []
    for step in range(steps):
        index = torch.randint(0, len(y), (64,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        if step % every == 0:
            report = fr.diagnostics.rows(opt.step_and_report())
            history.append(
                {k: v for k, v in report.items() if k in ("0.weight", "3.weight", "8.weight")}
            )
            logged_steps.append(step)
        else:
            opt.step()
    return logged_steps, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--output", default=None, help="save the figure here (png)")
    args = parser.parse_args()
    settings = {
        "weight_decay=1e-2": {"weight_decay": 1e-2},
        "decay_timescale=60": {"decay_timescale": 60.0},
    }
    runs = {label: train(setting, args.steps, args.every) for label, setting in settings.items()}
    layers = ["0.weight", "3.weight", "8.weight"]  # conv, conv (before BatchNorm), head
    figure = Figure(figsize=(10, 2.4 * len(layers)))
    axes = figure.subplots(len(layers), len(runs), squeeze=False, sharex=True)
    for column, (label, (steps, history)) in enumerate(runs.items()):
        axes[0][column].set_title(f"AdamW lr=1e-2, {label}")
        for row, layer in enumerate(layers):
            axis = axes[row][column]
            axis.plot(steps, [h[layer]["angular_update"] for h in history], label="measured")
            predicted = [h[layer]["predicted_angular_update"] for h in history]
            axis.plot(steps, predicted, "--", label="equilibrium sqrt(2 lr wd (1-b1)/(1+b1))")
            axis.set_ylabel(f"{layer}\nrad / step", fontsize=8)
            axis.set_yscale("log")
        axes[-1][column].set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    if args.output:
        figure.savefig(args.output, dpi=100)
        print(f"saved {args.output}")
    for label, (_, history) in runs.items():
        print(f"\n{label}: mean over the last quarter of the run")
        header = ("|w|", "measured", "predicted", "|cos(g,w)|", "timescale")
        print(f"{'layer':<10} " + " ".join(f"{h:>10}" for h in header))
        tail = history[-max(1, len(history) // 4) :]
        for layer in layers:
            mean = {k: sum(h[layer][k] for h in tail) / len(tail) for k in tail[0][layer]}
            cosine = max(abs(h[layer]["grad_cosine"]) for h in tail)
            print(
                f"{layer:<10} {mean['weight_norm']:10.3f} {mean['angular_update']:10.4f} "
                f"{mean['predicted_angular_update']:10.4f} {cosine:10.2e} {mean['timescale']:10.0f}"
            )


if __name__ == "__main__":
    main()
