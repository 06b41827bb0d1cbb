"""Data for sweeps: tensors or batch iterables, epochs of batches, and cross-validation folds.

:func:`as_data` checks what a user passes as ``train=`` / ``val=`` once, before any
training; :func:`training_batches` yields the batches of a run (re-iterating a loader per
epoch); :func:`fold_masks` turns K-fold splits into per-fold sample masks, so every
(strength, fold) member of a cross-validated sweep trains on the same shared batch with
its own weights, in one vmapped step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["Data", "as_data", "as_strengths", "fold_masks", "kfold_masks", "training_batches"]

Batch = tuple[Tensor, Tensor]

ACCEPTED = (
    "a pair of tensors (x, y) with the same leading length, a torch.utils.data.DataLoader, "
    "or any re-iterable (a list, a DataLoader) of (x, y) batches"
)


@dataclass(frozen=True)
class Data:
    """Checked sweep data: in-memory ``tensors`` or a re-iterable of ``batches``.

    Attributes:
        tensors: ``(x, y)`` when given as tensors, else ``None``.
        batches: the re-iterable of ``(x, y)`` batches, else ``None``.
        name: the argument's name, for messages.
        first: the first batch, read when the data was checked (batches only).
        resume: the check's own iterator and the batches it read, which the first
            :meth:`epoch` continues, so that checking consumes nothing (empty once used,
            or when the check read the whole pass).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> data = fr.sweep_data.as_data([(torch.zeros(2, 3), torch.zeros(2))] * 2, "train")
        >>> sum(len(x) for x, y in data.epoch(torch.device("cpu")))  # samples in a pass
        4
    """

    tensors: Batch | None
    batches: Iterable[Any] | None
    name: str
    first: Batch | None = None
    resume: list[tuple[list[Any], Iterator[Any]]] = field(
        default_factory=list, repr=False, compare=False
    )

    def first_batch(self, device: torch.device) -> Batch:
        """The first ``(x, y)`` batch on ``device``, without starting a pass."""
        batch = self.tensors if self.tensors is not None else self.first
        if batch is None:
            return next(self.epoch(device))
        return tuple(t.to(device) for t in batch)  # type: ignore[return-value]

    def epoch(self, device: torch.device) -> Iterator[Batch]:
        """One pass over the data as checked ``(x, y)`` batches on ``device``.

        Raises:
            ValueError: a pass of ``batches`` after the check yields nothing: it is a
                one-shot iterable.
        """
        if self.tensors is not None:
            yield tuple(t.to(device) for t in self.tensors)  # type: ignore[misc]
            return
        assert self.batches is not None
        if self.resume:
            read, rest = self.resume.pop()
            source: Iterator[Any] = itertools.chain(read, rest)
        else:
            source = iter(self.batches)
        index = -1
        for index, batch in enumerate(source):
            yield tuple(t.to(device) for t in check_batch(batch, f"{self.name} batch {index}"))  # type: ignore[misc]
        if index < 0:
            raise ValueError(one_shot_message(self.name, self.batches))


def check_batch(batch: Any, where: str) -> Batch:
    """``batch`` as an ``(x, y)`` pair of tensors of equal leading length, or a clear error."""
    if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{where} must be an (x, y) pair of tensors, got {_describe(batch)}; "
            f"sweep accepts {ACCEPTED}"
        )
    x, y = batch
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TypeError(
            f"{where} must be an (x, y) pair of tensors, got ({_describe(x)}, {_describe(y)})"
        )
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"{where}: x and y must have the same leading (sample) length, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError(f"{where} is empty: it holds no samples")
    return x, y


def as_data(data: Any, name: str, *, check_all: bool = False) -> Data:
    """Check ``train=`` / ``val=`` data before training: tensors, a loader or batches.

    A loader or iterable is iterated here to check its first batch (every batch with
    ``check_all``, for validation data, so that a bad batch fails before training), and
    must give a fresh iterator each time (``iter(data) is not data``) since it is
    re-iterated per epoch. The first batch is not lost: the first epoch continues the
    checking iterator. Validation data is read again after training, so with
    ``check_all`` an iterable not known to restart (anything but a list, a tuple or a
    DataLoader over a map-style Dataset) is probed for a second pass, and one that
    yields nothing (an IterableDataset over a stream) is refused before training.

    Args:
        data: ``(x, y)`` tensors with the same leading (sample) length ``n`` (``x`` of
            shape ``(n, ...)``, ``y`` of shape ``(n, ...)``, any dtypes), a
            ``DataLoader``, or a re-iterable of such ``(x, y)`` batches.
        name: the argument's name, used in error messages (``"train"``, ``"val"``).
        check_all: check every batch now, not just the first.

    Returns:
        A :class:`Data`.

    Raises:
        TypeError: ``data`` is not one of these forms (e.g. a bare tensor, a dict), is a
            one-shot iterator, or a batch is not an ``(x, y)`` pair of tensors.
        ValueError: ``x`` and ``y`` differ in leading length or hold no samples; the
            iterable yields no batches.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> data = fr.sweep_data.as_data((torch.zeros(4, 2), torch.zeros(4)), "train")
        >>> data.tensors[0].shape
        torch.Size([4, 2])
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return Data(tensors=check_batch(data, name), batches=None, name=name)
    if isinstance(data, (Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be {ACCEPTED}; got {_describe(data)}")
    if iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}), which cannot be "
            "re-iterated each epoch; pass a list of batches or a DataLoader"
        )
    iterator = iter(data)
    read: list[Any] = []
    for batch in iterator:
        check_batch(batch, f"{name} batch {len(read)}")
        read.append(batch)
        if not check_all:
            break
    if not read:
        raise ValueError(f"{name} is empty: it yields no batches")
    first = check_batch(read[0], f"{name} batch 0")
    if not check_all:
        # The first epoch continues this iterator: a stream's first batch is not lost.
        return Data(tensors=None, batches=data, name=name, first=first, resume=[(read, iterator)])
    if not _reiterable(data) and next(iter(data), _END) is _END:
        raise TypeError(one_shot_message(name, data))
    return Data(tensors=None, batches=data, name=name, first=first)


