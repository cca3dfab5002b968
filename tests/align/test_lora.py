"""LoRA: identity at init, merge equals the unmerged forward, only adapters train, PEFT-layout adapters round
trip, bad targets and adapters are refused, and `slm merge-lora` writes an ordinary checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from slmkit.align.lora import (LoRAConfig, LoRAError, LoRALinear, apply_lora, load_adapter, lora_modules,
                               lora_state_dict, merge_lora, save_adapter, trainable_parameters)
from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.model import CausalLM, ModelConfig


def tiny(tie: bool = False) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def test_adapted_model_starts_equal_to_base_and_wraps_every_target():
    model = tiny()
    before = model(IDS)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(IDS), before)  # B = 0
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert m.scaling == 2.0 and m.lora_A.weight.abs().sum() > 0 and m.lora_B.weight.abs().sum() == 0


def test_merge_equals_unmerged_forward_and_restores_plain_linear():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")))
    randomize_adapters(model)
    unmerged = model(IDS)
    assert not torch.allclose(unmerged, tiny()(IDS), atol=1e-4)  # the adapters do change the output
    merge_lora(model)
    assert not lora_modules(model)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=0)


def test_only_lora_parameters_get_gradients():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "o_proj")))
    model(IDS).float().logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * (2 * 64 + 64 * 2)  # 2 layers x 2 targets x (A: 2x64 + B: 64x2)
    assert total == sum(p.numel() for p in tiny().parameters()) + trainable


def test_adapter_round_trip_with_peft_layout(tmp_path):
    model = tiny()
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj"))
    apply_lora(model, cfg)
    randomize_adapters(model)
    expected = model(IDS)
    save_adapter(model, tmp_path, cfg, base="runs/base", base_sha256="ab" * 32)
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["task_type"] == "CAUSAL_LM"
    assert (peft_cfg["r"], peft_cfg["lora_alpha"], peft_cfg["target_modules"]) == (4, 8.0, ["k_proj", "q_proj"])
    assert peft_cfg["base_model_name_or_path"] == "runs/base" and peft_cfg["bias"] == "none"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["slmkit.base_sha256"] == "ab" * 32
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert len(keys) == len(lora_state_dict(model)) == 2 * 2 * 2

    fresh = tiny()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(IDS), expected, atol=0, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_bad_configs_targets_and_adapters_are_refused(tmp_path):
    with pytest.raises(LoRAError, match="rank=0"):
        LoRAConfig(rank=0)
    with pytest.raises(LoRAError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(LoRAError, match="unknown field"):
        LoRAConfig.from_dict({"rank": 2, "r": 2})
    assert LoRAConfig.from_dict(LoRAConfig(rank=3, targets=("q_proj",)).to_dict()) == LoRAConfig(rank=3, targets=("q_proj",))

    model = tiny()
    with pytest.raises(LoRAError, match="'qproj' matches no module.*q_proj"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "qproj")))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(LoRAError, match="not a plain nn.Linear"):
        apply_lora(model, LoRAConfig(targets=("mlp",)))
    with pytest.raises(LoRAError, match="tied embeddings"):
        apply_lora(tiny(tie=True), LoRAConfig(targets=("lm_head",)))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj",)))
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2, targets=("v_proj",)))

    save_adapter(model, tmp_path / "r2", LoRAConfig(rank=2, targets=("q_proj",)))
    other = tiny()
    apply_lora(other, LoRAConfig(rank=4, targets=("q_proj",)))
    with pytest.raises(LoRAError, match=r"shape \(2, 64\).*\(4, 64\)"):
        load_adapter(other, tmp_path / "r2")
    cfg_file = tmp_path / "r2" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora=True is not supported"):
        load_adapter(tiny(), tmp_path / "r2")
    with pytest.raises(LoRAError, match="adapter_config.json: missing"):
        load_adapter(tiny(), tmp_path / "nowhere")


def slm(*args):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, timeout=300)


def test_merge_lora_command_writes_an_ordinary_checkpoint(tmp_path, tiny_dataset):
    base = save_checkpoint(tiny(), tmp_path / "base", tokenizer_from=tiny_dataset)
    model = load_checkpoint(base).model
    cfg = LoRAConfig(rank=4, targets=("v_proj", "up_proj"))
    apply_lora(model, cfg)
    randomize_adapters(model)
    expected = model(IDS)
    save_adapter(model, tmp_path / "adapter", cfg, base=base, base_sha256=load_checkpoint(base).provenance["files"][
        "model.safetensors"]["sha256"])

    r = slm("merge-lora", base, tmp_path / "adapter", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = load_checkpoint(tmp_path / "merged")  # plain tensors only: loads like any checkpoint
    torch.testing.assert_close(merged.model(IDS), expected, atol=1e-5, rtol=0)
    stage = merged.provenance["stages"][-1]
    assert stage["stage"] == "merge-lora" and len(stage["modules"]) == 4 and stage["config"]["rank"] == 4

    other = save_checkpoint(tiny(tie=True), tmp_path / "other", tokenizer_from=tiny_dataset)  # other weights
    r = slm("merge-lora", other, tmp_path / "adapter", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "was trained on weights" in r.stderr
