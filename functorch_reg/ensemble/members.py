"""K members of one model: their parameters, buffers and randomness, and one step of all.

A sweep or an ensemble trains ``K`` members of one ``nn.Module`` at once. This module
holds what that takes beyond the update rule: :class:`ModelParts` splits the module into
trainable parameters (stacked per member), frozen parameters (shared constants, never
updated) and buffers (BatchNorm running statistics: stacked per member and updated by
each member's own forward, as ``model.train()`` would); :func:`init_ensemble` draws
independent members; :func:`member_step` is one member's step vmapped over the members,
with vmap's ``randomness`` and optional per-member sample weights or rows (folds);
:func:`ensemble_step` is that step for loops of one's own.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .._checks import check_positive_int
from ..flat import FlatParams
from ..modules import split_module, unwrap
from ..optim import Optimizer
from ..tree import Params, flatten, is_float, stack

__all__ = [
    "ModelParts",
    "Randomness",
    "ensemble_step",
    "init_ensemble",
    "member_step",
    "model_parts",
]

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


def model_parts(model: nn.Module, caller: str = "model_parts") -> ModelParts:
    """Split ``model`` (:func:`~functorch_reg.modules.split_module`), unwrapping a compiled one.

    Args:
        model: the module; read, never changed.
        caller: the name that errors start with.

    Raises:
        ValueError: the model has no trainable parameter.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> parts = fr.ensemble.model_parts(torch.nn.BatchNorm1d(3))
        >>> sorted(parts.params), sorted(parts.buffers)
        (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
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


def check_strength_target(
    optimizer: Optimizer, penalty: Callable[[Params], Tensor] | None, hyperparameter: str | None
) -> None:
    """Exactly one of ``penalty`` and ``hyperparameter``, the latter a scalar of ``optimizer``."""
    if (penalty is None) == (hyperparameter is None):
        raise ValueError("give exactly one of penalty= or hyperparameter=")
    scalars = sorted(set(optimizer.hyperparams) - {"betas"})
    if hyperparameter is not None and hyperparameter not in scalars:
        raise ValueError(
            f"hyperparameter={hyperparameter!r} is not a scalar hyperparameter of the "
            f"optimizer; choose from {scalars}"
        )


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


def init_ensemble(
    model: nn.Module, n: int, seed: int = 0, *, positions: Tensor | Sequence[int] | None = None
) -> Params:
    """Parameters of ``n`` independently initialized copies of ``model``, stacked.

    Each member is ``model`` re-initialized by its modules' ``reset_parameters()``
    under a seed drawn from ``seed``, so the ensemble is reproducible and ``model``
    itself is left untouched. The member at position ``i`` of a grid gets the ``i``-th
    seed drawn, so a slice of a grid (``positions``, e.g. a rank's
    :func:`~functorch_reg.distributed.shard_grid` indices) gets the members it has in
    the whole grid.

    Args:
        model: the architecture; its modules' ``reset_parameters()`` (if any) draw the
            members' values. ``model`` is deep-copied, never changed.
        n: the number of members, a positive int.
        seed: an int; the same seed gives the same members.
        positions: the members' positions in a larger grid, ``n`` non-negative ints
            (default ``range(n)``).

    Returns:
        A dict from the names of ``model.named_parameters()`` to detached tensors of
        shape ``(n, *param.shape)`` and the parameters' dtypes and devices.

    Raises:
        ValueError: ``n`` is not a positive int; ``positions`` is not ``n``
            non-negative ints.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> members = fr.init_ensemble(torch.nn.Linear(3, 2), n=4, seed=0)
        >>> members["weight"].shape
        torch.Size([4, 2, 3])
    """
    check_positive_int("init_ensemble", "n", n)
    where = torch.arange(n) if positions is None else torch.as_tensor(positions).long().cpu()
    if where.shape != (n,) or (where < 0).any():
        raise ValueError(f"init_ensemble: positions must be {n} non-negative ints, got {where}")
    # Draws are prefix-stable: the first m of n draws are the m draws of a shorter grid.
    generator = torch.Generator().manual_seed(seed)
    member_seeds = torch.randint(2**62, (int(where.max()) + 1,), generator=generator)[where]
    members = []
    for member_seed in member_seeds.tolist():
        replica = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed)
            for module in replica.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        members.append({name: p.detach() for name, p in replica.named_parameters()})
    return stack(members)


def stacked(tree: Params, count: int) -> Params:
    """``count`` copies of ``tree`` stacked along a new leading dim (new memory)."""
    return optree.tree_map(lambda t: t.unsqueeze(0).repeat(count, *[1] * t.ndim), tree)


