"""Chunked cross-entropy fused with the output head: the same value and gradients as the plain loss over full
logits, for any chunk size, masked labels, a bias, tied embeddings and bf16 autocast; lm_step takes it when it
can and falls back to the plain path when it cannot."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.model import CausalLM, ModelConfig
from slmkit.train.chunked_losses import (ENV_BUDGET_MB, ENV_ENABLE, ENV_ROWS, OutputHead, chunk_rows,
                                         chunked_cross_entropy, output_head)
from slmkit.train.steps import lm_step


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    return ModelConfig(**{**base, **kw})


def plain_ce(h, w, b, labels):
    return F.cross_entropy(F.linear(h, w, b).float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("rows", [1, 5, 16, 23, 24, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_plain_value_and_gradients(rows, with_bias):
    torch.manual_seed(0)
    h = torch.randn(3, 8, 16, requires_grad=True)  # 24 rows: some chunk sizes divide it, most don't
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (3, 8))
    labels[0, :3] = -100
    labels[2, 5] = -100
    ref = plain_ce(h, w, b, labels)
    got = chunked_cross_entropy(h, OutputHead(w, b), labels, rows=rows)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads(got, (h, w, b)), grads(ref, (h, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_in_float64_matches_to_rounding():
    torch.manual_seed(1)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 10, 0, -100, 7])
    got = chunked_cross_entropy(h, OutputHead(w), labels, rows=3)
    ref = F.cross_entropy(F.linear(h, w), labels, ignore_index=-100)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads(got, (h, w)), grads(ref, (h, w))):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_backward_runs_once_and_says_what_to_do_otherwise():
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)
    loss = chunked_cross_entropy(h, OutputHead(w), torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="SLMKIT_CHUNKED_LOSS=0"):
        loss.backward()


def test_all_labels_ignored_gives_nan_like_plain_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.full((4,), -100)
    assert torch.isnan(plain_ce(h, w, None, labels)) and torch.isnan(chunked_cross_entropy(h, OutputHead(w), labels))


def test_chunked_cross_entropy_under_bf16_autocast_matches_plain_autocast():
    torch.manual_seed(2)
    h = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    labels[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain_ce(h, w, None, labels)
        got = chunked_cross_entropy(h, OutputHead(w), labels, rows=9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    for g, r in zip(grads(got, (h, w)), grads(ref, (h, w))):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


def test_no_grad_and_frozen_weight():
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4)  # a frozen head: only hidden gets a gradient
    labels = torch.randint(0, 9, (6,))
    with torch.no_grad():
        got = chunked_cross_entropy(h, OutputHead(w), labels, rows=4)
        torch.testing.assert_close(got, plain_ce(h, w, None, labels))
    (g,) = torch.autograd.grad(chunked_cross_entropy(h, OutputHead(w), labels, rows=4), h)
    (r,) = torch.autograd.grad(plain_ce(h, w, None, labels), h)
    torch.testing.assert_close(g, r)


def test_chunk_rows_from_budget_and_overrides(monkeypatch):
    monkeypatch.delenv(ENV_ROWS, raising=False)
    monkeypatch.delenv(ENV_BUDGET_MB, raising=False)
    # 256 MiB over 2.5 fp32 rows of 49,152 logits: 546 rows, rounded down to a multiple of 16
    assert chunk_rows(2048, 49152, 2.5) == 544
    assert chunk_rows(100, 49152, 2.5) == 100  # never more rows than there are
    assert chunk_rows(2048, 49152, 10, budget_bytes=10 * 49152 * 4 * 3) == 3
    monkeypatch.setenv(ENV_BUDGET_MB, "64")
    assert chunk_rows(2048, 49152, 2.5) == 128
    monkeypatch.setenv(ENV_ROWS, "100")
    assert chunk_rows(2048, 49152, 2.5) == 100
    monkeypatch.setenv(ENV_ROWS, "0")
    with pytest.raises(ValueError, match=ENV_ROWS):
        chunk_rows(2048, 49152, 2.5)


# -- lm_step on a model --------------------------------------------------------------------------------

def step_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, metrics = lm_step(model, batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model, batch, monkeypatch, *, rtol=1e-5, atol=1e-6, rows="7"):
    monkeypatch.setenv(ENV_ROWS, rows)
    monkeypatch.setenv(ENV_ENABLE, "1")
    loss, metrics, g = step_and_grads(model, batch)
    monkeypatch.setenv(ENV_ENABLE, "0")
    ref_loss, ref_metrics, ref_g = step_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k].float(), ref_metrics[k].float(), rtol=rtol, atol=atol)
    assert g.keys() == ref_g.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def batch_for(config, B=3, T=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


@pytest.mark.parametrize("tied", [False, True])
def test_lm_step_chunked_equals_plain_including_every_gradient(tied, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=tied)
    model = CausalLM(config)
    assert output_head(model) is not None
    assert (output_head(model).weight is model.model.embed_tokens.weight) == tied
    assert_same_step(model, batch_for(config), monkeypatch)


def test_lm_step_moe_keeps_its_auxiliary_loss(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(num_local_experts=4, num_experts_per_tok=2)
    model = CausalLM(config)
    _, metrics = lm_step(model, batch_for(config))
    assert "aux_loss" in metrics
    assert_same_step(model, batch_for(config), monkeypatch)


def test_lm_step_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config()
    model = CausalLM(config)
    batch = batch_for(config)
    monkeypatch.setenv(ENV_ROWS, "7")
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV_ENABLE, flag)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = lm_step(model, batch)
        loss.backward()
        out[flag] = (loss.detach(), model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
    for a, b in zip(out["1"], out["0"]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-3)


class HeadWithHook(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


class EffectiveWeightHead(nn.Module):
    """Like a quantization-aware-training wrapper: forward = F.linear(x, effective_weight())."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = None

    def effective_weight(self):
        return self.weight * 0.5  # a differentiable function of the stored weight

    def forward(self, x):
        return F.linear(x, self.effective_weight())


def test_head_kinds_take_the_right_path(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config()
    model = CausalLM(config)
    batch = batch_for(config)
    model.lm_head = EffectiveWeightHead(model.lm_head)
    assert output_head(model) is not None
    assert_same_step(model, batch, monkeypatch)  # gradients flow through effective_weight()
    model.lm_head = HeadWithHook(nn.Linear(32, 97, bias=False))
    assert output_head(model) is None  # unknown head: the plain path calls it
    plain = CausalLM(config)
    plain.lm_head.register_forward_hook(lambda *a: None)
    assert output_head(plain) is None


def test_lora_on_the_head_falls_back_to_the_plain_path():
    from slmkit.align.lora import LoRAConfig, apply_lora

    model = CausalLM(tiny_config(tie_word_embeddings=False))
    apply_lora(model, LoRAConfig(targets=("lm_head",)))
    assert output_head(model) is None
    loss, _ = lm_step(model, batch_for(model.config))
    assert torch.isfinite(loss)


def test_forward_return_final_hidden_is_the_normed_state():
    torch.manual_seed(0)
    model = CausalLM(tiny_config())
    ids = torch.randint(0, 97, (2, 6))
    logits, hidden = model(ids, return_hidden_states=True)
    h = model(ids, return_final_hidden=True)
    assert h.shape == (2, 6, 32)
    torch.testing.assert_close(h, hidden[-1])
    torch.testing.assert_close(model.lm_head(h), logits)
    torch.testing.assert_close(model(ids, return_final_hidden=True, last_only=True), h[:, -1:])
