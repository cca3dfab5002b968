import json
import os
import subprocess
import sys

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


@pytest.mark.parametrize("window", [None, 1])
@pytest.mark.parametrize("t", [0, 2, 3, 4, 7, 8, 11, 14])  # within, at the end of, and across blocks of 4
def test_causality_changing_token_t_plus_1_never_changes_positions_up_to_t(t, window):
    model = linformer_model(linformer_window=window)
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


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_kv_cache_decoding_equals_full_forward(kv_heads, window):
    # The full forward takes the batched path once T >= (W + 2) b; decoding goes block by block.
    model = linformer_model(num_key_value_heads=kv_heads, linformer_window=window)
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


def reference_attention(layer, q, k, v):
    """The module docstring's definition, query by query: [mean of the summaries of blocks 0..j-W-1] +
    [summaries of blocks j-W..j-1] + [raw keys of block j up to t], one softmax."""
    B, H, T, hd = q.shape
    b, W, g = layer.block, layer.window, H // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(T):
        j = t // b
        summaries = [(layer.proj_k @ k[:, :, i * b:(i + 1) * b], layer.proj_v @ v[:, :, i * b:(i + 1) * b])
                     for i in range(j)]
        lo = 0 if W is None else max(0, j - W)
        keys, values = [], []
        if lo > 0:
            keys.append(torch.stack([s[0] for s in summaries[:lo]]).mean(0))
            values.append(torch.stack([s[1] for s in summaries[:lo]]).mean(0))
        keys += [s[0] for s in summaries[lo:]] + [k[:, :, j * b:t + 1]]
        values += [s[1] for s in summaries[lo:]] + [v[:, :, j * b:t + 1]]
        kk, vv = torch.cat(keys, 2).repeat_interleave(g, 1), torch.cat(values, 2).repeat_interleave(g, 1)
        w = torch.softmax(q[:, :, t:t + 1] @ kk.transpose(-1, -2) / hd ** 0.5, dim=-1)
        out[:, :, t:t + 1] = w @ vv
    return out


@pytest.mark.parametrize("window", [None, 0, 1, 2])
@pytest.mark.parametrize("T", [7, 12, 16, 19])
def test_attention_matches_the_definition_query_by_query(window, T):
    layer = linformer_model(linformer_window=window).model.layers[0].self_attn
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    with torch.no_grad():
        want = reference_attention(layer, q, k, v)
        got = layer.blockwise_attention(q, k, v, 0, None)
        assert torch.allclose(got, want, atol=1e-5)
        if window is not None and T >= (window + 2) * 4:
            batched = layer.windowed_attention(q, k, v).view(2, T, 4, 16).transpose(1, 2)
            assert torch.allclose(batched, want, atol=1e-5)


