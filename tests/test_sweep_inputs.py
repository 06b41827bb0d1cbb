"""fr.sweep on awkward input: complex strengths, one-shot iterables (a stream) as train=
and val=, and ties under select="val_accuracy"."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import functorch_reg as fr


def regression_batches(count: int, seed: int, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, generator=generator), torch.randn(size, 2, generator=generator))
        for _ in range(count)
    ]


class Stream(IterableDataset):
    """An IterableDataset over a stream: every ``iter`` continues the same reader, as
    one over a socket, a queue or an open file does."""

    def __init__(self, batches):
        self.reader = iter(batches)
        self.read = 0

    def __iter__(self):
        for batch in self.reader:
            self.read += 1
            yield batch


class Replayable(IterableDataset):
    """An IterableDataset that starts its data afresh on every ``iter``."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def run(train, val, steps: int = 3, strengths=(0.0, 0.1)):
    torch.manual_seed(0)
    return fr.sweep(
        torch.nn.Linear(3, 2),
        torch.nn.functional.mse_loss,
        fr.sgd(lr=0.1),
        list(strengths),
        train=train,
        val=val,
        penalty=fr.penalties.l2,
        steps=steps,
        compile=False,
        progress=False,
    )


# ---------------------------------------------------------------------------------------
# item 10: complex strengths


@pytest.mark.parametrize(
    ("strengths", "name"),
    [
        ([0.1 + 1j, 0.2], "strengths"),
        (torch.tensor([0.1, 0.2], dtype=torch.complex64), "strengths"),
        ({"penalty": [0.1], "lr": [0.1 + 0.5j]}, "strengths['lr']"),
    ],
    ids=["list", "tensor", "grid_axis"],
)
def test_complex_strengths_are_refused_naming_the_axis(strengths, name):
    # Before: cast to real with only torch's ComplexWarning, the imaginary part lost.
    data = regression_batches(1, 0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way
        with pytest.raises(TypeError, match=re.escape(name) + " must be real"):
            fr.sweep(
                torch.nn.Linear(3, 2),
                torch.nn.functional.mse_loss,
                fr.sgd(lr=0.1),
                strengths,
                train=data,
                val=data,
                penalty=fr.penalties.l2,
                steps=1,
                compile=False,
                progress=False,
            )


# ---------------------------------------------------------------------------------------
# item 16: one-shot iterables


def test_a_stream_as_train_loses_no_batch_to_the_input_check():
    # Before: the check ate the stream's first batch; training saw batches 1 and 2, then
    # "train yielded no batches in an epoch".
    batches, val = regression_batches(3, 0), regression_batches(1, 1)[0]
    stream = Stream(batches)
    streamed = run(stream, val, steps=3)
    listed = run(batches, val, steps=3)
    assert stream.read == 3
    assert torch.equal(streamed.train_loss, listed.train_loss)
    for name in listed.params:
        assert torch.equal(streamed.params[name], listed.params[name]), name
    assert torch.equal(streamed.val_loss, listed.val_loss)


def test_a_stream_as_train_that_runs_out_says_it_is_one_shot():
    val = regression_batches(1, 1)[0]
    with pytest.raises(ValueError, match=r"train \(Stream\) yields nothing when iterated again"):
        run(Stream(regression_batches(2, 0)), val, steps=3)


@pytest.mark.parametrize(
    "wrap", [lambda b: Stream(b), lambda b: DataLoader(Stream(b), batch_size=None)]
)
def test_a_stream_as_val_is_refused_before_training(wrap):
    # Before: a bare StopIteration (val was read to the end by its check).
    train = regression_batches(2, 0)
    with pytest.raises(TypeError, match=r"val \(\w+\) yields nothing when iterated again"):
        run(train, wrap(regression_batches(2, 1)))


def test_iterable_datasets_that_restart_are_accepted_as_val_and_train():
    train, val = regression_batches(2, 0), regression_batches(2, 1)
    replayed = run(Replayable(train), DataLoader(Replayable(val), batch_size=None), steps=4)
    listed = run(train, val, steps=4)
    assert torch.equal(replayed.train_loss, listed.train_loss)
    assert torch.equal(replayed.val_loss, listed.val_loss)


# ---------------------------------------------------------------------------------------
# item 22: ties under select="val_accuracy"


def result_with_fold_accuracies(fold_accuracy: torch.Tensor) -> fr.SweepResult:
    count = len(fold_accuracy)
    return fr.SweepResult(
        strengths=torch.arange(count, dtype=torch.float32),
        params={"w": torch.zeros(count, 2)},
        train_loss=torch.zeros(1, count),
        val_loss=torch.ones(count),
        val_accuracy=fold_accuracy.mean(1),  # as sweep averages over folds
        sparsity=torch.zeros(count),
        param_norm=torch.zeros(count),
        fold_val_accuracy=fold_accuracy,
        select="val_accuracy",
    )


def test_equal_accuracies_go_to_the_first_member_whatever_the_rounding():
    # The same five fold accuracies (out of 7 held-out samples) in another fold order:
    # their float32 means differ in the last bit, and argmax picked member 1.
    folds = torch.tensor([3, 2, 4, 2, 1]) / 7
    fold_accuracy = torch.stack([folds, folds[[1, 0, 3, 2, 4]]])
    result = result_with_fold_accuracies(fold_accuracy)
    assert result.val_accuracy[1] > result.val_accuracy[0]  # the rounding is there
    assert result.best_index == 0
    # A real difference (one sample of one fold) still wins, at any position.
    better = fold_accuracy.clone()
    better[1, 0] += 1 / 7
    assert result_with_fold_accuracies(better).best_index == 1
    assert fr.SweepResult.ACCURACY_TIE_TOLERANCE < 1 / (7 * 5)
