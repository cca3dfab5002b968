"""Phi-3 and Mixtral interop: both directions give transformers' logits (max abs diff <= 1e-4 in fp32), the
round trip gives back the same checkpoint names, and imported models decode with the KV cache as they
compute in one pass."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slmkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmkit.export import HFExportError, export_hf, import_hf  # noqa: E402
from slmkit.model import CausalLM, ModelConfig  # noqa: E402
from slmkit.model.moe import SparseMoE  # noqa: E402
from hf_helpers import hf_logits, max_diff

torch.set_num_threads(1)

TOL = 1e-4
VOCAB = 300  # the conftest tokenizer's size
HF_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rms_norm_eps=1e-5, sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=True)),
}


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights away from 1 (a dropped or misnamed norm shows in the logits), router and expert weights 5x
    larger than their init, so routing is decisive and a swapped expert or w1/w3 shows far above TOL."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
        elif ".experts." in name or name.endswith("mlp.gate.weight"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_hf(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**HF_TINY, **kwargs, **overrides})
    return perturb_(getattr(transformers, model_cls)(config)).eval()


def save_hf(model, path, tokenizer_dir):
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))  # (B, T)


def tensor_names(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


# -- import -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(family, tmp_path, tokenizer_dir):
    hf = make_hf(family)
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    ids = batch()
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf_logits(hf, ids)) <= TOL
    c = ckpt.config
    assert c.model_type == family and not (c.qkv_bias or c.attention_bias or c.mlp_bias)
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    layer = ckpt.model.model.layers[1]
    if family == "phi3":  # fused projections arrive split, as plain Linears a compression pass can find
        fused = hf.model.layers[1]
        q, k, v = (getattr(layer.self_attn, f"{p}_proj").weight for p in "qkv")
        assert torch.equal(torch.cat([q, k, v]), fused.self_attn.qkv_proj.weight)
        assert torch.equal(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                           fused.mlp.gate_up_proj.weight)
        assert c.rope_theta == 10000.0 and c.extra["original_max_position_embeddings"] == 4096
    else:
        assert isinstance(layer.mlp, SparseMoE) and type(layer.mlp.experts[3].down_proj) is torch.nn.Linear
        assert (c.num_local_experts, c.num_experts_per_tok, c.rope_theta) == (4, 2, 1e6)
        assert c.router_aux_loss_coef == hf.config.router_aux_loss_coef and c.router_z_loss_coef == 0.0
    assert ckpt.provenance["stages"][0]["model_type"] == family
    assert ckpt.tokenizer().encode("def f").ids


def test_mixtral_router_chooses_the_same_experts(tmp_path, tokenizer_dir):
    hf = make_hf("mixtral")
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    model = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt")).model
    ours, theirs = [], []
    for layer, hf_layer in zip(model.model.layers, hf.model.layers):
        route = layer.mlp.route
        layer.mlp.route = lambda x, route=route: ours.append(route(x)) or ours[-1]
        hf_layer.mlp.gate.register_forward_hook(lambda mod, args, out: theirs.append(out))
    ids = batch(seed=3)
    with torch.no_grad():
        model(ids), hf(ids)
    assert len(ours) == len(theirs) == 2
    for (_, _, chosen, weights), (_, hf_weights, hf_chosen) in zip(ours, theirs):
        assert chosen.shape == (ids.numel(), 2)
        assert torch.equal(chosen.sort(-1).values, hf_chosen.sort(-1).values)  # same experts for every token
        assert torch.allclose(weights.gather(-1, chosen.argsort(-1)), hf_weights.gather(-1, hf_chosen.argsort(-1)),
                              atol=1e-6)
        assert len(set(chosen.flatten().tolist())) > 1  # routing is not degenerate


def test_import_mixtral_fused_expert_layout(tmp_path):
    """transformers 5 holds experts as 3-D tensors; a checkpoint saved in that layout imports too."""
    from safetensors.torch import save_file

    hf = make_hf("mixtral", tie_word_embeddings=False)
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # (E, 2F, d) in this transformers version
    hf.config.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "hf" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    ids = batch()
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_decodes_with_kv_cache(family, tmp_path, tokenizer_dir):
    hf = make_hf(family)
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    model = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt")).model
    ids = batch(seed=5)[:, :16]  # (B, T)
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        steps = [model(ids[:, :10], cache=cache)]  # prefill 10, then decode one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, ids.shape[1])]
    assert cache.length == ids.shape[1]
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL


# -- export -------------------------------------------------------------------------------------

SLM_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
EXPORT_CASES = {
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, sliding_window=None),
    "phi3-tied": dict(model_type="phi3", tie_word_embeddings=True, rope_theta=5e5, head_dim=32, num_key_value_heads=1),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}


def make_checkpoint(path, tokenizer_dir, **overrides):
    torch.manual_seed(0)
    model = perturb_(CausalLM(ModelConfig(**{**SLM_TINY, **overrides}))).eval()
    save_checkpoint(model, path, tokenizer_from=tokenizer_dir)
    return model


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_matches_transformers(case, tmp_path, tokenizer_dir):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, **EXPORT_CASES[case])
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    family = model.config.model_type
    assert type(hf).__name__ == {"phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
    ids = batch()
    with torch.no_grad():
        assert max_diff(model(ids), hf_logits(hf, ids)) <= TOL
    cfg = json.loads((out / "config.json").read_text())
    names = tensor_names(out)
    assert ("lm_head.weight" in names) == (not model.config.tie_word_embeddings)
    if family == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
        assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)
        assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0 and cfg["rope_theta"] == model.config.rope_theta
    else:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
        assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == 2
        assert cfg["router_jitter_noise"] == 0.0 and "router_z_loss_coef" not in cfg
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("def add(a, b):")["input_ids"] == load_checkpoint(tmp_path / "ckpt").tokenizer().encode(
        "def add(a, b):").ids


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_import_export(family, tmp_path, tokenizer_dir):
    hf = make_hf(family)
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf2")
    ids = batch()
    assert max_diff(hf_logits(out, ids), hf_logits(hf, ids)) == 0.0
    assert tensor_names(out) == tensor_names(tmp_path / "hf")  # the same checkpoint layout as save_pretrained
    again = transformers.AutoConfig.from_pretrained(out)
    assert type(again) is type(hf.config)
    assert again.rope_parameters == hf.config.rope_parameters


# -- refusals and warnings ----------------------------------------------------------------------

def write_config(path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**HF_TINY, **fields}))
    return path


@pytest.mark.parametrize("rope, match", [
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     r"Phi-3 rope scaling 'su' \(LongRoPE.*not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8}}, "Phi-3 rope scaling 'longrope'"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 .*only full rotary"),
])
def test_import_refuses_unsupported_phi3_rope(rope, match, tmp_path):
    d = write_config(tmp_path / "hf", model_type="phi3", **rope)
    with pytest.raises(HFExportError, match=match):
        import_hf(d, tmp_path / "out")


def test_import_warnings_for_what_slmkit_does_not_apply(tmp_path, tokenizer_dir):
    hf = make_hf("phi3", max_position_embeddings=256, sliding_window=64)  # Phi-3-mini ships a window
    save_hf(hf, tmp_path / "phi", tokenizer_dir)
    with pytest.warns(UserWarning, match="sliding_window=64"):
        import_hf(tmp_path / "phi", tmp_path / "a")
    hf = make_hf("mixtral", router_jitter_noise=0.1)
    save_hf(hf, tmp_path / "mx", tokenizer_dir)
    with pytest.warns(UserWarning, match=r"router_jitter_noise=0.1 only perturbs router inputs while training"):
        ckpt = load_checkpoint(import_hf(tmp_path / "mx", tmp_path / "b"))
    ids = batch()
    with torch.no_grad():  # eval mode: transformers applies no jitter either
        assert max_diff(ckpt.model(ids), hf_logits(hf, ids)) <= TOL


def test_import_phi3_names_missing_fused_tensor(tmp_path, tokenizer_dir):
    from safetensors.torch import save_file

    hf = make_hf("phi3")
    hf.config.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.gate_up_proj.weight"}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFExportError, match=r"missing tensor 'model.layers.1.mlp.gate_up_proj.weight'"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_unsupported_model_type_lists_the_families(tmp_path):
    d = write_config(tmp_path / "hf", model_type="gpt_neox")
    with pytest.raises(HFExportError, match="supported: llama, mistral, qwen2, phi3, mixtral"):
        import_hf(d, tmp_path / "out")


@pytest.mark.parametrize("overrides, match", [
    (dict(model_type="llama", num_local_experts=4), "set model_type='mixtral'"),
    (dict(model_type="mixtral", num_local_experts=0), "needs num_local_experts > 0"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "not 'llama3' scaling"),
    (dict(model_type="phi3", mlp_bias=True), "Phi3ForCausalLM has no biases"),
    (dict(model_type="mixtral", num_local_experts=4, qkv_bias=True), "MixtralForCausalLM has no biases"),
    (dict(model_type="llama", attention_type="linformer", linformer_k=8, linformer_block=16),
     "attention_type='linformer' has no Hugging Face architecture"),
])
def test_export_refuses_what_the_family_cannot_hold(overrides, match, tmp_path, tokenizer_dir):
    make_checkpoint(tmp_path / "ckpt", tokenizer_dir, **{"tie_word_embeddings": False, **overrides})
    with pytest.raises(HFExportError, match=match):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_export_warns_that_segment_memory_stays_behind(tmp_path, tokenizer_dir):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, model_type="phi3", memory_length=32)
    with pytest.warns(UserWarning, match="memory_length=32 .*no Hugging Face equivalent"):
        out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    ids = batch()
    with torch.no_grad():  # without memory the two compute the same function
        assert max_diff(model(ids), hf_logits(out, ids)) <= TOL
