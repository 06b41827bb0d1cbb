"""Argument checks shared by every module (functorch_reg._checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from functorch_reg._checks import check_positive_int


@pytest.mark.parametrize("value", [1, 2, 10**9])
def test_a_positive_int_passes_and_is_returned(value):
    assert check_positive_int("f", "n", value) == value


@pytest.mark.parametrize(
    "value", [0, -3, True, False, 3.0, "3", None, np.int64(3), torch.tensor(3)]
)
def test_anything_else_is_refused_naming_owner_and_argument(value):
    with pytest.raises(ValueError, match=r"^f: n must be a positive int, got "):
        check_positive_int("f", "n", value)


def test_a_minimum_above_one_is_said_in_the_message():
    assert check_positive_int("sweep", "folds", 2, minimum=2) == 2
    with pytest.raises(ValueError, match=r"^sweep: folds must be an int >= 2, got 1$"):
        check_positive_int("sweep", "folds", 1, minimum=2)
    assert check_positive_int("g", "k", 0, minimum=0) == 0