def test_with_a_window_every_query_sees_a_bounded_number_of_keys(monkeypatch):
    layer = linformer_model(linformer_window=1).model.layers[0].self_attn
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(k.shape[2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for T in (16, 64, 256):
        seen.clear()
        x = torch.randn(1, T, 64)
        with torch.no_grad():
            layer(x, CausalLM(tiny()).model.rotary_emb(torch.arange(T)[None], torch.float32), None)
        assert max(seen) == (1 + 1) * 2 + 4  # far-past mean (k) + one window block (k) + raw block (b)


@pytest.mark.parametrize("window,T", [(0, 8), (0, 23), (1, 12), (1, 18), (2, 23), (2, 24)])
def test_batched_blocks_give_the_same_gradients_as_block_by_block(window, T):
    # The batched path (windowed_attention) runs once T >= (W + 2) b; b = 4 here.
    layer = linformer_model(linformer_window=window).model.layers[0].self_attn
    torch.manual_seed(2)
    qkv = [torch.randn(2, 4, T, 16, requires_grad=True)] + [torch.randn(2, 2, T, 16, requires_grad=True)
                                                           for _ in range(2)]
    wrt = qkv + [layer.proj_k, layer.proj_v]
    grad_out = torch.randn(2, T, 64)
    a = layer.windowed_attention(*qkv)
    b = layer.blockwise_attention(*qkv, 0, None).transpose(1, 2).reshape(2, T, 64)
    assert torch.allclose(a, b, atol=1e-6)
    for ga, gb in zip(torch.autograd.grad(a, wrt, grad_out), torch.autograd.grad(b, wrt, grad_out)):
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,kv_heads,T", [(None, 2, 18), (0, 2, 23), (1, 4, 23), (2, 2, 24), (4, 2, 9)])
def test_block_scan_gives_the_same_outputs_and_gradients(window, kv_heads, T):
    results = []
    for recompute in (True, False):
        model = linformer_model(linformer_window=window, num_key_value_heads=kv_heads,
                                linformer_recompute=recompute).train()
        x = torch.randint(0, 97, (2, T))
        torch.manual_seed(3)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n


def test_block_scan_keeps_only_its_input_and_the_block_summaries():
    # What autograd holds for backward, in bytes: the scan keeps x, the rotary tables, parameters and the
    # summaries (k/b of the keys and values); the plain path keeps activations the size of q, k and v.
    T, b, kr = 64, 8, 2
    saved = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        cfg = tiny(linformer_block=b, linformer_k=kr, linformer_window=1, linformer_recompute=recompute)
        layer = LinformerAttention(cfg, 0)
        x = torch.randn(1, T, 64, requires_grad=True)
        rope = CausalLM(cfg).model.rotary_emb(torch.arange(T)[None], torch.float32)
        known = {x.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr()} | {p.data_ptr() for p in layer.parameters()}
        total = []

        def pack(t):
            if t.data_ptr() not in known:
                total.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, rope, None)
        saved[recompute] = sum(total)
    summaries = 2 * (T // b - 1) * kr * 2 * 16 * 4  # keys and values, 7 blocks, 2 kv heads of 16, fp32
    assert saved[True] == summaries
    assert saved[False] > 8 * saved[True]


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_autocast_forward_and_backward(recompute):
    model = linformer_model(linformer_recompute=recompute, linformer_window=1).train()
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


@pytest.mark.parametrize("window", [-1, 1.5, "4"])
def test_window_must_be_a_non_negative_integer_or_null(window):
    with pytest.raises(ConfigError, match="linformer_window"):
        tiny(linformer_window=window)


def test_checkpoints_saved_before_the_window_keep_every_block(tmp_path):
    model = linformer_model(linformer_window=None)
    save_checkpoint(model, tmp_path / "ck")
    path = tmp_path / "ck" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["linformer_window"], cfg["linformer_recompute"]  # as written before these fields existed
    path.write_text(json.dumps(cfg))
    assert load_checkpoint(tmp_path / "ck", verify=False).config.linformer_window is None
    assert tiny().linformer_window == 4  # new models get the linear-cost default


@pytest.mark.parametrize("recompute", [False, True])
def test_pretrain_runs_with_linformer_attention(tiny_dataset, tmp_path, recompute):
    from slmkit.train import TrainConfig
    from slmkit.train.pretrain import pretrain

    spec = tmp_path / "model.yaml"
    spec.write_text("hidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                    "num_key_value_heads: 2\nattention_type: linformer\nlinformer_k: 4\nlinformer_block: 8\n"
                    f"linformer_window: 1\nlinformer_recompute: {str(recompute).lower()}\n")
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=0, save_every=0,
                      log_every=1, precision="fp32", eval_tokens=256, seed=7)
    res = pretrain(tiny_dataset, spec, tmp_path / "m", cfg, quiet=True)
    assert res.steps == 4
    ck = load_checkpoint(tmp_path / "m")
    assert ck.config.attention_type == "linformer"
    assert not torch.equal(ck.model.model.layers[0].self_attn.proj_k.detach(), mean_pooling_projection(4, 8))


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_compile_gives_the_same_outputs_and_gradients(recompute):
    # Under compile the block scan steps aside (its backward calls autograd itself) for the batched path.
    model = linformer_model(linformer_block=8, linformer_window=1, linformer_recompute=recompute).train()
    x = torch.randint(0, 97, (2, 40))
    eager = model(x)
    eager.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")(x)
    compiled.square().mean().backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-5), n


def test_slm_info_describes_the_linformer_attention(tmp_path):
    save_checkpoint(linformer_model(linformer_window=1), tmp_path / "ck")
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "info", str(tmp_path / "ck")], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "Linformer: blocks of 4 compressed to 2 rows, window 1 blocks + running mean" in r.stdout


def test_decoding_summarises_each_completed_block_once(monkeypatch):
    model = linformer_model(linformer_window=1)
    compressed = []
    real = LinformerAttention.compress

    def spy(self, x, proj, n_blocks):
        if self.layer_idx == 0 and proj is self.proj_k:
            compressed.append(n_blocks)
        return real(self, x, proj, n_blocks)

    monkeypatch.setattr(LinformerAttention, "compress", spy)
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(x[:, :9], cache=cache)  # blocks 0, 1 complete before the last query's block
        for t in range(9, 30):
            model(x[:, t:t + 1], cache=cache)
    assert sum(compressed) == (30 - 1) // 4  # 7 blocks, each compressed once, not once per step
