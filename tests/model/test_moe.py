"""Sparse mixture of experts (slmkit/model/moe.py): routing, grouped dispatch, auxiliary losses, and the MoE model
through the cache, checkpoints, training and compression."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.model import CausalLM, ConfigError, ModelConfig
from slmkit.model.moe import SparseMoE, active_parameters

torch.set_num_threads(1)


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    return ModelConfig(**{**base, **kw})


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: each token on its own, softmax -> top-k -> renormalise -> weighted sum of its experts."""
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t in range(flat.shape[0]):
        probs = F.softmax(moe.gate(flat[t]).float(), dim=-1)
        w, idx = torch.topk(probs, moe.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx.tolist()):
            flat_out[t] += weight * moe.experts[e](flat[t])
    return out


@pytest.mark.parametrize("experts,k", [(4, 2), (4, 1), (3, 3), (8, 2)])
def test_grouped_dispatch_equals_per_token_reference(experts, k):
    torch.manual_seed(0)
    moe = SparseMoE(tiny(num_local_experts=experts, num_experts_per_tok=k)).eval()
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        got, want = moe(x), naive_moe(moe, x)
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-5)
    assert moe.expert_counts.tolist() == torch.bincount(
        torch.topk(moe.gate(x.reshape(-1, 64)), k).indices.flatten(), minlength=experts).tolist()
    assert int(moe.expert_counts.sum()) == 3 * 11 * k


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    x = torch.randint(0, 97, (2, 18))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 24)
        parts = [model(x[:, :6], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(6, 18)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def hand_router() -> SparseMoE:
    """E=3, k=2, router logits = the first three input features."""
    moe = SparseMoE(ModelConfig(hidden_size=4, num_attention_heads=2, intermediate_size=4, num_local_experts=3,
                                num_experts_per_tok=2, router_aux_loss_coef=1.0, router_z_loss_coef=0.0))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3, 4))
    return moe


# Token 1: logits (ln 4, ln 2, 0) -> probs (4, 2, 1)/7, experts {0, 1}.
# Token 2: logits (0, ln 4, ln 2) -> probs (1, 4, 2)/7, experts {1, 2}.
HAND_X = torch.tensor([[[math.log(4), math.log(2), 0.0, 5.0], [0.0, math.log(4), math.log(2), -3.0]]])


def test_load_balancing_loss_hand_value():
    moe = hand_router().train()
    moe(HAND_X)
    # f = assignments per expert / N = (1, 2, 1)/2; P = mean probability = (5, 6, 3)/14
    # loss = E * sum f P = 3 * (5 + 12 + 3) / 28 = 15/7
    assert moe.expert_counts.tolist() == [1, 2, 1]
    assert moe.aux_loss.item() == pytest.approx(15 / 7, abs=1e-6)
    # the same value as transformers' Mixtral, so router_aux_loss_coef carries over on import
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    with torch.no_grad():
        hf = load_balancing_loss_func((moe.gate(HAND_X.reshape(-1, 4)),), 3, 2)
    assert float(hf) == pytest.approx(15 / 7, abs=1e-6)


def test_router_z_loss_hand_value_and_coefficients():
    moe = hand_router().train()
    moe.router_aux_loss_coef, moe.router_z_loss_coef = 0.0, 1.0
    moe(HAND_X)
    # logsumexp of either token's logits is ln 7
    assert moe.aux_loss.item() == pytest.approx(math.log(7) ** 2, abs=1e-5)
    moe.router_aux_loss_coef, moe.router_z_loss_coef = 0.1, 0.01
    moe(HAND_X)
    assert moe.aux_loss.item() == pytest.approx(0.1 * 15 / 7 + 0.01 * math.log(7) ** 2, abs=1e-6)


def test_aux_loss_only_in_training():
    torch.manual_seed(0)
    model = CausalLM(tiny())
    x = torch.randint(0, 97, (2, 8))
    model.train()
    model(x)
    aux = model.auxiliary_loss()
    assert aux is not None and aux.item() > 0 and aux.requires_grad
    per_layer = [layer.mlp.aux_loss for layer in model.model.layers]
    assert torch.allclose(aux, sum(per_layer))
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(layer.mlp.aux_loss is None for layer in model.model.layers)
    assert model.auxiliary_loss() is None


def test_gradients_reach_router_and_every_selected_expert():
    torch.manual_seed(0)
    moe = SparseMoE(tiny(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0,
                         router_z_loss_coef=0.0)).train()
    x = torch.randn(1, 5, 64)  # 10 assignments over 8 experts: some experts are never chosen
    moe(x).pow(2).sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0  # through the weights
    counts = moe.expert_counts.tolist()
    assert 0 in counts
    for e, expert in enumerate(moe.experts):
        for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
            if counts[e]:
                assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
            else:
                assert proj.weight.grad is None
    # the auxiliary loss alone also trains the router
    moe.zero_grad()
    moe.router_aux_loss_coef = 0.01
    moe(x)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = CausalLM(tiny()).train()
    x = torch.randint(0, 97, (2, 12))
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        aux = model.auxiliary_loss()
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.05
    assert aux.dtype == torch.float32 and torch.isfinite(aux)


