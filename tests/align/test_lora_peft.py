"""LoRA adapters move between slmkit and the PEFT library itself: an slmkit adapter loads with
`peft.PeftModel.from_pretrained` onto the Hugging Face export of its base and gives the same logits, and an
adapter trained and saved by PEFT loads into slmkit with the same logits."""

import pytest
import torch

from slmkit.align.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter
from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.export.hf import export_hf
from slmkit.model import CausalLM, ModelConfig

peft = pytest.importorskip("peft")  # in the test extra; skipped only where it is not installed
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def base_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))
    return save_checkpoint(model, tmp_path / "base")


def test_slmkit_adapter_loads_in_peft(tmp_path):
    ckpt = base_checkpoint(tmp_path)
    model = load_checkpoint(ckpt).model.eval()
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    adapter = save_adapter(model, tmp_path / "adapter", cfg, base=ckpt)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        ours, theirs = model(IDS), peft_model(input_ids=IDS).logits
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=IDS).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the output


def test_peft_adapter_loads_in_slmkit(tmp_path):
    ckpt = base_checkpoint(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "hf"), torch_dtype=torch.float32)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, peft_cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few real training steps, so B is no longer zero
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    peft_model.eval()
    model = load_adapter(load_checkpoint(ckpt).model.eval(), tmp_path / "peft_adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["gate_proj", "k_proj", "o_proj"]
    with torch.no_grad():
        assert (model(IDS) - peft_model(input_ids=IDS).logits).abs().max() < 1e-4
