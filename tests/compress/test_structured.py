"""prune.width / prune.depth: contract tests, a genuinely smaller dense model, importance, GQA, HF parity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.checkpoint import save_checkpoint, state_dict_for_save
from slmkit.compress.base import Calibration, PassError, count_parameters, get_pass, state_bytes, tensor_bytes
from slmkit.model import CausalLM, ModelConfig
from slmkit.model.rope import rope_inverse_frequencies

torch.set_num_threads(1)

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
CASES = [
    # Relative logit error on a random model (measured 0.22, 0.41, 0.28, 0.28): bounded, not arbitrary.
    ("prune.width", {"mlp_ratio": 0.5, "heads_ratio": 0.5}, 0.35),
    ("prune.width", {"hidden_ratio": 0.75}, 0.55),
    ("prune.width", {"mlp_ratio": 0.6, "hidden_ratio": 0.875, "uniform": False}, 0.45),
    ("prune.depth", {"drop": 1}, 0.45),
]
IDS = ["mlp+heads", "hidden", "non-uniform", "depth"]


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**CONFIG, **overrides})).eval()


@pytest.fixture(scope="module")
def calib() -> Calibration:
    return Calibration(torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(1)))


def run(name: str, model: nn.Module, calib: Calibration | None, **options):
    p = get_pass(name)
    return p.apply(model, p.config_cls(**options), calib)


def replay(config: ModelConfig, passes: list[tuple[str, dict, dict]], state: dict) -> CausalLM:
    """What load_checkpoint does: meta build, replay each pass's restructure, assign the stored tensors."""
    with torch.device("meta"):
        model = CausalLM(config)
    for name, options, report in passes:
        p = get_pass(name)
        model = p.restructure(model, p.config_cls(**options), json.loads(json.dumps(report)))
    model.load_state_dict(state, strict=True if not model.config.tie_word_embeddings else False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(model.config)
    assert not any(t.is_meta for t in model.state_dict().values())
    return model.eval()


def all_dense(model: nn.Module) -> bool:
    return all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))


def decode_matches_forward(model: CausalLM, x: torch.Tensor) -> bool:
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(x.shape[0], x.shape[1])
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, t:t + 1], cache=cache) for t in range(5, x.shape[1])]
    return torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


