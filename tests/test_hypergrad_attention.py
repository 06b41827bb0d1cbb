"""fr.hypergrad through scaled_dot_product_attention, whose fused CPU kernel has no double
backward: unrolled and implicit hypergradients against finite differences and against the
same model with attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional

import functorch_reg as fr

DT = torch.float64


class Attention(torch.nn.Module):
    def __init__(self, by_hand: bool = False) -> None:
        super().__init__()
        self.by_hand = by_hand
        self.qkv = torch.nn.Linear(4, 12)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 2).permute(2, 0, 3, 1, 4)
        if self.by_hand:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            attended = scores.masked_fill(~causal, -math.inf).softmax(-1) @ v
        else:
            attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).flatten(2)).mean(1)


def problem(model):
    g = torch.Generator().manual_seed(3)
    x, y, xv, yv = (torch.randn(*s, generator=g, dtype=DT) for s in [(6, 5, 4), (6, 1)] * 2)

    def train(params, lam):
        out = functional_call(model, params, (x,))
        return functional.mse_loss(out, y) + lam * fr.penalties.l2(
            params, where=fr.select.weights()
        )

    def val(params):
        return functional.mse_loss(functional_call(model, params, (xv,)), yv)

    return train, val


def models():
    torch.manual_seed(0)
    fused = Attention().to(DT)
    by_hand = Attention(by_hand=True).to(DT)
    by_hand.load_state_dict(fused.state_dict())
    return fused, by_hand


def test_unrolled_through_sdpa_matches_finite_differences_and_attention_by_hand():
    fused, by_hand = models()
    train, val = problem(fused)
    params = fr.split_module(fused)[0]
    lam, opt = torch.tensor(0.1, dtype=DT), fr.sgd(lr=0.2, momentum=0.5)
    hyper, _ = fr.hypergrad.unrolled(train, val, params, lam, opt, steps=3)

    def outcome(value: float) -> float:
        trained = fr.hypergrad.unrolled(train, val, params, torch.tensor(value, dtype=DT), opt, 3)[
            1
        ]
        return float(val(trained))

    eps = 1e-5
    finite = (outcome(0.1 + eps) - outcome(0.1 - eps)) / (2 * eps)
    assert abs(float(hyper)) > 1e-3  # not vacuous
    assert float(hyper) == pytest.approx(finite, rel=1e-6, abs=1e-9)
    train_hand, val_hand = problem(by_hand)
    expected, _ = fr.hypergrad.unrolled(
        train_hand, val_hand, fr.split_module(by_hand)[0], lam, opt, steps=3, checkpoint=True
    )
    torch.testing.assert_close(hyper, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # params are not a minimizer here
def test_implicit_through_sdpa_matches_attention_by_hand():
    fused, by_hand = models()
    lam = torch.tensor(0.1, dtype=DT)
    got = fr.hypergrad.implicit(*problem(fused), fr.split_module(fused)[0], lam, maxiter=8)
    expected = fr.hypergrad.implicit(*problem(by_hand), fr.split_module(by_hand)[0], lam, maxiter=8)
    assert float(got.abs()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_tune_through_sdpa_runs_and_moves_the_strength():
    fused, _ = models()
    train, val = problem(fused)
    result = fr.hypergrad.tune(
        train, val, fr.split_module(fused)[0], torch.tensor(0.1, dtype=DT), fr.sgd(lr=0.2),
        rounds=2, steps_per_round=2, method="unrolled", hyper_lr=0.1,
    )  # fmt: skip
    assert torch.isfinite(result.history.hypergradient).all()
    assert not torch.equal(result.strengths, torch.tensor(0.1, dtype=DT))


@pytest.mark.slow
def test_unrolled_through_a_tiny_gpt2_with_sdpa_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(DT)
    assert model.config._attn_implementation == "sdpa"  # transformers' default
    ids, val_ids = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))

    def lm_loss(params, batch):
        logits = functional_call(model, params, (batch,)).logits
        return functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    def train(params, lam):
        return lm_loss(params, ids) + lam * fr.penalties.l2(params, where=fr.select.weights())

    params, opt = fr.split_module(model)[0], fr.sgd(lr=0.5)
    hyper, _ = fr.hypergrad.unrolled(
        train, lambda p: lm_loss(p, val_ids), params, torch.tensor(0.1, dtype=DT), opt, 2
    )

    def outcome(value: float) -> float:
        lam = torch.tensor(value, dtype=DT)
        trained = fr.hypergrad.unrolled(train, lambda p: lm_loss(p, val_ids), params, lam, opt, 2)
        return float(lm_loss(trained[1], val_ids))

    eps = 1e-5
    finite = (outcome(0.1 + eps) - outcome(0.1 - eps)) / (2 * eps)
    assert float(hyper) == pytest.approx(finite, rel=1e-6, abs=1e-9)