_END = object()


def _reiterable(data: Any) -> bool:
    """Whether ``data`` is known to give every pass afresh (a list, a DataLoader over a
    map-style Dataset), so that no probe pass is needed."""
    if isinstance(data, (list, tuple)):
        return True
    return isinstance(data, torch.utils.data.DataLoader) and not isinstance(
        data.dataset, torch.utils.data.IterableDataset
    )


def one_shot_message(name: str, data: Any) -> str:
    """Why a second pass over ``name`` found nothing, and what to pass instead."""
    return (
        f"{name} ({type(data).__name__}) yields nothing when iterated again: it is a one-shot "
        "iterable (e.g. an IterableDataset over a stream, whose __iter__ continues one "
        "iterator), but sweep reads val once to check it and once to evaluate, and train "
        "once per epoch (and again to refit); pass a list of batches, a DataLoader over a "
        "map-style Dataset, or an IterableDataset whose __iter__ starts the data afresh"
    )


def training_batches(
    data: Data, batch_size: int | None, steps: int, seed: int, device: torch.device
) -> Iterator[tuple[Batch, Tensor | None]]:
    """``steps`` training batches as ``((x, y), indices)``.

    Tensors: full batches, or random minibatches of ``batch_size`` drawn per epoch from
    ``seed`` (the last partial batch dropped, so shapes stay static); ``indices`` are the
    samples' positions, which fold masks need. Batches: the iterable re-iterated per
    epoch until ``steps`` batches have been yielded; ``indices`` is ``None``.

    Args:
        data: checked data, from :func:`as_data`.
        batch_size: samples per minibatch for tensor data, or ``None`` for the full
            batch each step (ignored for batch iterables).
        steps: the number of batches (optimizer steps) to yield.
        seed: the seed of the shuffling (an int).
        device: where the batches are moved.

    Returns:
        An iterator of ``steps`` pairs ``((x, y), indices)``, ``indices`` an int64
        tensor of shape ``(batch_size,)`` (tensor data) or ``None``.

    Raises:
        ValueError: a pass over a batch iterable yields nothing (a one-shot iterable).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> data = fr.sweep_data.as_data((torch.zeros(6, 2), torch.zeros(6)), "train")
        >>> batches = list(fr.sweep_data.training_batches(data, 2, steps=4, seed=0,
        ...                                               device=torch.device("cpu")))
        >>> (x, y), index = batches[0]
        >>> len(batches), x.shape, index.shape
        (4, torch.Size([2, 2]), torch.Size([2]))
    """
    if data.tensors is not None:
        x, y = (t.to(device) for t in data.tensors)
        for index in sample_batches(len(x), batch_size, steps, seed, device):
            yield (x[index], y[index]), index
        return
    produced = 0
    while produced < steps:
        epoch_size = 0
        for batch in data.epoch(device):
            epoch_size += 1
            yield batch, None
            produced += 1
            if produced == steps:
                return
        if epoch_size == 0:
            raise ValueError(f"{data.name} yielded no batches in an epoch")


