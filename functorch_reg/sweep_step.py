"""Running a model's members under vmap: their parameters, buffers, randomness and metrics.

:func:`~functorch_reg.sweep` and :func:`~functorch_reg.ensemble_step` train ``K`` members
of one ``nn.Module`` at once. This module holds what that takes beyond the update rule:
:class:`ModelParts` splits the module into trainable parameters (stacked per member),
frozen parameters (shared constants, never updated) and buffers (BatchNorm running
statistics: stacked per member and updated by each member's own forward, as
``model.train()`` would); :func:`vmapped_step` is one member's step vmapped over the
members, with vmap's ``randomness``; :func:`evaluate` and :func:`evaluate_folds` run the
members in eval mode; :func:`probe` checks the model and loss on two samples without
touching the user's module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from tqdm.auto import tqdm

from . import sweep_data
from .modules import Logits, logits_of, split_module, unwrap
from .optim import Optimizer
from .tree import Params

__all__ = ["ModelParts", "Randomness", "check_randomness", "model_parts", "vmapped_step"]

Randomness = Literal["different", "same", "error"]
"""vmap's ``randomness``: each member draws its own random numbers (``"different"``),
all members draw the same ones (``"same"``), or random operations raise (``"error"``)."""

Samples = Literal["shared", "weighted", "gathered"]
"""How members see a batch: all the same ``(x, y)``; the same with per-member sample
weights (a held-out fold's samples weigh 0); or each its own rows of ``(x, y)``."""

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class ModelParts:
    """A module split for the functional paths (see :func:`model_parts`).

    Attributes:
        module: the module (unwrapped from ``torch.compile``).
        params: its trainable parameters (``requires_grad=True``), detached.
        frozen: its frozen parameters (``requires_grad=False``): constants.
        buffers: its buffers (running statistics), detached views.
        keys: ``model.state_dict()``'s keys, each with the name of its tensor here.
    """

    module: nn.Module
    params: dict[str, Tensor]
    frozen: dict[str, Tensor]
    buffers: dict[str, Tensor]
    keys: tuple[tuple[str, str], ...]

    def state_dict(self, params: Params, buffers: Params) -> dict[str, Tensor]:
        """One member as ``module.state_dict()`` keys: its ``params`` and ``buffers`` and
        the frozen parameters, for ``module.load_state_dict(..., strict=True)`` (a tied
        parameter appears under each of its names, as there)."""
        values = {**self.frozen, **dict(buffers), **dict(params)}
        return {key: values[name] for key, name in self.keys}

    def batch_norms_in_training(self) -> list[str]:
        """Modules in train mode whose output or buffers mix the samples of a batch."""
        return [
            name or type(module).__name__
            for name, module in self.module.named_modules()
            if module.training and isinstance(module, _BATCH_NORMS)
        ]


def model_parts(model: nn.Module, caller: str) -> ModelParts:
    """Split ``model`` (:func:`~functorch_reg.modules.split_module`), unwrapping a compiled one.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    module = unwrap(model)
    params, consts = split_module(module)
    if not params:
        raise ValueError(
            f"{caller}: the model has no trainable parameters (every parameter has "
            "requires_grad=False); set requires_grad_(True) on those to train"
        )
    parameter_names = {name for name, _ in module.named_parameters()}
    frozen = {name: t for name, t in consts.items() if name in parameter_names}
    buffers = {name: t for name, t in consts.items() if name not in parameter_names}
    name_of = {
        id(t): name
        for name, t in itertools.chain(
            module.named_parameters(remove_duplicate=False),
            module.named_buffers(remove_duplicate=False),
        )
        if name in params or name in frozen or name in buffers
    }
    # A tied tensor has several state_dict keys; each maps to the one name kept above.
    keys = tuple(
        (key, name_of[id(t)])
        for key, t in module.state_dict(keep_vars=True).items()
        if id(t) in name_of
    )
    return ModelParts(module, params, frozen, buffers, keys)


def check_randomness(randomness: Any, caller: str) -> None:
    if randomness not in ("different", "same", "error"):
        raise ValueError(
            f"{caller}: randomness must be 'different', 'same' or 'error' (vmap's "
            f"meaning), got {randomness!r}"
        )


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


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators of the CPU (and ``device``) seeded inside the block and
    restored after it, so that a sweep's dropout masks follow ``seed`` alone and the
    caller's random stream is left as it was."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def forward(parts: ModelParts, params: Params, buffers: Params, x: Tensor) -> tuple[Any, Params]:
    """The module's output on ``x``, and its buffers after the forward: copies of
    ``buffers`` that a train-mode forward updates in place (as BatchNorm does)."""
    buffers = {name: b.clone() for name, b in buffers.items()}
    # Parameters the caller trains shadow the frozen ones of the same name.
    frozen = {name: t for name, t in parts.frozen.items() if name not in params}
    return functional_call(parts.module, (params, frozen, buffers), (x,)), buffers


def vmapped_step(
    parts: ModelParts,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    penalties: Mapping[str, Callable[[Params], Tensor]],
    *,
    samples: Samples = "shared",
    sample_losses: Callable[[Any, Tensor], Tensor] | None = None,
    flat: Any = None,
    randomness: Randomness = "different",
) -> Callable[..., tuple[Params, Params, Any, Tensor]]:
    """``step(members, buffers, states, grid, x, y, extra) -> (members, buffers, states,
    losses)``, vmapped over the members.

    Each member takes the gradient of ``loss_fn(model(x), y) + sum(grid[name] *
    penalty(params))`` and one ``optimizer.step``, the other grid axes as per-call
    hyperparameters; its buffers come back as its forward left them. ``extra`` is
    ``None`` (``samples="shared"``), each member's sample weights (``"weighted"``, with
    ``sample_losses``), or each member's row positions in ``x`` and ``y``
    (``"gathered"``). Members that hold a frozen parameter of the model get a ``None``
    gradient for it, so the optimizer leaves it and its state exactly as they are.
    With ``flat`` (a :class:`~functorch_reg.flat.FlatParams`), members are its buffers.
    """

    def objective(
        free: Params,
        kept: Params,
        buffers: Params,
        grid: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        extra: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Params]]:
        tree = {**free, **kept} if kept else free
        params = tree if flat is None else flat.unpack(tree)
        outputs, buffers = forward(parts, params, buffers, x)
        if samples == "weighted":  # a held-out fold's samples weigh 0; a batch may miss a fold
            assert sample_losses is not None and extra is not None
            loss = (sample_losses(outputs, y) * extra).sum() / extra.sum().clamp(min=1)
        else:
            loss = loss_fn(outputs, y)
        total = loss
        for name, penalty in penalties.items():
            total = total + grid[name] * penalty(params)
        return total, (loss, buffers)

    def member_step(
        members: Params,
        buffers: Params,
        state: Any,
        grid: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        extra: Tensor | None,
    ) -> tuple[Params, Params, Any, Tensor]:
        if samples == "gathered":
            assert extra is not None
            x, y = x[extra], y[extra]
        fixed = set(parts.frozen) & set(members) if isinstance(members, Mapping) else set()
        free = {k: v for k, v in members.items() if k not in fixed} if fixed else members
        kept = {k: v for k, v in members.items() if k in fixed} if fixed else {}
        grads, (_, (loss, buffers)) = grad_and_value(objective, has_aux=True)(
            free, kept, buffers, grid, x, y, extra
        )
        if fixed:
            grads = {name: grads.get(name) for name in members}
        overrides = {axis: value for axis, value in grid.items() if axis not in penalties}
        members, state = optimizer.step(members, grads, state, **overrides)
        return members, buffers, state, loss

    extra_dim = None if samples == "shared" else 0
    return vmap(member_step, in_dims=(0, 0, 0, 0, None, None, extra_dim), randomness=randomness)


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
    """Run ``step`` over ``batches`` (``(x, y, extra)`` each), with a progress bar."""
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

            def run(params: Params, buffers: Params, x: Tensor = x, y: Tensor = y) -> Any:
                outputs, _ = forward(parts, params, buffers, x)
                loss = loss_fn(outputs, y)
                if logits is False:
                    return loss
                return loss, (_logits(outputs, logits).argmax(-1) == y).sum(-1)

            out = vmap(run)(members, buffers)
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

    def run(params: Params, buffers: Params) -> Any:
        outputs, _ = forward(parts, params, buffers, x)
        losses = sample_losses(outputs, y)
        if logits is False:
            return losses
        return losses, _logits(outputs, logits).argmax(-1) == y

    with eval_mode(parts.module):
        out = vmap(run)(members, buffers)
    losses, hits = (out, None) if logits is False else out
    count = held_out.sum(1)
    loss = (losses * held_out).sum(1) / count
    accuracy = None if hits is None else (hits * held_out).sum(1) / count
    return loss, accuracy


def _logits(outputs: Any, where: Logits) -> Tensor:
    found = logits_of(outputs, where)
    assert found is not None  # the probe found them
    return found


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` learned: whether to report accuracy, whether the forward
    updates buffers, and the model's per-sample loss (for fold weights)."""

    classification: bool
    updates_buffers: bool
    sample_losses: Callable[[Any, Tensor], Tensor]


