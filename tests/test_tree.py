import pytest
import torch

import functorch_reg as fr
from functorch_reg.tree import check_structure, leaf_names


def test_leaf_names_are_dotted_key_paths():
    tree = {"encoder": {"layer": [torch.ones(1), torch.ones(1)]}, "head": torch.ones(1)}
    assert leaf_names(tree) == ["encoder.layer.0", "encoder.layer.1", "head"]


def test_none_leaves_keep_their_place():
    assert leaf_names({"a": None, "b": torch.ones(1)}) == ["a", "b"]


def test_check_structure_accepts_none_grads():
    check_structure({"a": torch.ones(2), "b": torch.ones(3)}, {"a": None, "b": torch.ones(3)})


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"a": torch.ones(2)}, "leaf 'b' of params is missing from grads"),
        (
            {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)},
            "grads has a leaf 'c' that params lacks",
        ),
        ({"a": torch.ones(2), "b": torch.ones(4)}, "leaf 'b' has shape (4,) in grads but (3,)"),
        ({"a": torch.ones(2), "b": [torch.ones(3)]}, "leaf 'b' of params is missing"),
    ],
)
def test_check_structure_names_the_first_differing_leaf(other, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_structure({"a": torch.ones(2), "b": torch.ones(3)}, other)


def test_stack_unstack_round_trip_params_and_states():
    members = [
        {"w": torch.full((2, 3), float(i)), "b": torch.full((3,), -float(i))} for i in range(4)
    ]
    stacked = fr.stack(members)
    assert stacked["w"].shape == (4, 2, 3)
    for original, recovered in zip(members, fr.unstack(stacked), strict=True):
        torch.testing.assert_close(original, recovered, rtol=0, atol=0)
    opt = fr.adam(amsgrad=False)
    states = [opt.init(member) for member in members]
    stacked_state = fr.stack(states)
    assert stacked_state.exp_avg["w"].shape == (4, 2, 3)
    assert stacked_state.max_exp_avg_sq == ()
    assert stacked_state.beta_powers.shape == (4, 2, 2)
    assert fr.unstack(stacked_state)[2].beta_powers.shape == (2, 2)


def test_stack_rejects_mismatched_members():
    with pytest.raises(ValueError, match="member 1 do not match member 0"):
        fr.stack([{"w": torch.ones(2)}, {"v": torch.ones(2)}])
    with pytest.raises(ValueError, match="at least one"):
        fr.stack([])


def test_unstack_rejects_ragged_leading_dims():
    with pytest.raises(ValueError, match="leading dim"):
        fr.unstack({"w": torch.ones(2, 3), "b": torch.ones(3)})
