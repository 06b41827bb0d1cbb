"""A functional state describes itself (functorch_reg.optim.base): its type names its
leaf-table field (a classmethod, no registry), and layout(state) says which fields a
configuration uses. Expected layouts were recorded before the registry went."""

from __future__ import annotations

import pytest
import torch

import functorch_reg as fr
import functorch_reg.optim.base as base
from functorch_reg.optim.base import layout, leaf_table_field

CONFIGS = {
    "sgd": lambda: fr.sgd(lr=0.1),
    "sgd_momentum": lambda: fr.sgd(lr=0.1, momentum=0.9),
    "adam": lambda: fr.adam(),
    "adamw_amsgrad": lambda: fr.adamw(amsgrad=True),
    "lion": lambda: fr.lion(),
    "muon": lambda: fr.muon(),
    "muon_adam": lambda: fr.muon(adam=fr.adamw(amsgrad=True)),
    "schedule_free_adamw": lambda: fr.schedule_free_adamw(),
    "schedule_free_sgd": lambda: fr.schedule_free_sgd(),
}

LAYOUTS = {
    "sgd": ((), None, "skipped"),
    "sgd_momentum": (("momentum_buffer",), "count", "skipped"),
    "adam": (("exp_avg", "exp_avg_sq"), "beta_powers", "skipped"),
    "adamw_amsgrad": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "beta_powers", "skipped"),
    "lion": (("exp_avg",), None, "skipped"),
    "muon": (("momentum_buffer",), None, "skipped"),
    "muon_adam": (("momentum_buffer", "exp_avg_sq", "max_exp_avg_sq"), "beta_powers", "skipped"),
    "schedule_free_adamw": (("z", "exp_avg_sq"), "schedule", "skipped"),
    "schedule_free_sgd": (("z",), "schedule", "skipped"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layout_is_unchanged_and_read_from_the_state(name):
    params = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    state = CONFIGS[name]().init(params)
    assert tuple(layout(state)) == LAYOUTS[name]
    slots, table, counter = layout(state)
    assert state._fields[-1] == counter
    assert table == (leaf_table_field(state) if table is not None else None)
    # A state rebuilt from its layout's fields equals it (what the adapter does).
    rebuilt = state._replace(**{f: getattr(state, f) for f in (*slots, counter)})
    torch.testing.assert_close(rebuilt, state, rtol=0, atol=0)


def test_state_types_name_their_leaf_table_field_themselves():
    expected = {
        fr.AdamState: "beta_powers",
        fr.SGDState: "count",
        fr.optim.MuonState: "beta_powers",
        fr.optim.ScheduleFreeState: "schedule",
        fr.optim.LionState: None,
    }
    for state_type, field in expected.items():
        assert leaf_table_field(state_type) == field
        if field is not None:
            assert state_type.leaf_table_field() == field
            assert field in state_type._fields  # a field, not a method shadowing one
    state = fr.adam().init({"w": torch.ones(2)})
    assert leaf_table_field(state) == "beta_powers"
    assert not hasattr(base, "LEAF_TABLES")  # no registry other modules must write
