"""quant.int8 / quant.int4 with embeddings=true: the (tied) vocabulary matrix quantized once."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit.checkpoint import load_checkpoint, save_checkpoint, state_dict_for_save
from slmkit.compress.base import (PassError, config_to_dict, count_parameters, get_pass, make_config,
                                  state_bytes)
from slmkit.compress.qlinear import Int4Linear, Int8Linear, QuantizedEmbedding, TiedQuantizedHead
from slmkit.model import CausalLM, ModelConfig
from slmkit.model.rope import rope_inverse_frequencies
from pinned_kernels import each_kernel_choice

torch.set_num_threads(1)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# int4 g32 round-to-nearest on Gaussian-initialised weights errs ~8.5% per weight, and with the tied matrix
# quantized the logit error sits at 9.5-10.6% across seeds: seed 0 (9.5%) is checked against the 10% bound.
# int8 with the dynamic kernel adds per-token 7-bit activation rounding: 1.2% here.
CASES = [("quant.int8", {"embeddings": True, "kernel": "weight_only"}, 0.01),
         ("quant.int8", {"embeddings": True, "kernel": "dynamic"}, 0.03),
         ("quant.int4", {"group_size": 32, "embeddings": True}, 0.10)]
IDS = ["int8", "int8-dynamic", "int4-g32"]


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**TINY, **overrides})).eval()


def run_pass(model, name, options):
    cfg = make_config(name, options)
    model, report = get_pass(name).apply(model, cfg, None)
    return model, report, cfg


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def reload(model, name, cfg, report, tmp_path):
    f = tmp_path / "model.safetensors"
    save_file(state_dict_for_save(model), str(f))
    state = load_file(str(f))
    with torch.device("meta"):
        fresh = CausalLM(model.config)
    cfg = make_config(name, json.loads(json.dumps(config_to_dict(cfg))))
    fresh = get_pass(name).restructure(fresh, cfg, json.loads(json.dumps(report)))
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    assert unexpected == [] and missing == []
    fresh.tie_weights()
    fresh.model.rotary_emb.inv_freq = rope_inverse_frequencies(fresh.config)
    return fresh.eval(), f


@pytest.mark.parametrize("name,options,tol", CASES, ids=IDS)
def test_tied_embedding_contract(name, options, tol, tmp_path):
    model = tiny_model()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(x)
    total_before, _ = count_parameters(model)
    bytes_before = state_bytes(model)
    model, report, cfg = run_pass(model, name, options)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, TiedQuantizedHead)
    assert head.embedding is emb and list(head.parameters()) == [] and list(head.buffers()) == []
    assert isinstance(emb.packed, Int8Linear if cfg.bits == 8 else Int4Linear)
    assert report["embeddings"] == "tied"
    assert report["embedding_bytes_before"] == 96 * 64 * 4
    assert report["embedding_bytes_after"] < report["embedding_bytes_before"] / 3
    assert count_parameters(model)[0] == total_before  # V·d once
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and rel(out, ref) < tol
    # the gather equals the dense dequantized table's rows; the head's logits equal x·Wᵀ
    with torch.no_grad():
        assert torch.allclose(emb(x), emb.dequantize()[x], atol=1e-6)
        h = torch.randn(2, 40, 64)  # many rows: the exact dequantize path (weight_only)
        if options.get("kernel") == "dynamic":  # per-token 7-bit activations (bound: test_int8_kernels.py)
            assert rel(head(h), h @ emb.dequantize().t()) < 0.02  # measured 1.1% on Gaussian rows
        else:
            assert torch.allclose(head(h), h @ emb.dequantize().t(), atol=1e-4)
    fresh, f = reload(model, name, cfg, report, tmp_path)
    saved = load_file(str(f))
    assert not any(k.startswith("lm_head.") for k in saved)
    emb_keys = [k for k in saved if k.startswith("model.embed_tokens.")]
    assert sorted(emb_keys) == sorted(f"model.embed_tokens.packed.{n}" for n in emb.packed.state_dict())
    assert state_bytes(model) == sum(t.numel() * t.element_size() for t in saved.values()) < bytes_before
    assert isinstance(fresh.lm_head, TiedQuantizedHead) and fresh.lm_head.embedding is fresh.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert count_parameters(fresh)[0] == total_before


@pytest.mark.parametrize("name,options,tol", CASES, ids=IDS)
def test_kv_cache_decode_equals_full_forward(name, options, tol):
    model, _, _ = run_pass(tiny_model(), name, options)
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.kernel_dtype = torch.float32  # bit-faithful kernels: decode steps use them, the full forward does not
            m.kernel_choice = "packed"  # never the measured dense path: this test is about the kernels
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        parts = [model(x[:, :6], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    if options.get("kernel") == "dynamic":
        # Rows are quantized independently, so the prefill equals the full forward up to the attention's own
        # float rounding over 6 keys instead of 10 (measured: 2.4e-7 with some seeds, 0 with others). In the decode
        # steps a 2e-8 difference of the attention output moved one o_proj activation across a 7-bit rounding
        # boundary, and this random model's tiny residual stream (RMSNorm divides by ~0.02) amplifies that
        # step to ~1%: the scale of the kernel's own error against fp32 (1.2% above), not a cache bug.
        assert torch.allclose(parts[0], full[:, :6], rtol=0, atol=1e-5)
        assert rel(torch.cat(parts, 1), full) < 0.02
    else:
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-4)


def test_untied_embeddings_quantize_lm_head_as_a_target(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = model(x)
    model, report, cfg = run_pass(model, "quant.int8", {"embeddings": True, "kernel": "weight_only"})
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert "lm_head" in report["modules"] and report["embeddings"] == "untied"
    with torch.no_grad():
        out = model(x)
    assert rel(out, ref) < 0.01
    fresh, _ = reload(model, "quant.int8", cfg, report, tmp_path)
    for m in (*model.modules(), *fresh.modules()):
        if isinstance(m, Int8Linear):  # the same path in both: `auto` decides by timing, which differs run to run
            m.kernel_choice = "packed"
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_through_the_driver(tmp_path):
    from slmkit.compress.run import compress, parse_pass

    model = tiny_model()
    tok = tmp_path / "tok"  # the driver copies the input's tokenizer.json; its content is never read here
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    save_checkpoint(model, tmp_path / "in", tokenizer_from=tok)
    compress(tmp_path / "in", tmp_path / "out", [parse_pass("quant.int4:group_size=32,embeddings=true")], speed=False)
    loaded = load_checkpoint(tmp_path / "out").model
    assert isinstance(loaded.lm_head, TiedQuantizedHead) and loaded.lm_head.embedding is loaded.model.embed_tokens
    mem, report, _ = run_pass(tiny_model(), "quant.int4", {"group_size": 32, "embeddings": True})
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), mem(x))
        for choice in each_kernel_choice(loaded, mem):  # the kernel path too, both models on each kernel
            assert torch.equal(loaded(x[:, :1]), mem(x[:, :1])), choice


def test_errors():
    # 32 does not divide hidden_size=48: the tied table (and gate_proj) fall back to group 16, on record
    model, report, _ = run_pass(tiny_model(hidden_size=48, num_attention_heads=4, num_key_value_heads=2),
                                "quant.int4", {"group_size": 32, "embeddings": True, "targets": ("gate_proj",)})
    assert report["fallbacks"]["model.embed_tokens"]["group_size"] == 16
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert {n for n in report["fallbacks"]} == {"model.embed_tokens", "model.layers.0.mlp.gate_proj",
                                                "model.layers.1.mlp.gate_proj"}
    with pytest.raises(PassError, match="embeddings"):
        make_config("quant.gptq", {"embeddings": "true"})
    with pytest.raises(PassError, match="embeddings"):
        make_config("quant.int8", {"embeddings": "maybe"})
    model, _, _ = run_pass(tiny_model(), "quant.int8", {"embeddings": True})
    with pytest.raises(PassError, match="embeddings"):
        run_pass(model, "quant.int4", {"group_size": 32, "embeddings": True, "targets": ("lm_head",)})
    # without embeddings=true a tied lm_head target is still refused
    with pytest.raises(PassError, match="lm_head"):
        run_pass(tiny_model(), "quant.int8", {"targets": ("lm_head",)})
