"""Running a sweep's plan: batches, the progress bar, training, evaluation, metrics, refit.

:func:`run` trains every member of a :class:`~functorch_reg.ensemble.grid.SweepPlan` with
the compiled :func:`~functorch_reg.ensemble.members.member_step`; :func:`evaluate_members`
measures them (validation loss and accuracy, or the held-out folds', sparsity, norm);
:func:`refit` trains one grid point of a plan again on all the data. Nothing here checks
input: the plan was checked when it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn
from torch.func import vmap
from tqdm.auto import tqdm

from .. import sweep_data
from ..flat import FlatParams
from ..modules import Logits, logits_of
from ..tree import Params, flatten, is_float, stack, unstack
from .grid import SweepPlan
from .members import ModelParts, forward, member_step, seeded

__all__ = ["Evaluation", "evaluate_members", "refit", "run", "train"]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_members` measured, one entry per member (``K * folds``).

    Attributes:
        loss: validation loss (or held-out fold loss), ``(K * folds,)``.
        accuracy: validation accuracy, or ``None`` (no classification).
        sparsity: fraction of parameter entries exactly zero, per grid point ``(K,)``
            (the mean over folds).
        norm: Euclidean norm of all parameters, per grid point ``(K,)``.
    """

    loss: Tensor
    accuracy: Tensor | None
    sparsity: Tensor
    norm: Tensor


def run(plan: SweepPlan, progress: bool) -> tuple[Params, Params, list[Tensor]]:
    """Train every member of ``plan``: the per-leaf members, their buffers (stacked, leading
    dim ``K * folds``) and the unregularized loss of each step, ``(K * folds,)`` each."""
    folding = plan.folding
    samples: Literal["shared", "weighted", "gathered"] = (
        "shared" if folding is None else folding.samples
    )
    per_member = None if folding is None else folding.per_member
    member_grid = {axis: values.repeat_interleave(plan.folds) for axis, values in plan.grid.items()}
    trained = packed(plan.layout, plan.initial)
    states = stack([plan.optimizer.init(member) for member in unstack(trained)])
    step = member_step(
        plan.parts,
        plan.loss_fn,
        plan.optimizer,
        plan.penalties,
        samples=samples,
        sample_losses=plan.sample_losses,
        flat=plan.layout,
        randomness=plan.randomness,
    )
    if plan.compile:
        step = torch.compile(step, fullgraph=True)
    batches = member_batches(
        plan.train, plan.batch_size, plan.steps, plan.seed, plan.device, samples, per_member
    )
    with seeded(plan.seed, plan.device):
        trained, buffers, losses = train(
            step,
            trained,
            plan.initial_buffers,
            states,
            member_grid,
            batches,
            plan.steps,
            progress=progress,
            compiling=plan.compile,
            desc=f"sweep over {plan.count} x {plan.folds} members"
            if folding is not None
            else f"sweep over {plan.count} members",
        )
    return unpacked(plan.layout, trained), buffers, losses


def evaluate_members(plan: SweepPlan, members: Params, buffers: Params) -> Evaluation:
    """Evaluate the trained ``members`` of ``plan`` (stacked, ``K * folds``) in eval mode:
    on ``val``, or each on its held-out fold."""
    count, n_folds, folding = plan.count, plan.folds, plan.folding
    with torch.no_grad():
        if folding is not None:
            assert plan.train.tensors is not None
            loss, accuracy = evaluate_folds(
                plan.parts,
                plan.sample_losses,
                members,
                buffers,
                plan.train.tensors,
                folding.held_out,
                plan.device,
                plan.logits,
            )
        else:
            assert plan.val is not None
            loss, accuracy = evaluate(
                plan.parts, plan.loss_fn, members, buffers, plan.val, plan.device, plan.logits
            )
        leaves = [leaf.reshape(len(leaf), -1) for leaf in flatten(members)[0] if is_float(leaf)]
        entries = torch.cat(leaves, dim=1)
        sparsity = (entries == 0).float().mean(1).view(count, n_folds).mean(1)
        norm = entries.norm(dim=1).view(count, n_folds).mean(1)
    return Evaluation(loss, accuracy, sparsity, norm)