# -- contract --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,tolerance", CASES, ids=IDS)
def test_contract(name, options, tolerance, calib, tmp_path):
    model = tiny_model()
    original = ModelConfig(**CONFIG)
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    params_before = count_parameters(model)[0]
    model, report = run(name, model, calib, **options)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < tolerance
    assert report["modules"]
    assert all_dense(model)
    # A genuinely smaller model whose size accounting matches what is stored.
    saved = state_dict_for_save(model)
    assert state_bytes(model) == sum(tensor_bytes(t) for t in saved.values())
    assert count_parameters(model)[0] == sum(t.numel() for t in saved.values()) < params_before
    assert decode_matches_forward(model, x)
    # save -> meta build of the ORIGINAL config -> restructure -> load(assign) is the identity ...
    path = tmp_path / "w.safetensors"
    save_file(saved, str(path))
    fresh = replay(original, [(name, options, report)], load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert fresh.config == model.config
    # ... and so is a build of the already-updated config (restructure is a no-op where sizes match).
    again = replay(model.config, [(name, options, report)], load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(again(x), out)
    assert decode_matches_forward(again, x)


@pytest.mark.parametrize("name,options,field", [
    ("prune.width", {"mlp_ratio": 0.0}, "mlp_ratio"),
    ("prune.width", {"heads_ratio": 1.5}, "heads_ratio"),
    ("prune.width", {"hidden_ratio": -0.5}, "hidden_ratio"),
    ("prune.width", {"uniform": "yes"}, "uniform"),
    ("prune.depth", {}, "keep_layers"),
    ("prune.depth", {"keep_layers": 1, "drop": 1}, "drop"),
    ("prune.depth", {"keep_layers": 0}, "keep_layers"),
    ("prune.depth", {"drop": -1}, "drop"),
])
def test_invalid_config_names_pass_and_field(name, options, field):
    with pytest.raises(PassError, match=rf"{name}.*{field}"):
        get_pass(name).config_cls(**options)


@pytest.mark.parametrize("name,options,field", [
    ("prune.width", {"heads_ratio": 0.4}, "heads_ratio"),  # 0.4 * 2 kv groups -> 0 kept
    ("prune.width", {"mlp_ratio": 0.005}, "mlp_ratio"),
    ("prune.width", {"hidden_ratio": 0.01}, "hidden_ratio"),
    ("prune.depth", {"keep_layers": 3}, "keep_layers"),
    ("prune.depth", {"drop": 2}, "drop"),
])
def test_impossible_for_this_model_raises_before_any_change(name, options, field, calib):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match=rf"{name}.*{field}"):
        run(name, model, calib, **options)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config == ModelConfig(**CONFIG)


# -- prune.width ------------------------------------------------------------------------------------

def test_width_gives_smaller_plain_model_with_updated_config(calib):
    model = tiny_model()
    n_before = model.num_parameters()
    model, report = run("prune.width", model, calib, mlp_ratio=0.5, heads_ratio=0.5)
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.head_dim) == \
        (64, 2, 1, 64, 16)
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (64, 64) and layer.mlp.down_proj.weight.shape == (64, 64)
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
    assert layer.self_attn.o_proj.weight.shape == (64, 32)
    # 2 layers x (MLP 3*64*64 removed + attention: q 32*64 + k,v 2*16*64 + o 64*32 removed)
    assert n_before - model.num_parameters() == 2 * (3 * 64 * 64 + 32 * 64 + 2 * 16 * 64 + 64 * 32)
    # Exactly the structure of a model built from the new config.
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in CausalLM(c).state_dict().items()}
    assert report["layers"] == [{"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}] * 2


def test_hidden_width_sets_head_dim_and_stays_tied(calib):
    model, report = run("prune.width", tiny_model(), calib, hidden_ratio=0.75, heads_ratio=0.5)
    c = model.config
    assert c.hidden_size == 48 and c.head_dim == 16 and c.num_attention_heads == 2  # 48/2 != 16: explicit
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (97, 48) and model.model.norm.weight.shape == (48,)
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (32, 48)
    assert set(report["norm_scales"]) == {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                          "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                          "model.norm"}


def test_untied_lm_head_is_sliced(calib):
    model = tiny_model(tie_word_embeddings=False)
    model, _ = run("prune.width", model, calib, hidden_ratio=0.5)
    assert model.lm_head.weight.shape == (97, 32) and model.lm_head.weight is not model.model.embed_tokens.weight


def test_gqa_groups_are_pruned_whole(calib):
    model = tiny_model(num_attention_heads=8, num_key_value_heads=4)  # head_dim 8, 2 query heads per kv head
    orig = copy.deepcopy(model)
    model, report = run("prune.width", model, calib, heads_ratio=0.5)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2) and c.kv_groups == 2
    for i, (layer, old) in enumerate(zip(model.model.layers, orig.model.layers)):
        attn, oa = layer.self_attn, old.self_attn
        groups = report["kept_kv_groups"][i]
        assert len(groups) == 2 and attn.n_heads == 4 and attn.n_kv == 2
        kv_rows = torch.cat([torch.arange(g * 8, g * 8 + 8) for g in groups])
        q_rows = torch.cat([torch.arange(g * 16, g * 16 + 16) for g in groups])  # both query heads of group g
        assert torch.equal(attn.k_proj.weight, oa.k_proj.weight[kv_rows])
        assert torch.equal(attn.v_proj.weight, oa.v_proj.weight[kv_rows])
        assert torch.equal(attn.q_proj.weight, oa.q_proj.weight[q_rows])
        assert torch.equal(attn.o_proj.weight, oa.o_proj.weight[:, q_rows])
    assert decode_matches_forward(model, calib.input_ids[:2, :12])


def test_zeroed_structures_are_pruned_first(calib):
    model = tiny_model()
    dead_channels = torch.tensor([3, 17, 40, 41, 99, 127])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead_channels] = 0  # silu(0) * up = 0: the channel never fires
            layer.self_attn.v_proj.weight[:16] = 0  # kv head 0 -> its query heads output zero
            layer.input_layernorm.weight[[5, 9]] = 0
            layer.post_attention_layernorm.weight[[5, 9]] = 0
        model.model.norm.weight[[5, 9]] = 0  # hidden channels 5 and 9 read as zero everywhere
    orig = copy.deepcopy(model)
    x = calib.input_ids[:2]
    with torch.no_grad():
        ref = model(x)
    model, report = run("prune.width", model, calib, mlp_ratio=122 / 128, heads_ratio=0.5)
    assert report["kept_kv_groups"] == [[1], [1]]
    for layer, old in zip(model.model.layers, orig.model.layers):
        kept = [r for r in range(128) if r not in dead_channels.tolist()]
        assert torch.equal(layer.mlp.up_proj.weight, old.mlp.up_proj.weight[kept])
    # Dead channels and the zero-output head group carried nothing: the function is unchanged.
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    # Hidden channels: the ones every norm zeroes are the first to go.
    model, report = run("prune.width", copy.deepcopy(orig), calib, hidden_ratio=62 / 64)
    kept_cols = [c for c in range(64) if c not in (5, 9)]
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight[:, kept_cols])


