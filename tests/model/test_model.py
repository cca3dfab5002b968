import pytest
import torch

from slmkit.model import PRESETS, CausalLM, ConfigError, ModelConfig, resolve_model_config


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}, {"num_key_value_heads": 4},
                                {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
                                {"qkv_bias": True, "model_type": "qwen2"}])
def test_kv_cache_decoding_equals_full_forward(kw):
    torch.manual_seed(0)
    model = CausalLM(tiny(**kw)).eval()
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 32)
        parts = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]  # chunked prefill
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padded_rows_match_unpadded_forward():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    a, b = torch.randint(3, 97, (1, 9)), torch.randint(3, 97, (1, 5))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(padded)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=pos)
        assert torch.allclose(out[0], model(a)[0], atol=1e-5)
        assert torch.allclose(out[1, 4:], model(b)[0], atol=1e-5)
        assert torch.isfinite(out).all()


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


def test_tied_embeddings_share_storage_and_count_once():
    model = CausalLM(tiny())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = CausalLM(tiny(tie_word_embeddings=False))
    assert untied.num_parameters() - model.num_parameters() == 97 * 64


def test_every_projection_is_a_named_linear():
    model = CausalLM(tiny())
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_presets_span_one_to_a_hundred_million_parameters():
    sizes = {n: CausalLM(resolve_model_config(n, vocab_size=8192)).num_parameters() for n in ("micro", "large")}
    assert sizes["micro"] < 1.5e6 and 50e6 < sizes["large"] <= 110e6
    assert set(PRESETS) >= {"micro", "tiny", "small", "base", "medium", "large"}


@pytest.mark.parametrize("kw,match", [
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of"),
    ({"hidden_size": 65, "num_attention_heads": 4}, "divisible"),
    ({"model_type": "gpt2"}, "supported: llama"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_impossible_configs_are_clear_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_config_yaml_with_preset_and_overrides(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("preset: tiny\nnum_hidden_layers: 3\n")
    cfg = resolve_model_config(f, vocab_size=300)
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == PRESETS["tiny"]["hidden_size"] and cfg.vocab_size == 300
    f.write_text("preset: tiny\nnum_layers: 3\n")
    with pytest.raises(ConfigError, match="unknown config field"):
        resolve_model_config(f, vocab_size=300)
    f.write_text("preset: [unclosed\n")
    with pytest.raises(ConfigError, match="line 1"):
        resolve_model_config(f)
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config("no-such-preset")


def test_rotary_table_equals_direct_computation_and_follows_moves():
    from slmkit.model.rope import RotaryEmbedding

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})
    rot = RotaryEmbedding(cfg)
    for start, length in [(0, 5), (300, 1), (1000, 40), (3, 700)]:  # the last two grow the table
        pos = torch.arange(start, start + length)[None].expand(2, length)
        for got, want in zip(rot.for_range(start, length, 2, torch.float32), rot(pos, torch.float32)):
            assert torch.equal(got, want)
    table = rot._table
    rot.to(torch.float64)  # replaces inv_freq: the table is rebuilt from the new one
    rot.for_range(0, 4, 1, torch.float32)
    assert rot._table is not table and rot._table[0] is rot.inv_freq
