"""The ecosystem's no-decay rules as selections: fr.select.transformers_decay against
transformers.Trainer.get_decay_parameter_names on tiny BERT, GPT-2, Llama and T5, and
fr.select.timm_decay against timm's rule on a module that defines no_weight_decay()."""

from __future__ import annotations

import copy

import pytest
import torch

import functorch_reg as fr

transformers = pytest.importorskip("transformers")


def trainer_decay_names(model: torch.nn.Module) -> set[str]:
    # The Trainer's own method; it reads nothing of the Trainer, so an uninitialized
    # instance calls it without building a training run.
    trainer = object.__new__(transformers.Trainer)
    return set(transformers.Trainer.get_decay_parameter_names(trainer, model))


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = {"vocab_size": 32}
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, num_labels=3, **small,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=1, n_embd=8, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0, **small
        )
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=16, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
            **small,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    config = transformers.T5Config(
        d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, **small,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.slow
def test_transformers_decay_is_the_trainers_decay_set(kind):
    model = tiny(kind)
    expected = trainer_decay_names(model)
    select = fr.select.transformers_decay(model)
    ours = {name for name, p in model.named_parameters() if select(name, p)}
    assert ours == expected & {name for name, _ in model.named_parameters()}
    assert ours  # the comparison is not vacuous: some decay, some do not
    assert len(ours) < len(list(model.parameters()))
    if kind == "t5":  # what fr.select.weights() got wrong
        assert not any("relative_attention_bias" in name for name in ours)
        # split_module names the same leaves; the mask is the Trainer's set there too
        params, _ = fr.split_module(model)
        flags = fr.select.mask(params, select)
        assert {name for name, flag in flags.items() if flag} == ours


class ViTLike(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 3, 4))
        self.patch = torch.nn.Linear(6, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.blocks[0].rel_pos = torch.nn.Parameter(torch.randn(3, 3))
        self.head = torch.nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "blocks.*.rel_pos"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(x)], 1)
        tokens = self.norm(tokens + self.pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens[:, 0] + self.blocks[0].rel_pos.sum())


def timm_rule(model):  # timm's param_groups_weight_decay, written out for the test
    skip = model.no_weight_decay()
    return {
        name
        for name, p in model.named_parameters()
        if not (
            p.ndim <= 1
            or name.endswith(".bias")
            or name in skip
            or (name.startswith("blocks.") and name.endswith(".rel_pos"))
        )
    }


def test_timm_decay_honors_no_weight_decay():
    model = ViTLike()
    select = fr.select.timm_decay(model)
    ours = {name for name, p in model.named_parameters() if select(name, p)}
    assert (
        ours
        == timm_rule(model)
        == {"patch.weight", "blocks.0.weight", "blocks.1.weight", "head.weight"}
    )
    # An explicit list replaces the model's: pos_embed (3-D) is then decayed.
    assert fr.select.timm_decay(model, no_weight_decay=())("pos_embed", model.pos_embed)


def test_presets_as_optimizer_mask_and_penalty_where():
    model = ViTLike().double()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    params, consts = fr.split_module(model)
    select = fr.select.timm_decay(model)
    opt = fr.adamw(lr=0.1, weight_decay=0.5, mask=select)
    state = opt.init(params)

    def loss(params, consts, x):
        out = torch.func.functional_call(model, (params, consts), (x,))
        return out.square().mean() + 0.1 * fr.penalties.l2(params, where=select)

    step = fr.train_step(loss, opt, consts=True, compile=False)
    for _ in range(2):
        step(params, state, consts, x)
    decay = [p for n, p in reference.named_parameters() if n in timm_rule(reference)]
    rest = [p for n, p in reference.named_parameters() if n not in timm_rule(reference)]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.1, weight_decay=0.5
    )
    for _ in range(2):
        optimizer.zero_grad()
        penalty = sum(p.square().sum() for p in decay)  # fr.penalties.l2 is ||w||^2
        (reference(x).square().mean() + 0.1 * penalty).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=0, atol=1e-12, msg=name)


def test_a_leaf_the_model_does_not_have_is_named():
    model = ViTLike()
    select = fr.select.transformers_decay(model)
    with pytest.raises(ValueError, match=r"transformers_decay: leaf 'model.head.weight' is not a"):
        fr.select.mask({"model.head.weight": torch.ones(2, 2)}, select)
