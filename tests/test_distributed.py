"""torch.distributed: the functional step under DDP and FSDP2, penalties, prox and
update rules on DTensors, and a lambda sweep split across ranks.

The 2-process scenarios all run in one start of 2 gloo processes on the CPU (starting
them costs more than everything they do), and each test compares what every rank
computed with a single-process run in the test process.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import functorch_reg as fr
from functorch_reg.distributed import gather_grid, shard_grid
from functorch_reg.tree import full_tensor, is_dtensor

from .conftest import mlp_params

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    pytest.mark.timeout(240),
]

WORLD_SIZE = 2
STEPS = 8


def run_on_ranks(scenario: Callable[[int], Any], directory: Path) -> list[Any]:
    """What ``scenario(rank)`` returns on each of ``WORLD_SIZE`` gloo processes, by rank."""
    context = mp.spawn(_worker, args=(scenario, str(directory)), nprocs=WORLD_SIZE, join=False)
    try:
        while not context.join():
            pass
    finally:
        # After a failure or a timeout here, the other rank may wait in a collective.
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _worker(rank: int, scenario: Callable[[int], Any], directory: str) -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    # A file store rather than a TCP port: no free port to find, none to race for.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(scenario(rank), f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def all_scenarios(rank: int) -> dict[str, Any]:
    return {
        "ddp": ddp_scenario(rank),
        "ddp_flat": ddp_flat_scenario(rank),
        "fsdp": fsdp_scenario(rank),
        "dtensor": dtensor_scenario(rank),
        "sweep": sweep_scenario(rank),
        "checkpoint": checkpoint_scenario(rank),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario's results, from each of the two ranks."""
    return run_on_ranks(all_scenarios, tmp_path_factory.mktemp("ranks"))


def cpu_mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD_SIZE,))


def full(tree: Any) -> Any:
    """``tree`` with every DTensor leaf replaced by its global value, all detached."""
    return optree.tree_map(lambda leaf: full_tensor(leaf.detach()), tree)


# --- DDP and FSDP2 training: loss.backward(), then the functional step ---------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 0.weight is 6x4 and 2.weight 3x6: orthogonal() takes the Gram matrix on both
    # sides, and 3 rows split unevenly over 2 ranks.
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    return x, torch.randn(16, 3, generator=generator, dtype=torch.float64)


def rank_batch(rank: int) -> tuple[Tensor, Tensor]:
    """Equal halves: averaging the ranks' mean-loss gradients gives the full batch's."""
    x, y = make_data()
    size = len(x) // WORLD_SIZE
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    x: Tensor,
    y: Tensor,
    optimizer: fr.Optimizer,
    penalty: Callable[[dict[str, Tensor]], Tensor],
    pure: bool = False,
) -> dict[str, Any]:
    """``STEPS`` steps on ``mse + penalty``; ``params`` are ``model``'s, trained in place."""
    state = optimizer.init(params)
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y) + penalty(params)
        loss.backward()
        grads = {name: p.grad for name, p in params.items()}
        if pure:
            detached = {name: p.detach() for name, p in params.items()}
            new_params, state = optimizer.step(detached, grads, state)
            with torch.no_grad():
                for name, p in params.items():
                    assert is_dtensor(new_params[name]) == is_dtensor(p)
                    p.copy_(new_params[name])
        else:
            optimizer.step_(params, grads, state)
        for p in params.values():
            p.grad = None
    return full({"params": params, "state": fr.state_dict(state)})


def ddp_penalty(params: dict[str, Tensor]) -> Tensor:
    return 1e-2 * fr.penalties.group_lasso(params, where=fr.select.weights())


def ddp_optimizer() -> fr.Optimizer:
    return fr.adamw(
        lr=2e-2, weight_decay=0.1, mask=fr.select.weights(), prox=fr.prox.l1, prox_strength=2.0
    )