def test_meta_construction_and_assign_load():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    with torch.device("meta"):
        empty = CausalLM(tiny())
    assert all(p.is_meta for p in empty.parameters())
    empty.load_state_dict(model.state_dict(), assign=True)
    empty.tie_weights()
    empty.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq
    x = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), model(x))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=3 must be between 1 and num_local_experts=2"):
        tiny(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=0 must be between 1"):
        tiny(num_experts_per_tok=0)
    with pytest.raises(ConfigError, match="num_local_experts=-1"):
        tiny(num_local_experts=-1)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        tiny(router_aux_loss_coef=-0.1)


def test_active_parameters_hand_value():
    config = tiny(num_local_experts=4, num_experts_per_tok=1)
    model = CausalLM(config)
    d, f, L, V = 64, 32, 2, 97
    expert = 3 * d * f
    attn = d * 64 + 2 * d * 32 + 64 * d  # q, k and v (2 kv heads of 16), o
    total = V * d + L * (2 * d + attn + d * 4 + 4 * expert) + d  # tied embeddings, 2 norms/layer, router, final norm
    assert model.num_parameters() == total
    assert active_parameters(model) == total - L * 3 * expert  # each token skips 3 of 4 experts
    dense = CausalLM(tiny(num_local_experts=0))
    assert active_parameters(dense) == dense.num_parameters()


def test_checkpoint_round_trip_is_identity(tmp_path):
    from slmkit.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    save_checkpoint(model, tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["num_local_experts"] == 4 and saved["num_experts_per_tok"] == 2
    loaded = load_checkpoint(tmp_path / "ck").model
    assert isinstance(loaded.model.layers[0].mlp, SparseMoE)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in b and "model.layers.0.mlp.gate.weight" in b
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_int8_compression_swaps_expert_projections(tmp_path):
    from slmkit.checkpoint import load_checkpoint, save_checkpoint
    from slmkit.compress.base import config_to_dict, get_pass, make_config, state_bytes

    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    before = state_bytes(model)
    int8, cfg = get_pass("quant.int8"), make_config("quant.int8", {})
    quantized, report = int8.apply(copy.deepcopy(model), cfg)
    assert state_bytes(quantized) < before / 2
    # saved with the pass recorded, loading replays it on a meta model (the path `slm compress` takes)
    save_checkpoint(quantized, tmp_path / "q8",
                    provenance={"passes": [{"name": "quant.int8", "config": config_to_dict(cfg), "report": report}]})
    q = load_checkpoint(tmp_path / "q8").model
    assert active_parameters(q) == active_parameters(model)  # int8 experts still count by their weights
    moe = q.model.layers[0].mlp
    assert type(moe.gate) is torch.nn.Linear  # the router is not a target and stays exact
    for expert in moe.experts:
        for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
            assert type(proj) is not torch.nn.Linear  # swapped for the int8 module
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_pretrain_logs_aux_loss(tmp_path):
    from slmkit.data import build_dataset
    from slmkit.train.config import TrainConfig
    from slmkit.train.pretrain import pretrain

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ("contract", "party", "clause", "term", "notice", "payment", "shall", "agreement", "the", "of")
    for i in range(6):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1500))
        (corpus / f"doc{i}.txt").write_text(text + "\n")
    build_dataset([str(corpus)], tmp_path / "ds", vocab_size=300, val_fraction=0.2, progress=False)
    spec = tmp_path / "moe.yaml"
    spec.write_text("hidden_size: 32\nintermediate_size: 32\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                    "num_key_value_heads: 2\nnum_local_experts: 4\nnum_experts_per_tok: 2\n")
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0, eval_tokens=256,
                      save_every=0, log_every=1, precision="fp32", device="cpu")
    result = pretrain(tmp_path / "ds", spec, tmp_path / "run", cfg, quiet=True)
    assert result.steps == 4
    # near-uniform routing at init: balance ~1 per layer x 0.01, plus z-loss ~ 0.001 (ln 4)^2 per layer
    assert all(0.015 < r["aux_loss"] < 0.05 for r in result.history)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_loss" in r for r in logged)
    from slmkit.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run")
    assert ck.config.num_local_experts == 4
    active = active_parameters(ck.model)
    assert active < ck.model.num_parameters()

    # `slm info` reports both counts
    from typer.testing import CliRunner

    from slmkit.cli import app

    r = CliRunner().invoke(app, ["info", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["active_parameters"] == active and info["total_parameters"] == ck.model.num_parameters()
    r = CliRunner().invoke(app, ["info", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert f"total {ck.model.num_parameters():,}, active per token {active:,}" in r.output
