"""Hugging Face interop: slmkit -> transformers and transformers -> slmkit give the same logits and token ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slmkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmkit.export import HFExportError, export_hf, import_hf  # noqa: E402
from slmkit.model import CausalLM, ModelConfig  # noqa: E402
from hf_helpers import hf_logits, max_diff

TOL = 1e-4
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # 64 makes all three frequency bands occur at head_dim 16


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights away from 1 and biases away from 0, so a dropped or misnamed one shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def batch(vocab_size: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))  # (B, T)


# -- export -------------------------------------------------------------------------------------

EXPORT_CASES = {
    "llama": dict(model_type="llama"),
    "llama3-untied-gqa": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False,
                              rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    # Only `factor` given: slmkit's defaults (original length 8192) must be spelled out for transformers.
    "llama3-defaults": dict(model_type="llama", rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, qkv_bias=True, rope_theta=1e6),
    "qwen2-no-bias": dict(model_type="qwen2", qkv_bias=False),  # exported with zero q/k/v biases
}


def make_checkpoint(path, tokenizer_dir, **overrides):
    torch.manual_seed(0)
    model = perturb_(CausalLM(ModelConfig(**{**TINY, **overrides}))).eval()
    save_checkpoint(model, path, tokenizer_from=tokenizer_dir)
    return model


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_matches_transformers(case, tmp_path, tokenizer_dir):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, **EXPORT_CASES[case])
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    ids = batch()
    with torch.no_grad():
        ours = model(ids)
    assert max_diff(ours, hf_logits(out, ids)) <= TOL

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM"}[model.config.model_type]]
    assert "qkv_bias" not in cfg
    # transformers 4.x reads rope_theta/rope_scaling, 5 reads rope_parameters: both are written and agree.
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == model.config.rope_theta
    if model.config.rope_scaling:
        assert cfg["rope_scaling"]["rope_type"] == cfg["rope_parameters"]["rope_type"] == "llama3"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_word_embeddings)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).exists(), name


def test_export_tokenizer_and_generation_config(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer

    make_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="bfloat16")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = ["def add(a, b):\n    return a + b", "Café naïve — 東京 😀",
             "   leading\t\ttabs  and   runs   \n\n", "<|bos|>special<|eos|>", ""]
    for text in texts:
        assert hf_tok(text)["input_ids"] == ref.encode(text).ids, text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|bos|>user\nhi<|eos|>"

    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16  # config "dtype" follows the exported weights
    assert 'library_name: "transformers"' in (out / "README.md").read_text()


def test_export_refuses_what_hf_cannot_express(tmp_path, tokenizer_dir):
    make_checkpoint(tmp_path / "ckpt", tokenizer_dir, model_type="llama", qkv_bias=True)
    with pytest.raises(HFExportError, match="model_type='qwen2'"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    make_checkpoint(tmp_path / "ckpt2", tokenizer_dir, model_type="mistral", mlp_bias=True)
    with pytest.raises(HFExportError, match="MistralForCausalLM has no biases"):
        export_hf(tmp_path / "ckpt2", tmp_path / "hf")


# -- import -------------------------------------------------------------------------------------

HF_TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
IMPORT_CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(num_key_value_heads=2, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0},
                    attention_bias=True, head_dim=32, eos_token_id=[2, 5])),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def save_hf(model, path, tokenizer_dir=None, **kwargs):
    model.save_pretrained(path, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir is not None:
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def make_hf(case: str, seed: int = 0):
    config_cls, model_cls, kwargs = IMPORT_CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**HF_TINY, **kwargs)
    return perturb_(getattr(transformers, model_cls)(config)).eval()


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_import_matches_transformers(case, tmp_path, tokenizer_dir):
    hf = make_hf(case)
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ckpt = load_checkpoint(out)
    ids = batch()
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf_logits(hf, ids)) <= TOL
    c = ckpt.config
    assert c.model_type == case.removesuffix("3")
    assert c.qkv_bias == (case == "qwen2")
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    if case == "llama3":
        assert c.head_dim == 32 and c.eos_token_id == 2 and c.rope_scaling["rope_type"] == "llama3"
    stage = ckpt.provenance["stages"][0]
    assert stage["stage"] == "import" and stage["model_type"] == c.model_type and len(stage["config_sha256"]) == 64
    assert ckpt.tokenizer().encode("def f").ids


def test_import_sharded_and_bf16(tmp_path, tokenizer_dir):
    hf = make_hf("llama")
    save_hf(hf, tmp_path / "sharded", tokenizer_dir, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = batch()
    ckpt = load_checkpoint(import_hf(tmp_path / "sharded", tmp_path / "a"))
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf_logits(hf, ids)) <= TOL

    hf_bf16 = make_hf("qwen2").to(torch.bfloat16)
    save_hf(hf_bf16, tmp_path / "bf16", tokenizer_dir)
    ckpt = load_checkpoint(import_hf(tmp_path / "bf16", tmp_path / "b"))
    assert ckpt.model.model.embed_tokens.weight.dtype == torch.bfloat16  # stored as it came
    ckpt.model.float()
    with torch.no_grad():  # same bf16-rounded weights, both computed in fp32
        assert max_diff(ckpt.model(ids), hf_logits(hf_bf16.float(), ids)) <= TOL


@pytest.mark.parametrize("case", ["llama3", "qwen2"])
def test_round_trip_import_export(case, tmp_path, tokenizer_dir):
    hf = make_hf(case)
    save_hf(hf, tmp_path / "hf", tokenizer_dir)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf2")
    ids = batch()
    assert max_diff(hf_logits(out, ids), hf_logits(hf, ids)) == 0.0
    again = transformers.AutoConfig.from_pretrained(out)
    assert again.rope_parameters == hf.config.rope_parameters
    assert type(again) is type(hf.config)


def test_import_config_defaults_follow_transformers():
    from slmkit.export.hf import model_config_from_hf

    # A hand-written config: transformers unties embeddings by default, uses eps 1e-6, and takes the
    # llama3 pretraining length from max_position_embeddings when it is not given.
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    raw = {"model_type": "llama", **HF_TINY, "rope_scaling": rope}
    c = model_config_from_hf(raw)
    assert c.tie_word_embeddings is False and c.rms_norm_eps == 1e-6 and c.pad_token_id is None
    assert c.rope_scaling["original_max_position_embeddings"] == HF_TINY["max_position_embeddings"]
    assert transformers.LlamaConfig(**raw).rope_parameters["original_max_position_embeddings"] == 128


# -- import errors ------------------------------------------------------------------------------

def test_import_unsupported_model_type(tmp_path):
    for model_type in ("gpt2", "gemma2"):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, **HF_TINY}))
        with pytest.raises(HFExportError, match="supported: llama, mistral, qwen2"):
            import_hf(d, tmp_path / "out")


def test_import_refuses_pickle(tmp_path):
    make_hf("llama").config.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(HFExportError, match="pickle.*safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_import_names_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    hf = make_hf("mistral")
    hf.config.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFExportError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        import_hf(tmp_path / "hf", tmp_path / "out")

    # Old transformers stored rotary frequencies; they are recomputed, not an unexpected tensor.
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    state["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFExportError, match=r"unexpected tensors \['model.layers.0.mlp.extra.weight'\]"):
        import_hf(tmp_path / "hf", tmp_path / "out2")


def test_import_unsupported_rope_type(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = {"model_type": "llama", **HF_TINY, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFExportError, match="rope type 'linear'"):
        import_hf(d, tmp_path / "out")
