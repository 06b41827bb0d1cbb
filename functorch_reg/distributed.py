"""A lambda sweep split across ranks: each rank trains a slice of the grid, and the
per-member results are gathered back in grid order on every rank.

Nothing else here is needed for ``torch.distributed``: under DDP the update rules see
plain tensors whose gradients DDP has averaged, and under FSDP2 (``fully_shard``) the
update rules, penalties and prox operators take DTensor parameters, gradients and
states as they are, with norms and Gram matrices reduced across shards.

Launched with ``torchrun --nproc-per-node 2 script.py``::

    import torch.distributed as dist
    import functorch_reg as fr
    from functorch_reg.distributed import gather_grid, shard_grid

    dist.init_process_group("gloo")
    grid = torch.logspace(-4, 0, 8)
    strengths, indices = shard_grid(grid)  # this rank's 4 strengths
    result = fr.sweep(model, loss_fn, opt, strengths, train=train, val=val, penalty=penalty,
                      grid_positions=indices)  # init="independent" as in the whole grid
    val_loss = gather_grid(result.val_loss, indices)  # all 8, in grid order, on every rank
"""

from __future__ import annotations

from collections.abc import Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from .tree import PyTree, flatten, spec_names

__all__ = ["gather_grid", "shard_grid"]


def shard_grid(
    strengths: Tensor | Sequence[float],
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's slice of a grid of strengths, and the slice's indices in the grid.

    The grid's leading dim indexes the members. The ranks get consecutive blocks in
    rank order whose sizes differ by at most one: with ``n`` members, the first
    ``n % world_size`` ranks get ``n // world_size + 1`` and the others
    ``n // world_size`` (as ``numpy.array_split``). Every rank must pass the same grid.

    Args:
        strengths: the whole grid, shape ``(n, ...)``; a sequence of floats becomes a
            1-d tensor of the default dtype.
        rank: this process's rank; by default its rank in the default process group,
            or 0 when ``torch.distributed`` is not initialized.
        world_size: the number of ranks sharing the grid; by default the size of the
            default process group, or 1 when ``torch.distributed`` is not initialized.

    Returns:
        ``(local, indices)``: ``local = strengths[indices]``, and ``indices`` the int64
        positions of this rank's members in the grid, on the grid's device; pass them
        to :func:`gather_grid`.

    Raises:
        ValueError: the grid is 0-d, has fewer members than ranks (a rank would train
            nothing), or ``rank`` is not in ``[0, world_size)``.

    Example:
        >>> local, indices = shard_grid([0.1, 0.2, 0.3, 0.4, 0.5], rank=1, world_size=2)
        >>> local, indices
        (tensor([0.4000, 0.5000]), tensor([3, 4]))
    """
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    grid = torch.as_tensor(strengths)
    if not grid.is_floating_point():
        grid = grid.to(torch.get_default_dtype())
    if grid.ndim == 0:
        raise ValueError("shard_grid: strengths must have a leading member dim, got a scalar")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_grid: rank={rank} is not in [0, world_size={world_size})")
    count = len(grid)
    if count < world_size:
        raise ValueError(
            f"shard_grid: a grid of {count} strengths cannot give each of {world_size} ranks "
            "a member; use a finer grid or fewer ranks"
        )
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    indices = torch.arange(start, start + base + (rank < extra), device=grid.device)
    return grid[indices], indices


def gather_grid(
    local: PyTree,
    indices: Tensor | Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
) -> PyTree:
    """Gather every rank's per-member results into grid order, on every rank.

    A collective: every rank of ``group`` must call it. The results travel as pickled
    CPU tensors (``all_gather_object``), so ranks may hold different numbers of
    members and any backend works; with NCCL, set the rank's CUDA device first
    (``torch.cuda.set_device``), as ``all_gather_object`` requires.

    Args:
        local: this rank's results: a tensor or a pytree of tensors, each with a
            leading dim of ``len(indices)`` whose row ``i`` belongs to grid member
            ``indices[i]``. ``None`` leaves stay ``None`` (they must be ``None`` on
            every rank).
        indices: this rank's grid positions, as :func:`shard_grid` gives them. Any
            split works as long as the ranks' indices together hold each of
            ``0, ..., n - 1`` exactly once.
        group: the process group; by default the default group. Without an
            initialized ``torch.distributed``, ``local`` alone is put in grid order.

    Returns:
        ``local``'s structure with each tensor leaf of shape ``(n, ...)``, row ``j``
        being grid member ``j``, on the device of the matching leaf of ``local``.

    Raises:
        TypeError: a leaf is neither a tensor nor ``None``.
        ValueError: a leaf's leading dim is not ``len(indices)``, the ranks' results
            differ in structure, or the indices do not cover the grid exactly once.
            Every rank raises the same error, since each checks all ranks' results.

    Example:
        >>> gather_grid({"loss": torch.tensor([3.0, 1.0, 2.0])}, torch.tensor([2, 0, 1]))
        {'loss': tensor([1., 2., 3.])}
    """
    indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
    leaves, spec = flatten(local)
    cpu_leaves = [leaf.detach().cpu() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    gathered: list = [(spec, cpu_leaves, indices)]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (spec, cpu_leaves, indices), group=group)
    # Every rank checks every rank's results, so bad input raises the same error on
    # all of them instead of leaving some waiting in their next collective.
    for rank, (rank_spec, _, _) in enumerate(gathered):
        if rank_spec != spec:
            raise ValueError(
                f"gather_grid: rank {rank}'s results have structure {rank_spec}, "
                f"this rank's have {spec}"
            )
    all_indices = torch.cat([rank_indices for _, _, rank_indices in gathered])
    if not torch.equal(all_indices.sort().values, torch.arange(len(all_indices))):
        raise ValueError(
            f"gather_grid: the ranks' indices must hold each of 0..{len(all_indices) - 1} "
            f"exactly once, got {all_indices.tolist()}"
        )
    order = all_indices.argsort()
    merged = []
    for position, name in enumerate(spec_names(spec)):
        column = [rank_leaves[position] for _, rank_leaves, _ in gathered]
        if all(part is None for part in column):
            merged.append(None)
            continue
        for rank, (part, (_, _, rank_indices)) in enumerate(zip(column, gathered, strict=True)):
            if not isinstance(part, Tensor):
                raise TypeError(
                    f"gather_grid: leaf {name!r} is a {type(part).__name__} on rank {rank}; "
                    "every rank must give a tensor there (or None on every rank)"
                )
            if part.ndim == 0 or len(part) != len(rank_indices):
                raise ValueError(
                    f"gather_grid: leaf {name!r} has shape {tuple(part.shape)} on rank {rank}, "
                    f"whose leading dim should be its {len(rank_indices)} members"
                )
        merged.append(torch.cat(column)[order].to(leaves[position].device))
    return optree.tree_unflatten(spec, merged)
