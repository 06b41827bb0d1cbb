"""fr.TorchOptimizer on models as the ecosystem builds them: a frozen backbone, and param
groups that carry keys of their own (Lightning's "name", timm's "lr_scale")."""

from __future__ import annotations

import copy

import pytest
import torch

import functorch_reg as fr


def backbone_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    model[0].requires_grad_(False)  # the frozen backbone
    return model


def run(model, optimizer, steps=4):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("flat", [False, True])
def test_frozen_backbone_stays_bit_identical_and_the_head_matches_adamw(flat):
    model = backbone_model()
    reference = copy.deepcopy(model)
    frozen = [p.clone() for p in model[0].parameters()]
    optimizer = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=0.1, weight_decay=0.5), flat=flat)
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.5)
    run(model, optimizer)
    run(reference, torch_optimizer)
    for p, before in zip(model[0].parameters(), frozen, strict=True):
        assert torch.equal(p, before)  # not moved, not decayed
        assert p.grad is None  # and no gradient made for it
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    assert set(optimizer.state_dict()["state"]) == set(torch_optimizer.state_dict()["state"])


def test_flat_refuses_a_param_frozen_after_construction_before_anything_changes():
    model = backbone_model()
    optimizer = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=0.1), flat=True)
    run(model, optimizer, steps=1)
    model[2].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="param 3 of param group 0 changed requires_grad"):
        optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    torch.testing.assert_close(optimizer.state_dict(), saved, rtol=0, atol=0)


@pytest.mark.parametrize("flat", [False, True])
def test_extra_group_keys_are_kept_like_torch_optim(flat, tmp_path):
    model = backbone_model()
    model[0].requires_grad_(True)
    groups = [
        {"params": model[0].parameters(), "name": "backbone", "lr_scale": 0.1},
        {"params": model[2].parameters(), "name": "head", "weight_decay": 0.0},
    ]
    optimizer = fr.TorchOptimizer(groups, fr.adamw(lr=0.1), flat=flat)
    reference = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "name": "backbone", "lr_scale": 0.1},
            {"params": model[2].parameters(), "name": "head", "weight_decay": 0.0},
        ],
        lr=0.1,
    )
    for ours, theirs in zip(optimizer.param_groups, reference.param_groups, strict=True):
        assert ours["name"] == theirs["name"]
        assert ours.get("lr_scale") == theirs.get("lr_scale")
    # timm's layer-wise decay: the user's scheduler reads the group's own key.
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group.get("lr_scale", 1.0)
    run(model, optimizer, steps=2)
    saved = optimizer.state_dict()
    assert [g["name"] for g in saved["param_groups"]] == ["backbone", "head"]
    assert saved["param_groups"][0]["lr_scale"] == 0.1
    torch.save(saved, tmp_path / "opt.pt")
    resumed = fr.TorchOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
        fr.adamw(lr=0.1),
        flat=flat,
    )
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert resumed.param_groups[0]["name"] == "backbone"
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("weight_deacy", "unknown hyperparameter 'weight_deacy'.*did you mean 'weight_decay'"),
        ("bets", "did you mean 'betas'"),
        ("learning_rate", "unknown hyperparameter 'learning_rate'; the functional optimizer"),
    ],
)
def test_near_misses_of_a_hyperparameter_are_refused(key, message):
    model = backbone_model()
    optimizer = fr.TorchOptimizer([{"params": model[2].parameters()}], fr.adamw(lr=0.1))
    with pytest.raises(TypeError, match=message):
        optimizer.add_param_group({"params": model[0].parameters(), key: 0.1})
    assert len(optimizer.param_groups) == 1
