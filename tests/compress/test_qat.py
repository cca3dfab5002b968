"""Quantization-aware training (`--qat`): the forward uses exactly the weights the named pass will store, the
gradient passes straight through, the trained checkpoint is plain, and the pass then writes those codes."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from slmkit.checkpoint import load_checkpoint
from slmkit.cli import app
from slmkit.compress.base import PassError, get_pass
from slmkit.compress.qat import (QATEmbedding, QATLinear, apply_qat, fake_quantize, parse_qat, qat_modules,
                                 remove_qat)
from slmkit.compress.qlinear import Int4Linear, Int8Linear, QuantizedEmbedding
from slmkit.model import CausalLM, ModelConfig
from slmkit.train.config import TrainConfig, TrainConfigError

torch.set_num_threads(1)

# hidden 64 takes groups of 32 and 64; intermediate 96 does not take 64 (falls back to 32), so fallbacks are covered
CONFIG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def model(tied: bool = True) -> CausalLM:
    torch.manual_seed(0)
    m = CausalLM(ModelConfig(**CONFIG, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + torch.rand_like(p))  # break the init's symmetry a little, add some spread
    return m


def dequantized(module) -> torch.Tensor:
    if isinstance(module, QuantizedEmbedding):
        return module.packed.dequantize()
    return module.dequantize()


SPECS = ["q4_0", "q4_1", "q8_0", "quant.int4:group_size=64", "quant.int4:format=q4_0,group_size=64,embeddings=true",
         "quant.int8:embeddings=true"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("tied", [True, False])
def test_the_qat_forward_uses_exactly_the_weights_the_pass_stores(spec, tied):
    plan = parse_qat(spec)
    trained = model(tied)
    report = apply_qat(trained, plan)
    shipped, _ = get_pass(plan.name).apply(remove_qat(copy.deepcopy(trained)), plan.cfg, None)
    modules = qat_modules(trained)
    assert modules and report["modules"] == len(modules)
    for name, qat in modules.items():
        if name == "lm_head" and isinstance(qat, QATLinear) and tied:
            target = shipped.model.embed_tokens  # the tied head reads the quantized table
        else:
            target = shipped.get_submodule(name)
        assert isinstance(target, (Int4Linear, Int8Linear, QuantizedEmbedding)), name
        assert torch.equal(qat.effective_weight(), dequantized(target)), name  # bit for bit
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        qat_logits, shipped_logits = trained(ids), shipped(ids)
    torch.testing.assert_close(qat_logits, shipped_logits, atol=2e-4, rtol=1e-4)


def test_fallback_widths_get_the_pass_fallback_format():
    plan = parse_qat("quant.int4:group_size=64")
    m = model()
    report = apply_qat(m, plan)
    down = m.model.layers[0].mlp.down_proj  # in_features 96: 64 does not divide it
    assert isinstance(down, QATLinear) and (down.bits, down.group_size) == (4, 32)
    assert any(name.endswith("down_proj") for name in report["fallbacks"])
    assert m.model.layers[0].self_attn.q_proj.group_size == 64


def test_gradients_pass_straight_through():
    w = torch.randn(8, 64, requires_grad=True)
    x = torch.randn(5, 64)
    y = x @ fake_quantize(w, 4, 32, "q4_0").t()
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(w.grad, g.t() @ x)  # d/dw of x·wᵀ, as if unquantized
    emb = QATEmbedding(torch.nn.Embedding(10, 64), (4, 32, "weight_only"), "q4_1")
    emb(torch.tensor([[1, 1, 3]])).sum().backward()
    assert emb.weight.grad[1].eq(2).all() and emb.weight.grad[3].eq(1).all() and emb.weight.grad[0].eq(0).all()


def test_qat_keeps_parameters_state_dict_and_ties():
    m = model()
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    apply_qat(m, parse_qat("quant.int4:format=q4_1,group_size=32,embeddings=true"))
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before
    assert [id(p) for p in m.parameters()] == params
    assert m.lm_head.weight is m.model.embed_tokens.weight
    remove_qat(m)
    assert not qat_modules(m) and type(m.lm_head) is torch.nn.Linear
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("spec, match", [
    ("q3_k", r"must be one of \['q4_0', 'q4_1', 'q8_0'\]"),
    ("quant.gptq:bits=4", "GPTQ picks codes"),
    ("prune.wanda", "must be one of"),
    ("quant.int4:format=q9", "format="),
    ("quant.int4:group_size=48", "group_size"),
    ("", "empty"),
])
def test_bad_qat_specs_are_refused(spec, match):
    with pytest.raises(PassError, match=match):
        parse_qat(spec)
    if spec:
        with pytest.raises(TrainConfigError, match=rf"qat='{spec}'"):
            TrainConfig(qat=spec)


def test_pruned_or_quantized_modules_are_refused():
    m = model()
    get_pass("quant.int8").apply(m, get_pass("quant.int8").config_cls(), None)
    with pytest.raises(PassError, match="already quantized"):
        apply_qat(m, parse_qat("q8_0"))


def test_slm_train_qat_then_compress_writes_the_trained_codes(tmp_path, tiny_dataset):
    out, shipped = tmp_path / "qat", tmp_path / "qat-int4"
    model_yaml = tmp_path / "m.yaml"
    model_yaml.write_text("hidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                          "num_key_value_heads: 2\n")
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(model_yaml), "--out", str(out),
                            "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
                            "--precision", "fp32", "--qat", "q4_0"])
    assert r.exit_code == 0, r.output
    assert "slm compress" in r.output and "quant.int4:format=q4_0,group_size=32" in r.output
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    assert stage["config"]["qat"] == "q4_0" and stage["qat"]["compress"] == "quant.int4:format=q4_0,group_size=32"
    trained = load_checkpoint(out).model
    assert not qat_modules(trained)  # a plain float checkpoint
    r = runner.invoke(app, ["compress", str(out), "--pass", stage["qat"]["compress"], "--out", str(shipped)])
    assert r.exit_code == 0, r.output
    q = load_checkpoint(shipped).model
    expect = fake_quantize(trained.model.layers[1].mlp.up_proj.weight, 4, 32, "q4_0")
    assert torch.equal(q.model.layers[1].mlp.up_proj.dequantize(), expect.detach())


def test_slm_train_refuses_qat_with_lora_before_any_work(tmp_path, tiny_dataset, tiny_model_yaml):
    runner = CliRunner()
    base = tmp_path / "base"
    r = runner.invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(tiny_model_yaml), "--out", str(base),
                            "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(base), "--out", str(tmp_path / "x"),
                            "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--lora-rank", "4",
                            "--qat", "q4_0"])
    assert r.exit_code != 0 and "LoRA" in (r.output + str(r.exception))
    assert not (tmp_path / "x" / "model.safetensors").exists()
    r = runner.invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(base), "--out", str(tmp_path / "y"),
                            "--steps", "1", "--qat", "q5_k"])
    assert r.exit_code != 0 and "q5_k" in (r.output + str(r.exception))
    # QAT-KD: the teacher distils into a quantization-aware copy of itself
    r = runner.invoke(app, ["distill", "-t", str(base), "-s", str(base), "-d", str(tiny_dataset), "-o",
                            str(tmp_path / "kd"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                            "--eval-every", "0", "--qat", "q4_1"])
    assert r.exit_code == 0, r.output
    stage = json.loads((tmp_path / "kd" / "slmkit.json").read_text())["stages"][-1]
    assert stage["qat"]["compress"] == "quant.int4:format=q4_1,group_size=32" and stage["qat"]["modules"] == 14
