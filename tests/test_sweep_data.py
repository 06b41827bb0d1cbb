"""Sweep data: accepted forms and their errors, epochs of batches, folds as scikit-learn's."""

from __future__ import annotations

import pytest
import torch
from sklearn.model_selection import KFold, ShuffleSplit
from torch.utils.data import DataLoader, TensorDataset

from functorch_reg import sweep_data


def pairs(count: int = 3, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((size, 2), float(i)), torch.full((size,), float(i))) for i in range(count)]


@pytest.mark.parametrize("size", [10, 11, 13])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_kfold_masks_are_scikit_learns_contiguous_folds(size, folds):
    held_out = sweep_data.kfold_masks(size, folds)
    for fold, (_, test) in enumerate(KFold(folds).split(range(size))):
        assert torch.equal(held_out[fold].nonzero().flatten(), torch.as_tensor(test))
    train, test = sweep_data.fold_masks(size, folds, None)
    assert torch.equal(train, ~test) and torch.equal(test, held_out)


def test_fold_masks_take_a_splitter_or_index_pairs():
    splitter = ShuffleSplit(n_splits=3, test_size=0.25, random_state=0)
    train, test = sweep_data.fold_masks(12, None, splitter)
    for fold, (train_index, test_index) in enumerate(splitter.split(torch.zeros(12, 1).numpy())):
        assert torch.equal(train[fold].nonzero().flatten(), torch.as_tensor(sorted(train_index)))
        assert torch.equal(test[fold].nonzero().flatten(), torch.as_tensor(sorted(test_index)))
    with pytest.raises(ValueError, match="at least 2"):
        sweep_data.fold_masks(12, None, [([0, 1], [2])])
    with pytest.raises(ValueError, match=r"positions in \[0, 12\)"):
        sweep_data.fold_masks(12, None, [([0, 1], [12]), ([2], [3])])


@pytest.mark.parametrize(
    ("folds", "message"), [(1, "int >= 2"), (True, "int >= 2"), (20, "more than the 10")]
)
def test_kfold_masks_refuse_bad_folds(folds, message):
    with pytest.raises(ValueError, match=message):
        sweep_data.kfold_masks(10, folds)


def test_loaders_and_lists_are_re_iterated_per_epoch():
    loader = DataLoader(
        TensorDataset(torch.arange(8.0).view(4, 2), torch.arange(4.0)), batch_size=2
    )
    for data in (sweep_data.as_data(loader, "train"), sweep_data.as_data(pairs(), "train")):
        got = list(sweep_data.training_batches(data, None, 5, 0, torch.device("cpu")))
        assert len(got) == 5 and all(index is None for _, index in got)
        assert torch.equal(got[0][0][0], got[len(list(data.epoch(torch.device("cpu"))))][0][0])


def test_tensor_minibatches_are_static_shaped_and_seeded():
    data = sweep_data.as_data((torch.randn(10, 2), torch.randn(10)), "train")
    first = [index for _, index in sweep_data.training_batches(data, 3, 7, 1, torch.device("cpu"))]
    again = [index for _, index in sweep_data.training_batches(data, 3, 7, 1, torch.device("cpu"))]
    assert all(len(index) == 3 for index in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # each epoch of 3 full batches of 3 draws 9 distinct samples
    assert len(torch.cat(first[:3]).unique()) == 9


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (torch.zeros(3), TypeError, "must be"),
        ({"x": torch.zeros(3)}, TypeError, "must be"),
        (iter(pairs()), TypeError, "one-shot iterator"),
        ([], ValueError, "is empty"),
        ([(torch.zeros(2, 1),)], TypeError, r"train batch 0 must be an \(x, y\) pair"),
        ((torch.zeros(4, 2), torch.zeros(3)), ValueError, "4"),
    ],
)
def test_as_data_says_what_it_accepts(data, error, message):
    with pytest.raises(error, match=message):
        sweep_data.as_data(data, "train")


def test_validation_data_is_checked_batch_by_batch_before_use():
    bad = [*pairs(2), ("not a tensor", torch.zeros(4))]
    sweep_data.as_data(bad, "train")  # training data: its first batch is checked
    with pytest.raises(TypeError, match="val batch 2"):
        sweep_data.as_data(bad, "val", check_all=True)


@pytest.mark.parametrize(
    ("strengths", "message"),
    [
        ([], "non-empty 1-d"),
        ([[0.1]], "non-empty 1-d"),
        ([0.1, -1.0], "non-negative"),
        ([float("nan")], "finite"),
    ],
)
def test_as_strengths_refuses_bad_grids(strengths, message):
    with pytest.raises(ValueError, match=message):
        sweep_data.as_strengths(strengths)
    assert sweep_data.as_strengths([0, 1]).dtype == torch.get_default_dtype()
