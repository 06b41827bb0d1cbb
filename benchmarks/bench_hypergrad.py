"""What an implicit hypergradient costs, in gradient evaluations.

An MLP 784-1024-256-10 (1.07M parameters, ReLU), batch 256 of random inputs and labels,
cross-entropy plus one L2 strength per weight matrix (3 strengths). Cases, eager:

* ``grad``: one ``torch.func.grad`` of the training loss (the unit);
* ``hvp vjp``: one Hessian-vector product, ``torch.func.vjp`` of the gradient, graph
  building included (``implicit`` builds it once and reuses it for every product);
* ``hvp jvp``: the same product by ``torch.func.jvp`` of the gradient (forward over
  reverse), for comparison;
* ``implicit k``: ``fr.hypergrad.implicit(..., maxiter=k, tol=0)``: the gradient and its
  VJP graph, the validation gradient, ``k`` CG iterations (one Hessian-vector product
  each), one more product for the residual, and the VJP onto the strengths.

At these untrained parameters the Hessian is indefinite: without damping CG stops at
negative curvature after one or two products. ``--damping`` (default 1.0) makes it
positive definite; CG may then converge before ``k``. The script counts the
Hessian-vector products each ``implicit k`` really ran and prints the marginal cost of
one CG iteration, from the smallest and the largest ``k``, and projects the cost of 20
iterations from it. Times are medians of
``torch.utils.benchmark`` blocks in interleaved rounds; the ratio is the median per-round
ratio to ``grad``. The target: ``implicit 20`` at most 20x ``grad``.

    python benchmarks/bench_hypergrad.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from timing import add_common_arguments, interleaved_times, median_ratio, print_header, setup
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.functional import cross_entropy

import functorch_reg as fr

LAYERS = ("0.weight", "2.weight", "4.weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, rounds=3, min_run_time=1.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--maxiter", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--damping", type=float, default=1.0)
    args = parser.parse_args()
    setup(args)
    device = args.device
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    size = sum(p.numel() for p in params.values())
    x, y = torch.randn(args.batch, 784, device=device), torch.randint(10, (args.batch,))
    x_val, y_val = torch.randn(args.batch, 784, device=device), torch.randint(10, (args.batch,))
    y, y_val = y.to(device), y_val.to(device)
    strengths = torch.full((3,), 1e-3, device=device)

    def train_loss(p: dict, lam: torch.Tensor) -> torch.Tensor:
        penalties = torch.stack([fr.penalties.l2(p, where=name) for name in LAYERS])
        return cross_entropy(functional_call(model, p, (x,)), y) + lam @ penalties

    def val_loss(p: dict) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (x_val,)), y_val)

    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def gradient(p: dict) -> dict:
        return grad(train_loss)(p, strengths)

    def hvp_vjp() -> object:
        _, product = vjp(gradient, params)
        return product(direction)

    def hvp_jvp() -> object:
        return jvp(gradient, (params,), (direction,))[1]

    def implicit(maxiter: int):
        def run() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # untrained params, unconverged CG: expected
                return fr.hypergrad.implicit(
                    train_loss,
                    val_loss,
                    params,
                    strengths,
                    maxiter=maxiter,
                    tol=0.0,
                    damping=args.damping,
                )

        return run

    cases = {
        "grad": lambda: grad(train_loss)(params, strengths),
        "hvp vjp": hvp_vjp,
        "hvp jvp": hvp_jvp,
    }
    for k in args.maxiter:
        cases[f"implicit {k}"] = implicit(k)
    print_header(
        f"implicit hypergradient vs one gradient, MLP with {size / 1e6:.2f}M params", device
    )
    times = interleaved_times(cases, args.rounds, args.min_run_time)
    print(f"{'case':<14}{'ms':>10}{'x grad':>9}")
    for name, values in times.items():
        ratio = median_ratio(values, times["grad"])
        print(f"{name:<14}{1e3 * statistics.median(values):>10.2f}{ratio:>9.2f}")
    counted = {
        k: counted_products(train_loss, val_loss, params, strengths, k, args.damping)
        for k in args.maxiter
    }
    for k, (products, residual) in counted.items():
        print(
            f"# implicit {k}: {products} Hessian-vector products, relative residual {residual:.2e}"
        )
    low, high = min(args.maxiter), max(args.maxiter)
    extra = counted[high][0] - counted[low][0]
    if extra > 0:
        per_product = statistics.median(
            (a - b) / g / extra
            for a, b, g in zip(
                times[f"implicit {high}"], times[f"implicit {low}"], times["grad"], strict=True
            )
        )
        base = median_ratio(times[f"implicit {low}"], times["grad"])
        projected = base + (21 - counted[low][0]) * per_product
        print(f"# one CG iteration (marginal, implicit {low} to {high}): {per_product:.2f}x grad")
        print(f"# projected implicit with 20 CG iterations (21 products): {projected:.1f}x grad")


def norm(leaves) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in leaves]))


def counted_products(train_loss, val_loss, params, strengths, maxiter: int, damping: float):
    """Hessian-vector products that ``implicit`` runs (CG and the residual check), counted
    by passing it a solver that wraps the library's CG."""
    calls = 0
    residuals = []

    def counting_cg(matvec, rhs):
        def product(x):
            nonlocal calls
            calls += 1
            return matvec(x)

        tolerance = 64 * torch.finfo(rhs[0].dtype).eps  # implicit's floor at tol=0
        u = fr.hypergrad.cg(product, rhs, maxiter=maxiter, tol=tolerance)
        mismatch = [a - b for a, b in zip(matvec(u), rhs, strict=True)]  # implicit's check
        residuals.append(norm(mismatch) / norm(rhs))
        return u

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained params, unconverged CG: expected
        fr.hypergrad.implicit(
            train_loss,
            val_loss,
            params,
            strengths,
            solver=counting_cg,
            tol=0.0,
            damping=damping,
            stationary_tol=float("inf"),
        )
    return calls + 1, residuals[0].item()  # + the residual check


if __name__ == "__main__":
    main()