def probe(
    parts: ModelParts,
    loss_fn: Callable[[Any, Tensor], Tensor],
    member: Params,
    data: sweep_data.Data,
    device: torch.device,
    logits: Logits,
) -> Probe:
    """Run two samples through the model (on copies of its buffers: the user's module
    is left as it was) and the loss.

    Raises:
        ValueError: ``loss_fn`` does not return a 0-d tensor, or ``logits`` names
            nothing in the model's output.
    """
    x, y = data.first_batch(device)  # starts no pass: a stream loses nothing
    with torch.no_grad():
        outputs, after = forward(parts, member, parts.buffers, x[:2])
        loss = loss_fn(outputs, y[:2])
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(f"sweep: loss_fn must return a 0-d tensor (a mean), got {loss!r}")
    try:
        found = logits_of(outputs, logits)
    except (KeyError, AttributeError, IndexError, TypeError) as error:
        raise ValueError(
            f"sweep: logits={logits!r} finds nothing in the model's output (a "
            f"{type(outputs).__name__}): {error!r}; name the attribute, key or index of "
            "the logits, or pass a callable output -> logits"
        ) from error
    classification = (
        isinstance(found, Tensor) and not y.is_floating_point() and found.ndim == 2 and y.ndim == 1
    )
    updates = any(not torch.equal(after[name], b) for name, b in parts.buffers.items())
    return Probe(classification, updates, sweep_data.per_sample(loss_fn, outputs, y[:2]))


def stacked(tree: Params, count: int) -> Params:
    """``count`` copies of ``tree`` stacked along a new leading dim (new memory)."""
    return optree.tree_map(lambda t: t.unsqueeze(0).repeat(count, *[1] * t.ndim), tree)