def sample_batches(
    size: int, batch_size: int | None, steps: int, seed: int, device: torch.device
) -> list[Tensor]:
    """Sample indices of each step: all samples, or shuffled minibatches per epoch."""
    if batch_size is None:
        return [torch.arange(size, device=device)] * steps
    generator = torch.Generator().manual_seed(seed)
    per_epoch = size // batch_size
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(size, generator=generator)
        batches += list(order[: per_epoch * batch_size].view(per_epoch, batch_size))
    return [batch.to(device) for batch in batches[:steps]]


def kfold_masks(size: int, folds: int) -> Tensor:
    """Held-out masks of contiguous folds, as ``sklearn.model_selection.KFold(folds)``.

    The first ``size % folds`` folds hold ``size // folds + 1`` samples, the others
    ``size // folds``. Returns a bool tensor of shape ``(folds, size)``, row ``f`` true
    on fold ``f``'s held-out samples.

    Args:
        size: the number of samples ``n``.
        folds: the number of folds, an int in ``[2, n]``.

    Returns:
        A bool tensor of shape ``(folds, size)``.

    Raises:
        ValueError: ``folds`` is not an int >= 2, or is more than ``size``.

    Example:
        >>> import functorch_reg as fr
        >>> fr.sweep_data.kfold_masks(5, 2).int()
        tensor([[1, 1, 1, 0, 0],
                [0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if folds > size:
        raise ValueError(f"folds={folds} is more than the {size} training samples")
    base, extra = divmod(size, folds)
    sizes = [base + (f < extra) for f in range(folds)]
    held_out = torch.zeros(folds, size, dtype=torch.bool)
    start = 0
    for fold, fold_size in enumerate(sizes):
        held_out[fold, start : start + fold_size] = True
        start += fold_size
    return held_out


def fold_masks(size: int, folds: int | None, cv: Any) -> tuple[Tensor, Tensor]:
    """``(train_mask, held_out_mask)``, each bool ``(n_folds, size)``, from ``folds`` or ``cv``.

    ``cv`` is a scikit-learn splitter (anything with ``split(X)``) or an iterable of
    ``(train_indices, test_indices)`` pairs; without it, contiguous K folds.

    Args:
        size: the number of samples ``n``.
        folds: the number of contiguous folds (used when ``cv`` is ``None``).
        cv: a scikit-learn splitter, an iterable of index pairs, or ``None``.

    Returns:
        ``(train_mask, held_out_mask)``, bool tensors of shape ``(n_folds, size)``.

    Raises:
        ValueError: ``cv`` gives fewer than 2 splits, or indices that are empty, not
            1-D, or outside ``[0, size)``; without ``cv``, as :func:`kfold_masks`.

    Example:
        >>> import functorch_reg as fr
        >>> train, held_out = fr.sweep_data.fold_masks(4, None, [([0, 1], [2, 3]),
        ...                                                      ([2, 3], [0, 1])])
        >>> held_out.int()
        tensor([[0, 0, 1, 1],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    if cv is None:
        assert folds is not None
        held_out = kfold_masks(size, folds)
        return ~held_out, held_out
    splits = cv.split(torch.zeros(size, 1).numpy()) if hasattr(cv, "split") else cv
    trains, tests = [], []
    for fold, (train_index, test_index) in enumerate(splits):
        masks = []
        for role, index in (("train", train_index), ("test", test_index)):
            index = torch.as_tensor(index, dtype=torch.int64)
            if index.ndim != 1 or len(index) == 0 or index.min() < 0 or index.max() >= size:
                raise ValueError(
                    f"cv fold {fold}: {role} indices must be a non-empty 1-d list of "
                    f"positions in [0, {size})"
                )
            mask = torch.zeros(size, dtype=torch.bool)
            mask[index] = True
            masks.append(mask)
        trains.append(masks[0])
        tests.append(masks[1])
    if len(trains) < 2:
        raise ValueError(f"cv must give at least 2 (train, test) splits, got {len(trains)}")
    return torch.stack(trains), torch.stack(tests)


def concatenated(first: Data, second: Data, batch_size: int | None) -> Data:
    """``first`` then ``second`` as one data set (tensors stay tensors when both are)."""
    if first.tensors is not None and second.tensors is not None:
        pairs = zip(first.tensors, second.tensors, strict=True)
        x, y = (torch.cat([a, b.to(a.device)]) for a, b in pairs)
        return Data(tensors=(x, y), batches=None, name=f"{first.name} + {second.name}")
    return Data(
        tensors=None,
        batches=_Chained(_as_batches(first, batch_size), _as_batches(second, batch_size)),
        name=f"{first.name} + {second.name}",
    )


class _Chained:
    """A re-iterable of the batches of two re-iterables, in order."""

    def __init__(self, *parts: Iterable[Any]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self.parts)


def _as_batches(data: Data, batch_size: int | None) -> Iterable[Any]:
    if data.tensors is None:
        assert data.batches is not None
        return data.batches
    x, y = data.tensors
    size = len(x) if batch_size is None else batch_size
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def per_sample(
    loss_fn: Callable[[Any, Tensor], Tensor], outputs: Any, targets: Tensor
) -> Callable[[Any, Tensor], Tensor]:
    """Per-sample losses from a mean-reduced ``loss_fn``, checked on example outputs.

    ``loss_fn(outputs, targets, reduction="none")`` (the torch losses), averaged over
    each sample's other dims, when it exists and its mean is ``loss_fn``'s value on the
    example; otherwise each sample as a batch of one (a vmap, about 1.6x slower in a
    compiled CPU step). ``outputs`` may be a dict, tuple or ``ModelOutput`` whose
    tensors all have the samples along their first dim.

    Example:
        >>> outputs, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
        >>> losses = per_sample(torch.nn.functional.cross_entropy, outputs, targets)
        >>> bool(torch.isclose(losses(outputs, targets).mean(),
        ...                    torch.nn.functional.cross_entropy(outputs, targets)))
        True
    """

    def unreduced(output: Any, target: Tensor) -> Tensor:
        losses = loss_fn(output, target, reduction="none")  # type: ignore[call-arg]
        return losses.reshape(len(target), -1).mean(1)

    try:
        with torch.no_grad():
            example = unreduced(outputs, targets)
            works = example.shape == (len(targets),) and bool(
                torch.isclose(example.mean(), loss_fn(outputs, targets), rtol=1e-4, atol=1e-6)
            )
    except (TypeError, RuntimeError, ValueError):
        works = False
    if works:
        return unreduced

    def one_sample(output: Any, target: Tensor) -> Tensor:
        # A dict, tuple or ModelOutput of per-sample tensors: each leaf as a batch of one.
        return loss_fn(pytree.tree_map(lambda t: t[None], output), target[None])

    return torch.func.vmap(one_sample)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def as_strengths(strengths: Tensor | Sequence[float], name: str = "strengths") -> Tensor:
    """``strengths`` as a non-empty 1-d floating tensor of finite, non-negative values.

    Integer values are cast to the default dtype; a floating tensor keeps its dtype; a
    sequence of Python floats becomes float64, the value torch.optim reads from a Python
    float (the caller casts to the params' dtype: a float64 model's ``0.05`` is ``0.05``).

    Args:
        strengths: a 1-D tensor or sequence of ``K`` strengths (absolute multipliers of
            a penalty, or values of a hyperparameter).
        name: the argument's name, for messages.

    Returns:
        A floating tensor of shape ``(K,)``.

    Raises:
        TypeError: complex strengths (a cast would drop the imaginary part).
        ValueError: not a non-empty 1-d sequence, or a value negative or non-finite.

    Example:
        >>> import functorch_reg as fr
        >>> fr.sweep_data.as_strengths([0, 1, 10])
        tensor([ 0.,  1., 10.])
    """
    given, strengths = strengths, torch.as_tensor(strengths)
    if strengths.is_complex():
        raise TypeError(
            f"{name} must be real, got complex values {strengths.tolist()}; a "
            "regularization strength is a non-negative real number: pass the real parts "
            f"({name}.real) if that is what you meant"
        )
    if not strengths.is_floating_point():
        strengths = strengths.to(torch.get_default_dtype())
    elif isinstance(given, Sequence) and not any(isinstance(v, Tensor) for v in given):
        strengths = torch.as_tensor(given, dtype=torch.float64)  # Python floats are doubles
    if strengths.ndim != 1 or len(strengths) == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-d tensor, got shape {tuple(strengths.shape)}"
        )
    if not (torch.isfinite(strengths).all() and (strengths >= 0).all()):
        raise ValueError(f"{name} must be finite and non-negative, got {strengths.tolist()}")
    return strengths
