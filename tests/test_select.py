import pytest
import torch

import functorch_reg as fr
from functorch_reg.select import mask

from .conftest import mlp_params


def params_with_int_leaf() -> dict[str, torch.Tensor]:
    return {**mlp_params(), "steps": torch.tensor([3])}


def test_none_selects_every_floating_leaf():
    assert mask(params_with_int_leaf()) == {
        "0.weight": True,
        "0.bias": True,
        "2.weight": True,
        "2.bias": True,
        "steps": False,
    }


def test_presets():
    params = {**params_with_int_leaf(), "norm.weight": torch.ones(6)}
    assert mask(params, fr.select.weights()) == {
        "0.weight": True,
        "0.bias": False,
        "2.weight": True,
        "2.bias": False,
        "steps": False,
        "norm.weight": False,
    }
    assert mask(params, fr.select.biases()) == {
        "0.weight": False,
        "0.bias": True,
        "2.weight": False,
        "2.bias": True,
        "steps": False,
        "norm.weight": False,
    }
    assert mask(params, fr.select.all()) == mask(params)


def test_globs_and_lists_of_globs():
    params = mlp_params()
    assert mask(params, "0.*") == {
        "0.weight": True,
        "0.bias": True,
        "2.weight": False,
        "2.bias": False,
    }
    assert mask(params, ["*.bias", "2.weight"]) == {
        "0.weight": False,
        "0.bias": True,
        "2.weight": True,
        "2.bias": True,
    }


def test_predicate_sees_name_and_tensor():
    seen = []

    def wide(name: str, leaf: torch.Tensor) -> bool:
        seen.append(name)
        return leaf.numel() > 10

    assert mask(mlp_params(), wide) == {
        "0.weight": True,
        "0.bias": False,
        "2.weight": True,
        "2.bias": False,
    }
    assert sorted(seen) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_bool_pytree():
    chosen = {"0.weight": True, "0.bias": False, "2.weight": False, "2.bias": True}
    assert mask(mlp_params(), chosen) == chosen


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ("decoder.*", ValueError, "where='decoder.\\*' matches no floating-point leaf"),
        (["0.*", "nothing"], ValueError, "where='nothing' matches no"),
        ("steps", ValueError, "where='steps' matches no floating-point leaf"),
        ({"0.weight": True}, ValueError, "where do not match params"),
        (
            {"0.weight": True, "0.bias": 1, "2.weight": True, "2.bias": True, "steps": False},
            TypeError,
            "leaf '0.bias' of where is int",
        ),
        (
            {"0.weight": True, "0.bias": True, "2.weight": True, "2.bias": True, "steps": True},
            ValueError,
            "selects leaf 'steps', which is not a floating-point tensor",
        ),
    ],
)
def test_bad_selections_raise(where, error, message):
    with pytest.raises(error, match=message):
        mask(params_with_int_leaf(), where)