def refit(
    plan: SweepPlan,
    index: int,
    *,
    steps: int | None = None,
    compile: bool | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Train grid point ``index`` of ``plan`` again on all the data, as one model.

    All the data is ``train`` and ``val`` together (with folds, all of ``train``), from the
    grid point's initialization, with the plan's optimizer, batches and ``steps`` unless
    given; ``compile`` defaults to the plan's. :meth:`SweepResult.refit
    <functorch_reg.SweepResult.refit>` calls it with the chosen member.

    Returns:
        The trained model as ``model.state_dict()`` keys (params, buffers, frozen params).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> X, y = torch.randn(16, 2), torch.randn(16)
        >>> def mse(out, target):
        ...     return torch.nn.functional.mse_loss(out.squeeze(-1), target)
        >>> resolved = fr.ensemble.plan(torch.nn.Linear(2, 1), mse, fr.sgd(lr=0.1),
        ...     [0.0, 1.0], train=(X, y), val=(X, y), penalty=fr.penalties.l1, steps=3,
        ...     compile=False)
        >>> sorted(fr.ensemble.refit(resolved, 1))
        ['bias', 'weight']
    """
    compile = plan.compile if compile is None else compile
    data = (
        plan.train
        if plan.val is None
        else sweep_data.concatenated(plan.train, plan.val, plan.batch_size)
    )
    start = packed(plan.layout, stack([unstack(plan.initial)[index * plan.folds]]))
    one = {axis: values[index : index + 1] for axis, values in plan.grid.items()}
    refit_step = member_step(
        plan.parts,
        plan.loss_fn,
        plan.optimizer,
        plan.penalties,
        flat=plan.layout,
        randomness=plan.randomness,
    )
    steps = steps or plan.steps
    with seeded(plan.seed, plan.device):
        trained, buffers, _ = train(
            torch.compile(refit_step, fullgraph=True) if compile else refit_step,
            start,
            optree.tree_map(lambda t: t[:1], plan.initial_buffers),
            stack([plan.optimizer.init(unstack(start)[0])]),
            one,
            member_batches(data, plan.batch_size, steps, plan.seed, plan.device, "shared", None),
            steps,
            progress=progress,
            compiling=compile,
            desc="refit",
        )
    params, buffers = (
        optree.tree_map(lambda t: t[0], t) for t in (unpacked(plan.layout, trained), buffers)
    )
    return plan.parts.state_dict(params, buffers)


def packed(layout: FlatParams | None, members: Params) -> Params:
    """Stacked members as the trees the step trains: stacked buffers when flat."""
    if layout is None:
        return members
    return stack([layout.pack_like(member) for member in unstack(members)])


def unpacked(layout: FlatParams | None, trained: Params) -> Params:
    """The trained members per leaf (the inverse of :func:`packed`)."""
    return trained if layout is None else layout.unpack(trained)


def member_batches(
    data: sweep_data.Data,
    batch_size: int | None,
    steps: int,
    seed: int,
    device: torch.device,
    samples: str,
    per_member: Tensor | None,
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """The training steps' ``(x, y, extra)``: a shared batch (with each member's weights
    of its samples), or all of ``data`` with each member's row positions (gathered)."""
    if samples == "gathered":
        assert data.tensors is not None and per_member is not None
        x, y = (t.to(device) for t in data.tensors)
        rows = per_member.to(device)
        for positions in sweep_data.sample_batches(rows.shape[1], batch_size, steps, seed, device):
            yield x, y, rows[:, positions]
        return
    for (inputs, targets), index in sweep_data.training_batches(
        data, batch_size, steps, seed, device
    ):
        if per_member is None:
            yield inputs, targets, None
        else:
            assert index is not None  # tensor data: weights need positions
            yield inputs, targets, per_member[:, index]


def train(
    step: Callable[..., tuple[Params, Params, Any, Tensor]],
    members: Params,
    buffers: Params,
    states: Any,
    grid: dict[str, Tensor],
    batches: Iterable[tuple[Tensor, Tensor, Tensor | None]],
    steps: int,
    *,
    progress: bool,
    compiling: bool,
    desc: str,
) -> tuple[Params, Params, list[Tensor]]:
    """Run ``step`` (a :func:`~functorch_reg.ensemble.members.member_step`) over
    ``batches`` (``(x, y, extra)`` each), with a progress bar of ``steps`` that says
    "compiling" during the first step and counts from the second.

    Returns:
        The members, buffers and the list of per-step losses.

    Example:
        >>> import functorch_reg as fr
        >>> import torch
        >>> def step(members, buffers, states, grid, x, y, extra):
        ...     return members, buffers, states, torch.zeros(2)
        >>> batches = [(torch.zeros(4, 1), torch.zeros(4), None)] * 3
        >>> _, _, losses = fr.ensemble.loop.train(step, {}, {}, (), {}, batches, 3,
        ...     progress=False, compiling=False, desc="sweep")
        >>> len(losses)
        3
    """
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    if compiling:
        bar.set_postfix_str("compiling (first step)")
    for number, (x, y, extra) in enumerate(batches):
        members, buffers, states, loss = step(members, buffers, states, grid, x, y, extra)
        losses.append(loss)
        if number == 0 and compiling:
            # The rate and ETA count from here: compiling is not a step.
            bar.set_postfix_str("")
            bar.reset()
            bar.initial = bar.n = bar.last_print_n = 1
            bar.refresh()
        else:
            bar.update(1)
    bar.close()
    return members, buffers, losses


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block; each submodule's own mode after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def evaluate(
    parts: ModelParts,
    loss_fn: Callable[[Any, Tensor], Tensor],
    members: Params,
    buffers: Params,
    data: sweep_data.Data,
    device: torch.device,
    logits: Logits | Literal[False],
) -> tuple[Tensor, Tensor | None]:
    """Each member's mean loss (and accuracy, unless ``logits`` is ``False``) over all
    batches of ``data``, weighted by size, in eval mode."""
    total, loss_sum, correct = 0, None, None
    with eval_mode(parts.module):
        for x, y in data.epoch(device):

            def one(params: Params, buffers: Params, x: Tensor = x, y: Tensor = y) -> Any:
                outputs, _ = forward(parts, params, buffers, x)
                loss = loss_fn(outputs, y)
                if logits is False:
                    return loss
                return loss, (_logits(outputs, logits).argmax(-1) == y).sum(-1)

            out = vmap(one)(members, buffers)
            loss, hits = (out, None) if logits is False else out
            total += len(y)
            loss_sum = loss * len(y) if loss_sum is None else loss_sum + loss * len(y)
            if hits is not None:
                correct = hits if correct is None else correct + hits
    assert loss_sum is not None
    return loss_sum / total, None if correct is None else correct / total


def evaluate_folds(
    parts: ModelParts,
    sample_losses: Callable[[Any, Tensor], Tensor],
    members: Params,
    buffers: Params,
    data: tuple[Tensor, Tensor],
    held_out: Tensor,
    device: torch.device,
    logits: Logits | Literal[False],
) -> tuple[Tensor, Tensor | None]:
    """Each member's mean loss (and accuracy) over its held-out samples, in eval mode,
    where a sample's output depends on that sample alone."""
    x, y = (t.to(device) for t in data)

    def one(params: Params, buffers: Params) -> Any:
        outputs, _ = forward(parts, params, buffers, x)
        losses = sample_losses(outputs, y)
        if logits is False:
            return losses
        return losses, _logits(outputs, logits).argmax(-1) == y

    with eval_mode(parts.module):
        out = vmap(one)(members, buffers)
    losses, hits = (out, None) if logits is False else out
    count = held_out.sum(1)
    loss = (losses * held_out).sum(1) / count
    accuracy = None if hits is None else (hits * held_out).sum(1) / count
    return loss, accuracy


def _logits(outputs: Any, where: Logits) -> Tensor:
    found = logits_of(outputs, where)
    assert found is not None  # the probe found them
    return found
