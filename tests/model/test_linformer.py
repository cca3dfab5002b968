import json

import pytest
import torch

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.model import CausalLM, ConfigError, ModelConfig
from slmkit.model.linformer import LinformerAttention, mean_pooling_projection

torch.set_num_threads(1)


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, attention_type="linformer", linformer_k=2, linformer_block=4)
    return ModelConfig(**{**base, **kw})


def linformer_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = CausalLM(tiny(**kw)).eval()
    with torch.no_grad():  # perturb E, F away from mean pooling so every test exercises learned projections
        for name, p in model.named_parameters():
            if name.endswith(("proj_k", "proj_v")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_every_layer_uses_linformer_with_projection_parameters():
    model = linformer_model()
    attns = [layer.self_attn for layer in model.model.layers]
    assert all(isinstance(a, LinformerAttention) for a in attns)
    names = {n for n, _ in model.named_parameters()}
    assert {"model.layers.0.self_attn.proj_k", "model.layers.1.self_attn.proj_v"} <= names
    assert attns[0].proj_k.shape == (2, 4)
    x = torch.randint(0, 97, (3, 13))
    assert model(x).shape == (3, 13, 97)


def test_mean_pooling_init_averages_contiguous_segments():
    p = mean_pooling_projection(2, 5)  # segments {0,1,2} and {3,4}
    assert torch.allclose(p, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 0, 0.5, 0.5]]))


@pytest.mark.parametrize("t", [0, 2, 3, 4, 7, 8, 11, 14])  # within, at the end of, and across blocks of 4
def test_causality_changing_token_t_plus_1_never_changes_positions_up_to_t(t):
    model = linformer_model()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)  # the change is seen from t+1 on


def test_summaries_are_used_past_the_first_block():
    # Changing E must change outputs that attend to a completed block, and only those.
    model = linformer_model()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        before = model(x)
        model.model.layers[0].self_attn.proj_k.mul_(2.0)
        after = model(x)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # block 0 sees no summaries
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-4)


def test_k_equal_to_block_with_identity_projections_is_full_causal_attention():
    torch.manual_seed(0)
    full = CausalLM(tiny(attention_type="full")).eval()
    lin = CausalLM(tiny(linformer_k=4, linformer_block=4)).eval()
    missing = lin.load_state_dict(full.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith(("proj_k", "proj_v")) for k in missing)
    with torch.no_grad():
        for name, p in lin.named_parameters():
            if name.endswith(("proj_k", "proj_v")):
                p.copy_(torch.eye(4))
    x = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert torch.allclose(lin(x), full(x), atol=1e-5)


def test_sequence_shorter_than_a_block_is_exact_causal_attention():
    torch.manual_seed(0)
    full = CausalLM(tiny(attention_type="full")).eval()
    lin = CausalLM(tiny(linformer_k=3, linformer_block=16)).eval()
    lin.load_state_dict(full.state_dict(), strict=False)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.allclose(lin(x), full(x), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_kv_cache_decoding_equals_full_forward(kv_heads):
    model = linformer_model(num_key_value_heads=kv_heads)
    x = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 32)
        parts = [model(x[:, :6], cache=cache), model(x[:, 6:11], cache=cache)]  # chunked, unaligned prefill
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(11, 21)]  # crosses blocks 2..5
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padding_is_masked_in_the_current_block():
    # Before the row spans a complete block, a left-padded row equals its unpadded run exactly.
    model = linformer_model(linformer_block=8, linformer_k=2)
    a, b = torch.randint(3, 97, (1, 8)), torch.randint(3, 97, (1, 5))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=pos)
        assert torch.allclose(out[0], model(a)[0], atol=1e-5)
        assert torch.allclose(out[1, 3:], model(b)[0], atol=1e-5)
        assert torch.isfinite(out).all()


def test_gradients_reach_the_sequence_projections():
    model = linformer_model().train()
    x = torch.randint(0, 97, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    for layer in model.model.layers:
        for p in (layer.self_attn.proj_k, layer.self_attn.proj_v):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_rebuilding_block_keys_in_backward_gives_the_same_gradients():
    grads = []
    for rebuild in (True, False):
        model = linformer_model().train()
        for layer in model.model.layers:
            layer.self_attn.recompute_blocks = rebuild
        x = torch.randint(0, 97, (2, 18))
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


def test_bf16_autocast_forward_and_backward():
    model = linformer_model().train()
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.model.layers[0].self_attn.proj_k.grad.isfinite().all()
    with torch.no_grad():
        assert (logits.float() - model(x)).abs().max() < 0.1  # close to fp32


def test_save_load_is_the_identity(tmp_path):
    model = linformer_model()
    save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["attention_type"] == "linformer" and cfg["linformer_k"] == 2 and cfg["linformer_block"] == 4
    loaded = load_checkpoint(tmp_path / "ck").model.eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("kw", [{"linformer_k": 0}, {"linformer_k": 5, "linformer_block": 4}])
def test_k_outside_one_to_block_size_is_a_config_error(kw):
    with pytest.raises(ConfigError, match="linformer_k"):
        tiny(**kw)


def test_pretrain_runs_with_linformer_attention(tiny_dataset, tmp_path):
    from slmkit.train import TrainConfig
    from slmkit.train.pretrain import pretrain

    spec = tmp_path / "model.yaml"
    spec.write_text("hidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                    "num_key_value_heads: 2\nattention_type: linformer\nlinformer_k: 4\nlinformer_block: 8\n")
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=0, save_every=0,
                      log_every=1, precision="fp32", eval_tokens=256, seed=7)
    res = pretrain(tiny_dataset, spec, tmp_path / "m", cfg, quiet=True)
    assert res.steps == 4
    ck = load_checkpoint(tmp_path / "m")
    assert ck.config.attention_type == "linformer"
    assert not torch.equal(ck.model.model.layers[0].self_attn.proj_k.detach(), mean_pooling_projection(4, 8))
