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


def small_cnn() -> torch.nn.Module:
    """Conv (frozen) + BatchNorm2d + Dropout + Linear, float64, in train mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Flatten(), torch.nn.Linear(64, 3),
    ).double()  # fmt: skip
    model[0].requires_grad_(False)
    return model


def tiny_gpt2() -> torch.nn.Module:
    """GPT-2 from a tiny config: tied embedding and head, dropout, float64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    if isinstance(model, torch.nn.Sequential):
        x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        return torch.nn.functional.cross_entropy(model(x), y)
    ids = torch.randint(0, 32, (4, 12))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("make", [small_cnn, tiny_gpt2], ids=["cnn", "gpt2"])
def test_cache_blocks_on_a_real_model_match_torch_adamw(make, monkeypatch):
    """The eager step in many cache blocks (as a model over 4 MiB runs on the CPU),
    through TorchOptimizer, against torch.optim.AdamW on a copy of the same model."""
    from functorch_reg.optim import base

    monkeypatch.setattr(base, "CACHE_BLOCK", 64)  # bytes: blocks of a few leaves
    blocks: list[int] = []
    split = base._cache_blocks
    monkeypatch.setattr(
        base, "_cache_blocks", lambda *a: blocks.append(len(out := split(*a))) or out
    )
    model = make()
    reference = copy.deepcopy(model)
    optimizer = fr.TorchOptimizer(model.parameters(), fr.adamw(lr=1e-2, weight_decay=0.1))
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for net, opt in ((model, optimizer), (reference, torch_optimizer)):
        torch.manual_seed(1)  # the same batches and dropout masks for both
        for _ in range(5):
            opt.zero_grad()
            loss_of(net).backward()
            opt.step()
    assert max(blocks) > 1  # the step ran block by block
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=0, atol=1e-12, msg=name)  # BatchNorm's stats