def test_export_hf_gives_the_same_logits(calib, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmkit.export import export_hf

    model, _ = run("prune.width", tiny_model(), calib, mlp_ratio=0.5, heads_ratio=0.5, hidden_ratio=0.75)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="tokenizer"):
        out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = calib.input_ids[:2]
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4
    assert hf.config.intermediate_size == 64 and hf.config.num_key_value_heads == 1 and hf.config.hidden_size == 48


def test_non_uniform_sizes_round_trip_through_restructure(calib, tmp_path):
    model = tiny_model()
    model, report = run("prune.width", model, calib, mlp_ratio=0.5, uniform=False)
    sizes = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert sum(sizes) == 128 and sizes[0] != sizes[1]  # one global budget, split by importance
    assert [s["intermediate_size"] for s in report["layers"]] == sizes
    assert model.config.intermediate_size == max(sizes)
    x = calib.input_ids[:2]
    assert decode_matches_forward(model, x)
    save_file(state_dict_for_save(model), str(tmp_path / "w.safetensors"))
    for config in (ModelConfig(**CONFIG), model.config):  # original config, or the saved (widest-layer) one
        fresh = replay(config, [("prune.width", {"mlp_ratio": 0.5, "uniform": False}, report)],
                       load_file(str(tmp_path / "w.safetensors")))
        assert [layer.mlp.down_proj.in_features for layer in fresh.model.layers] == sizes
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))


def test_biases_are_sliced_with_their_rows(calib, tmp_path):
    model = tiny_model(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.shape[0] != 64:
                p.normal_()  # non-zero q/k/v/gate/up biases
    x = calib.input_ids[:2]
    model, report = run("prune.width", model, calib, mlp_ratio=0.5, heads_ratio=0.5, hidden_ratio=0.75)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == (16,) and attn.o_proj.bias.shape == (48,)
    assert mlp.gate_proj.bias.shape == (64,) and mlp.down_proj.bias.shape == (48,)
    assert decode_matches_forward(model, x)
    save_file(state_dict_for_save(model), str(tmp_path / "w.safetensors"))
    fresh = replay(ModelConfig(**{**CONFIG, "attention_bias": True, "mlp_bias": True}),
                   [("prune.width", {"mlp_ratio": 0.5, "heads_ratio": 0.5, "hidden_ratio": 0.75}, report)],
                   load_file(str(tmp_path / "w.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_width_refuses_swapped_projections(calib):
    model, _ = run("lowrank.svd", tiny_model(), None, ratio=0.5)
    with pytest.raises(PassError, match="prune.width.*nn.Linear"):
        run("prune.width", model, calib, mlp_ratio=0.5)


# -- prune.depth ------------------------------------------------------------------------------------

def test_identity_layer_is_dropped_first(calib):
    model = tiny_model(num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()  # layer 2 now returns its input exactly
    x = calib.input_ids[:2, :16]
    with torch.no_grad():
        ref = model(x)
    model, report = run("prune.depth", model, calib, drop=1)
    assert report["dropped_layers"] == [2] and report["kept_layers"] == [0, 1, 3]
    assert report["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]  # re-numbered for the cache
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)
    assert decode_matches_forward(model, x)


def test_depth_keep_layers_and_composition_with_width(calib, tmp_path):
    model = tiny_model(num_hidden_layers=4)
    model, depth_report = run("prune.depth", model, calib, keep_layers=2)
    assert len(depth_report["kept_layers"]) == 2 and model.config.num_hidden_layers == 2
    model, width_report = run("prune.width", model, calib, mlp_ratio=0.5)
    save_file(state_dict_for_save(model), str(tmp_path / "w.safetensors"))
    fresh = replay(ModelConfig(**{**CONFIG, "num_hidden_layers": 4}),
                   [("prune.depth", {"keep_layers": 2}, depth_report),
                    ("prune.width", {"mlp_ratio": 0.5}, width_report)],
                   load_file(str(tmp_path / "w.safetensors")))
    x = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh.config == model.config