def repeat_members(members: Params, times: int) -> Params:
    """Each member ``times`` times in a row (its folds), stacked."""
    return optree.tree_map(lambda t: t.repeat_interleave(times, dim=0), members)


def first_member_dtype(params: Params) -> torch.dtype:
    """The dtype of the first floating-point leaf of ``params``."""
    dtype: torch.dtype = next(leaf.dtype for leaf in flatten(params)[0] if is_float(leaf))
    return dtype


def forward(parts: ModelParts, params: Params, buffers: Params, x: Tensor) -> tuple[Any, Params]:
    """The module's output on ``x``, and its buffers after the forward: copies of
    ``buffers`` that a train-mode forward updates in place (as BatchNorm does)."""
    buffers = {name: b.clone() for name, b in buffers.items()}
    # Parameters the caller trains shadow the frozen ones of the same name.
    frozen = {name: t for name, t in parts.frozen.items() if name not in params}
    return functional_call(parts.module, (params, frozen, buffers), (x,)), buffers


def member_step(
    parts: ModelParts,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    penalties: Mapping[str, Callable[[Params], Tensor]],
    *,
    samples: Samples = "shared",
    sample_losses: Callable[[Any, Tensor], Tensor] | None = None,
    flat: FlatParams | None = None,
    randomness: Randomness = "different",
) -> Callable[..., tuple[Params, Params, Any, Tensor]]:
    """One member's training step, vmapped over the members: the step that
    :func:`~functorch_reg.sweep` compiles (with fold weights or rows), for benchmarks and
    loops that need more than :func:`ensemble_step`.

    ``step(members, buffers, states, grid, x, y, extra) -> (members, buffers, states,
    losses)``. Each member takes the gradient of
    ``loss_fn(model(x), y) + sum(grid[name] * penalties[name](params))`` and one
    ``optimizer.step``, the other grid axes as per-call hyperparameters; its buffers come
    back as its forward left them. Members that hold a frozen parameter of the model get
    a ``None`` gradient for it, so the optimizer leaves it and its state exactly as they
    are.

    Args:
        parts: the model, split by :func:`model_parts`.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``, a mean over samples.
        optimizer: a functional optimizer.
        penalties: ``{axis: penalty}``; ``grid[axis]`` scales ``penalty(params)``.
        samples: ``extra`` is ``None`` (``"shared"``: every member the same batch), each
            member's sample weights ``(K, batch)`` (``"weighted"``: the weighted mean of
            ``sample_losses``, a held-out fold's samples weighing 0), or each member's
            row positions in ``x`` and ``y`` ``(K, rows)`` (``"gathered"``).
        sample_losses: ``sample_losses(outputs, targets) -> (batch,)``, for ``"weighted"``.
        flat: a :class:`~functorch_reg.flat.FlatParams`; members are then its buffers.
        randomness: vmap's ``"different"``, ``"same"`` or ``"error"``.

    Returns:
        The vmapped step: ``members``, ``buffers``, ``states`` and every ``grid`` value
        stacked with leading dim ``K``; ``x``, ``y`` one batch; ``losses`` of shape
        ``(K,)``, unregularized.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> net, opt = torch.nn.Linear(3, 1), fr.sgd(lr=0.1)
        >>> step = fr.ensemble.member_step(fr.ensemble.model_parts(net),
        ...     torch.nn.functional.mse_loss, opt, {"penalty": fr.penalties.l2})
        >>> members = fr.init_ensemble(net, n=2)
        >>> states = fr.stack([opt.init(m) for m in fr.unstack(members)])
        >>> x, y, grid = torch.randn(8, 3), torch.randn(8, 1), {"penalty": torch.ones(2)}
        >>> members, _, states, losses = step(members, {}, states, grid, x, y, None)
        >>> losses.shape
        torch.Size([2])
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

    def one_member(
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
    return vmap(one_member, in_dims=(0, 0, 0, 0, None, None, extra_dim), randomness=randomness)


def ensemble_step(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Optimizer,
    *,
    penalty: Callable[[Params], Tensor] | None = None,
    hyperparameter: str | None = None,
    flat: FlatParams | None = None,
    randomness: Randomness = "different",
) -> Callable[..., tuple[Any, ...]]:
    """The vmapped training step that :func:`~functorch_reg.sweep` compiles, for loops of
    your own.

    ``step(members, states, strengths, x, y) -> (members, states, losses)`` takes stacked
    parameters and optimizer states (leading dim ``K``), one strength per member and a
    batch shared by all members; ``losses`` are the members' unregularized losses.

    A model with buffers that its forward updates (BatchNorm in train mode) needs each
    member's buffers: ``step(members, states, strengths, x, y, buffers=buffers) ->
    (members, states, losses, buffers)``, with ``buffers`` stacked like ``members``
    (e.g. ``fr.stack([dict(model.named_buffers())] * K)``); each member's come back
    updated by its own forward, as ``model.train()`` updates the module's. Without
    ``buffers=``, the module's own buffers are used as constants (eval mode).

    Parameters with ``requires_grad=False`` stay as they are: left out of ``members``
    (``fr.split_module(model)[0]`` holds the trainable ones), the model's own are used;
    given in ``members``, they get no gradient, so the optimizer never updates or
    decays them. Random operations (dropout) follow vmap's ``randomness``.

    With ``flat=fr.flat.pack(params, ...)``, ``members`` are stacked buffers
    (``[K, n]`` per group, e.g. ``fr.stack([flat.pack_like(m) for m in trees])``), the
    model and ``penalty`` see their leaf views, and one kernel per group updates every
    member. Compile the returned function (``torch.compile(step, fullgraph=True)``), not
    the other way round.

    Args:
        model: the architecture (a ``torch.compile``d module is unwrapped).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``; ``outputs`` is what the
            model returns (a tensor, a dict, a tuple, a ``ModelOutput``).
        optimizer: a functional optimizer.
        penalty: ``penalty(params) -> 0-d tensor``, scaled by each member's strength.
        hyperparameter: the optimizer hyperparameter the strengths set instead.
        flat: a flat layout of the trainable parameters (none frozen).
        randomness: vmap's ``"different"`` (each member its own dropout masks),
            ``"same"`` or ``"error"``.

    Returns:
        ``step(members, states, strengths, x, y, buffers=None)``: ``strengths`` of shape
        ``(K,)`` (absolute, the multiplier of ``penalty`` or the hyperparameter's
        value); ``x``, ``y`` one batch shared by the members; ``losses`` of shape
        ``(K,)``, each the mean over the batch as ``loss_fn`` returns it.

    Raises:
        ValueError: not exactly one of ``penalty`` and ``hyperparameter``;
            ``hyperparameter`` is not a scalar hyperparameter of ``optimizer``;
            ``randomness`` is not ``"different"``, ``"same"`` or ``"error"``; ``flat``
            holds frozen parameters; at a call, buffers missing for a model with
            BatchNorm in train mode (naming the modules).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> net, opt = torch.nn.Linear(3, 1), fr.sgd(lr=0.1)
        >>> step = fr.ensemble_step(net, torch.nn.functional.mse_loss, opt,
        ...                         penalty=fr.penalties.l2)
        >>> members = fr.init_ensemble(net, n=2)
        >>> states = fr.stack([opt.init(m) for m in fr.unstack(members)])
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> members, states, losses = step(members, states, torch.tensor([0.0, 1.0]), x, y)
        >>> losses.shape, members["weight"].shape
        (torch.Size([2]), torch.Size([2, 1, 3]))
    """
    check_strength_target(optimizer, penalty, hyperparameter)
    check_randomness(randomness, "ensemble_step")
    parts = model_parts(model, "ensemble_step")
    if flat is not None:
        frozen = sorted(set(flat.params) & set(parts.frozen))
        if frozen:
            raise ValueError(
                f"ensemble_step: the flat layout holds frozen parameters {frozen} "
                "(requires_grad=False), which a flat buffer would train; pack "
                "fr.split_module(model)[0] instead"
            )
    axis = "penalty" if hyperparameter is None else hyperparameter
    vmapped = member_step(
        parts,
        loss_fn,
        optimizer,
        {} if penalty is None else {"penalty": penalty},
        flat=flat,
        randomness=randomness,
    )
    mixing = parts.batch_norms_in_training() if parts.buffers else []

    def step(
        members: Params,
        states: Any,
        strengths: Tensor,
        x: Tensor,
        y: Tensor,
        buffers: Params | None = None,
    ) -> tuple[Any, ...]:
        if buffers is None:
            if mixing:
                raise ValueError(
                    f"ensemble_step: {mixing} in train mode update their buffers; pass each "
                    "member's, step(..., buffers=fr.stack([dict(model.named_buffers())] * K)), "
                    "or call model.eval()"
                )
            members, _, states, losses = vmapped(members, {}, states, {axis: strengths}, x, y, None)
            return members, states, losses
        members, buffers, states, losses = vmapped(
            members, buffers, states, {axis: strengths}, x, y, None
        )
        return members, states, losses, buffers

    return step