def ddp_scenario(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    params = dict(model.named_parameters())
    return train(
        DistributedDataParallel(model), params, *rank_batch(rank), ddp_optimizer(), ddp_penalty
    )


@pytest.mark.slow
def test_ddp_matches_single_process_full_batch(ranks):
    model = make_model()
    expected = train(
        model, dict(model.named_parameters()), *make_data(), ddp_optimizer(), ddp_penalty
    )
    assert (expected["params"]["0.weight"] == 0).any(), "the prox should give exact zeros"
    for result in ranks:
        torch.testing.assert_close(result["ddp"], expected, rtol=1e-10, atol=1e-12)


def ddp_flat_optimizer(model: nn.Module, flat: bool) -> fr.TorchOptimizer:
    return fr.TorchOptimizer(model.parameters(), fr.adamw(lr=2e-2, weight_decay=0.1), flat=flat)


def ddp_flat_scenario(rank: int) -> dict[str, Any]:
    """TorchOptimizer(flat=True) behind DDP (gradient_as_bucket_view=False, the default)."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    optimizer = ddp_flat_optimizer(model, flat=True)
    x, y = rank_batch(rank)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
    grads = optimizer._groups[0].grads
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        # DDP copied its reduced buckets into the views instead of replacing them.
        "grads_are_views": all(
            p.grad.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr()
            for p in model.parameters()
        ),
    }


@pytest.mark.slow
def test_flat_torch_optimizer_under_ddp_matches_single_process_full_batch(ranks):
    model = make_model()
    optimizer = ddp_flat_optimizer(model, flat=False)
    x, y = make_data()
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for result in ranks:
        assert result["ddp_flat"]["grads_are_views"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["ddp_flat"]["params"][name], p.detach())


def fsdp_penalty(params: dict[str, Tensor]) -> Tensor:
    weights = fr.select.weights()
    return (
        1e-2 * fr.penalties.group_lasso(params, 0, where=weights)
        + 1e-2 * fr.penalties.group_lasso(params, 1, where=weights)
        + 1e-2 * fr.penalties.orthogonal(params)
        + 1e-3 * fr.penalties.l1(params)
        + 1e-3 * fr.penalties.l2(params)
    )


FSDP_RUNS = {
    # name: (optimizer, pure step instead of step_)
    "adamw_amsgrad_group_prox_dim1": (
        lambda: fr.adamw(
            lr=2e-2,
            amsgrad=True,
            weight_decay=0.1,
            mask=fr.select.weights(),
            prox=functools.partial(fr.prox.group_lasso, dim=1),
            prox_strength=0.5,
        ),
        False,
    ),
    "sgd_nesterov_l1_prox_pure": (
        lambda: fr.sgd(
            lr=5e-2,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-2,
            prox=fr.prox.l1,
            prox_strength=0.2,
            skip_nonfinite=True,
        ),
        True,
    ),
}


def fsdp_scenario(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    mesh = cpu_mesh()
    results = {}
    for name, (make_optimizer, pure) in FSDP_RUNS.items():
        model = make_model()
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        params = dict(model.named_parameters())
        assert all(is_dtensor(p) for p in params.values())
        results[name] = train(
            model, params, *rank_batch(rank), make_optimizer(), fsdp_penalty, pure
        )
    return results


def test_fsdp2_matches_single_process_full_batch(ranks):
    for name, (make_optimizer, pure) in FSDP_RUNS.items():
        model = make_model()
        params = dict(model.named_parameters())
        expected = train(model, params, *make_data(), make_optimizer(), fsdp_penalty, pure)
        for result in ranks:
            torch.testing.assert_close(result["fsdp"][name], expected, rtol=1e-10, atol=1e-12)


# --- Penalties, prox and update rules on DTensor leaves (sharded on dim 0) -----------

PENALTIES = {
    "l1": fr.penalties.l1,
    "l2": fr.penalties.l2,
    "elastic_net": lambda p: fr.penalties.elastic_net(p, 0.3),
    "group_lasso_dim0": lambda p: fr.penalties.group_lasso(p, 0),
    # Groups across the sharded dim: each group's norm spans both ranks.
    "group_lasso_dim1": lambda p: fr.penalties.group_lasso(p, 1, where=fr.select.weights()),
    "group_lasso_whole_leaf": lambda p: fr.penalties.group_lasso(p, None),
    "l2_sp": lambda p: fr.penalties.l2_sp(p, {k: 0.5 * v.detach() for k, v in p.items()}),
    "orthogonal": fr.penalties.orthogonal,
}

PROXES = {
    "l1": lambda p: fr.prox.l1(p, 0.5),
    "l1_tensor_threshold": lambda p: fr.prox.l1(p, torch.tensor(0.5)),
    "elastic_net": lambda p: fr.prox.elastic_net(p, 0.5, 0.3),
    "group_lasso_dim0": lambda p: fr.prox.group_lasso(p, 0.5, 0),
    "group_lasso_dim1": lambda p: fr.prox.group_lasso(p, 0.5, 1, where=fr.select.weights()),
    "group_lasso_whole_leaf": lambda p: fr.prox.group_lasso(p, 0.5, None),
}

OPTIMIZERS = {
    # name: (optimizer, a NaN gradient on one rank's shard at step 3)
    "adamw_amsgrad_group_prox_skip": (
        lambda: fr.adamw(
            lr=1e-2,
            amsgrad=True,
            weight_decay=0.1,
            mask=fr.select.weights(),
            prox=functools.partial(fr.prox.group_lasso, dim=1),
            prox_strength=0.5,
            skip_nonfinite=True,
        ),
        True,
    ),
    "sgd_nesterov_l1_prox_skip": (
        lambda: fr.sgd(
            lr=5e-2,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-2,
            prox=fr.prox.l1,
            prox_strength=0.1,
            skip_nonfinite=True,
        ),
        True,
    ),
    "adam_tensor_hyperparams": (
        lambda: fr.adam(lr=torch.tensor(1e-2), weight_decay=torch.tensor(1e-2)),
        False,
    ),
}


def on_leaves(shard: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """Every penalty (value and gradients), prox and optimizer trajectory of this module
    on ``shard`` applied to the leaves of ``mlp_params()``, as plain global tensors."""
    out: dict[str, Any] = {}
    for name, penalty in PENALTIES.items():
        leaves = {k: shard(v).requires_grad_() for k, v in mlp_params().items()}
        value = penalty(leaves)
        assert not is_dtensor(value)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        out[f"penalty.{name}"] = full({"value": value, "grads": list(grads)})
    for name, prox in PROXES.items():
        params = {k: shard(v) for k, v in mlp_params().items()}
        new = prox(params)
        assert all(is_dtensor(new[k]) == is_dtensor(params[k]) for k in params)
        out[f"prox.{name}"] = full(new)
    for name, (make_optimizer, with_nan) in OPTIMIZERS.items():
        optimizer = make_optimizer()
        params = {k: shard(v) for k, v in mlp_params().items()}
        state = optimizer.init(params)
        in_place = {k: shard(v) for k, v in mlp_params().items()}
        in_place_state = optimizer.init(in_place)
        for step in range(STEPS):
            generator = torch.Generator().manual_seed(step)
            grads = {k: torch.randn(v.shape, generator=generator) for k, v in mlp_params().items()}
            if with_nan and step == 3:
                grads["2.weight"][2, 0] = float("nan")  # row 2 lies on the last rank only
            grads = {k: shard(g) for k, g in grads.items()}
            params, state = optimizer.step(params, grads, state)
            optimizer.step_(in_place, grads, in_place_state)
        assert all(is_dtensor(state[0][k]) == is_dtensor(params[k]) for k in params)
        out[f"step.{name}"] = full({"params": params, "state": fr.state_dict(state)})
        out[f"step_.{name}"] = full({"params": in_place, "state": fr.state_dict(in_place_state)})
    return out


def dtensor_scenario(rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = cpu_mesh()
    return on_leaves(lambda leaf: distribute_tensor(leaf, mesh, [Shard(0)]))


@pytest.fixture(scope="module")
def unsharded_results() -> dict[str, Any]:
    return on_leaves(lambda leaf: leaf)


@pytest.mark.parametrize(
    "name",
    [f"penalty.{name}" for name in PENALTIES]
    + [f"prox.{name}" for name in PROXES]
    + [f"{step}.{name}" for name in OPTIMIZERS for step in ("step", "step_")],
)
def test_dtensor_leaves_match_unsharded(name, ranks, unsharded_results):
    for result in ranks:
        torch.testing.assert_close(result["dtensor"][name], unsharded_results[name])
    if name.startswith("step") and OPTIMIZERS[name.split(".")[1]][1]:
        # The NaN sat on one rank's shard, yet both skipped that step.
        assert unsharded_results[name]["state"]["skipped"].item() == 1


# --- A lambda sweep split across ranks ---------------------------------------------

GRID = torch.logspace(-3, 0, 5)  # 3 members on rank 0, 2 on rank 1


def run_sweep(strengths: Tensor) -> dict[str, Any]:
    """A sweep's per-member results, each with the member dim first."""
    x, y = make_data()
    result = fr.sweep(
        make_model(),
        nn.functional.mse_loss,
        fr.adam(lr=2e-2),
        strengths,
        train=(x[:12], y[:12]),
        val=(x[12:], y[12:]),
        penalty=lambda params: fr.penalties.group_lasso(params, where=fr.select.weights()),
        steps=STEPS,
        compile=False,
        progress=False,
    )
    return {
        "params": result.params,
        "train_loss": result.train_loss.T,
        "val_loss": result.val_loss,
        "val_accuracy": result.val_accuracy,
        "sparsity": result.sparsity,
        "param_norm": result.param_norm,
    }


def sweep_scenario(rank: int) -> dict[str, Any]:
    strengths, indices = shard_grid(GRID)
    return gather_grid(run_sweep(strengths), indices)


def test_sweep_split_across_ranks_matches_single_process(ranks):
    expected = run_sweep(GRID)
    for result in ranks:
        torch.testing.assert_close(result["sweep"], expected)


# --- shard_grid and gather_grid in one process ---------------------------------------


def test_independent_init_split_across_ranks_reproduces_the_full_grid():
    """Member k's initialization depends on its position k in the whole grid."""
    x, y = make_data()
    run = functools.partial(
        fr.sweep,
        make_model(),
        nn.functional.mse_loss,
        fr.sgd(lr=0.1),
        train=(x[:12], y[:12]),
        val=(x[12:], y[12:]),
        penalty=fr.penalties.l2,
        steps=2,
        init="independent",
        seed=5,
        compile=False,
        progress=False,
    )
    whole = run(GRID).params
    for rank in range(2):
        strengths, indices = shard_grid(GRID, rank, 2)
        local = run(strengths, grid_positions=indices).params
        torch.testing.assert_close(local, {k: v[indices] for k, v in whole.items()}, rtol=0, atol=0)
    assert not torch.equal(run(GRID[3:]).params["0.weight"], whole["0.weight"][3:])


@pytest.mark.parametrize(("count", "world_size"), [(5, 2), (8, 4), (3, 3), (7, 1)])
def test_shard_grid_gives_consecutive_near_equal_blocks(count, world_size):
    grid = torch.linspace(0, 1, count, dtype=torch.float64)
    slices = [shard_grid(grid, rank, world_size) for rank in range(world_size)]
    torch.testing.assert_close(torch.cat([local for local, _ in slices]), grid)
    assert torch.equal(torch.cat([indices for _, indices in slices]), torch.arange(count))
    sizes = [len(indices) for _, indices in slices]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_shard_grid_defaults_to_the_whole_grid_without_a_process_group():
    local, indices = shard_grid([0.1, 1.0])
    assert local.dtype == torch.get_default_dtype()
    assert torch.equal(indices, torch.arange(2))


def test_shard_grid_rejects_more_ranks_than_members_and_bad_ranks():
    with pytest.raises(ValueError, match="cannot give each of 3 ranks"):
        shard_grid([0.1, 1.0], rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank=2 is not in"):
        shard_grid([0.1, 1.0], rank=2, world_size=2)
    with pytest.raises(ValueError, match="leading member dim"):
        shard_grid(torch.tensor(0.1))


def test_gather_grid_puts_rows_in_grid_order_and_keeps_none():
    local = {"loss": torch.tensor([30.0, 10.0, 20.0]), "accuracy": None, "w": torch.eye(3)}
    gathered = gather_grid(local, [2, 0, 1])
    assert torch.equal(gathered["loss"], torch.tensor([10.0, 20.0, 30.0]))
    assert gathered["accuracy"] is None
    assert torch.equal(gathered["w"], torch.eye(3)[[1, 2, 0]])


def test_gather_grid_rejects_bad_indices_and_shapes():
    with pytest.raises(ValueError, match="exactly once"):
        gather_grid(torch.zeros(2), [0, 0])
    with pytest.raises(ValueError, match="leading dim"):
        gather_grid({"loss": torch.zeros(3)}, [0, 1])
    with pytest.raises(TypeError, match="not a tensor|is a float"):
        gather_grid({"loss": 1.0}, [0])


# --- A plain checkpoint resumed on sharded params ------------------------------------


def checkpoint_scenario(rank: int) -> dict[str, Any]:
    """Adam state saved by one process, loaded on params sharded over two ranks."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = cpu_mesh()
    placements = {"w": [Shard(0)], "b": [Replicate()]}
    params = {"w": torch.arange(8.0).reshape(4, 2), "b": torch.ones(3)}
    opt = fr.adam(lr=0.1)
    state = opt.init(params)
    for step in range(2):
        params, state = opt.step(params, {k: v.sin() + step for k, v in params.items()}, state)
    saved = fr.state_dict(state)
    sharded = {k: distribute_tensor(v, mesh, placements[k]) for k, v in params.items()}
    loaded = fr.load_state_dict(opt, sharded, saved)
    expected, _ = opt.step(params, {k: v.sin() for k, v in params.items()}, state)
    resumed, _ = opt.step(sharded, {k: v.sin() for k, v in sharded.items()}, loaded)
    return {
        "placements": {
            f"{field}.{name}": (fr.tree.is_dtensor(slot), str(getattr(slot, "placements", None)))
            for field in ("exp_avg", "exp_avg_sq")
            for name, slot in getattr(loaded, field).items()
        },
        "param_placements": {k: str(tuple(v)) for k, v in placements.items()},
        "resumed": {k: v.full_tensor() for k, v in resumed.items()},
        "expected": expected,
    }


def test_a_plain_checkpoint_loads_sharded_like_dtensor_params(ranks):
    for result in ranks:
        for key, (is_sharded, placements) in result["checkpoint"]["placements"].items():
            assert is_sharded, key
            assert placements == result["checkpoint"]["param_placements"][key.split(".")[1]]
        torch.testing.assert_close(
            result["checkpoint"]["resumed"], result["checkpoint"]["expected"], rtol=0, atol=0
        )
