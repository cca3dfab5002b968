"""GGUF export of compressed checkpoints: quantized modules are written from the codes they hold, and read back
with gguf's own reader (`GGUFReader`, `gguf.quants.dequantize`) every weight equals slmkit's dequantized weight
exactly; low-rank factors are merged, pruned zeros stay zeros; what GGUF cannot hold is converted with a measured
error or refused before anything is written. llama.cpp running these files is test_gguf_compressed_llama_cpp.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")

from test_gguf import (CASES, VOCAB, dequantized, in_gguf_layout, make_checkpoint, read_gguf,  # noqa: E402
                       reference_logits, prompt_ids, run_cli, slm_tokenizer_dir)  # noqa: F401 (a fixture)

from slmkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmkit.compress.base import Calibration, config_to_dict, get_pass, make_config  # noqa: E402
from slmkit.compress.lowrank import LowRankLinear  # noqa: E402
from slmkit.compress.qlinear import Int4Linear, Int8Linear, QuantizedEmbedding  # noqa: E402
from slmkit.compress.run import parse_pass  # noqa: E402
from slmkit.export import GGUFExportError, export_gguf  # noqa: E402

QT = gguf.GGMLQuantizationType

# plan -> the ggml type every quantized projection is written as; all exact
EXACT = {
    "int8": ("quant.int8:kernel=weight_only", QT.Q8_0),
    "int8-dynamic": ("quant.int8", QT.Q8_0),  # the same stored codes as weight_only
    "q4_0": ("quant.int4:format=q4_0,group_size=32", QT.Q4_0),
    "q4_1": ("quant.int4:format=q4_1,group_size=32", QT.Q4_1),
    "int4-g64": ("quant.int4:format=q4_1,group_size=64", QT.Q4_1),
    "q4_0-g64": ("quant.int4:format=q4_0,group_size=64", QT.Q4_0),
    "gptq8": ("quant.gptq:bits=8,kernel=weight_only", QT.Q8_0),
    "gptq-q4_0": ("quant.gptq:bits=4,group_size=32,format=q4_0", QT.Q4_0),
    "gptq-q4_1-act-order": ("quant.gptq:bits=4,group_size=64,format=q4_1,act_order=true", QT.Q4_1),
    "int8-embeddings": ("quant.int8:embeddings=true", QT.Q8_0),
    "q4_1-embeddings": ("quant.int4:format=q4_1,group_size=32,embeddings=true", QT.Q4_1),
}


def compressed(ck: Path, out: Path, plans: list[str]) -> Path:
    """`slm compress` without a dataset: passes applied in order (GPTQ calibrates on random token ids), recorded
    in slmkit.json as `compress` records them, so loading replays them."""
    model = load_checkpoint(ck).model.eval()
    calib = Calibration(torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5)))
    records = []
    for text in plans:
        spec = parse_pass(text)
        cfg, p = make_config(spec.name, spec.options), get_pass(spec.name)
        model, report = p.apply(model, cfg, calib if p.needs_calibration else None)
        records.append({"name": spec.name, "config": config_to_dict(cfg), "report": report})
    save_checkpoint(model, out, tokenizer_from=ck, provenance={"passes": records})
    return out


def slmkit_weights(model) -> dict[str, torch.Tensor]:
    """slmkit's weight of every GGUF matrix and vector (quantized ones dequantized in fp32, low-rank ones
    merged) under its GGUF name, in slmkit's row order, as float64."""
    def w(m):
        if isinstance(m, (Int8Linear, Int4Linear, QuantizedEmbedding)):
            return m.dequantize(torch.float32)
        if isinstance(m, LowRankLinear):
            return (m.up.weight.double() @ m.down.weight.double()).to(m.up.weight.dtype)  # rounded once
        return m.weight

    c, out = model.config, {}
    out["token_embd.weight"] = w(model.model.embed_tokens)
    out["output_norm.weight"] = model.model.norm.weight
    if not c.tie_word_embeddings:
        out["output.weight"] = w(model.lm_head)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        mods = dict(layer.self_attn.named_children())
        if c.num_local_experts:
            out[f"blk.{i}.ffn_gate_inp.weight"] = layer.mlp.gate.weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"blk.{i}.{names[proj]}_exps.weight"] = torch.stack([w(getattr(e, proj)) for e in layer.mlp.experts])
        else:
            mods.update(layer.mlp.named_children())
        for proj, m in mods.items():
            out[f"blk.{i}.{names[proj]}.weight"] = w(m)
            if getattr(m, "bias", None) is not None:
                out[f"blk.{i}.{names[proj]}.bias"] = m.bias
    return {k: v.detach().double() for k, v in out.items()}


def assert_file_holds_the_checkpoint(path: Path, ckpt_dir: Path) -> dict:
    """Every tensor of the file, dequantized by gguf, equals slmkit's weight exactly (after the Q/K row
    permutation of the llama graph). Returns the reader tensors."""
    model = load_checkpoint(ckpt_dir).model
    meta, tensors = read_gguf(path)
    want = slmkit_weights(model)
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        expected = want[name]
        if meta["general.architecture"] == "llama":
            expected = in_gguf_layout(name, expected, model.config)
        got = dequantized(t).reshape(expected.shape)
        assert torch.equal(got, expected), (name, t.tensor_type.name, float((got - expected).abs().max()))
    return tensors


# -- exact export of the held codes -----------------------------------------------------------------------

@pytest.mark.parametrize("case", EXACT)
def test_quantized_checkpoints_export_their_codes_exactly(tmp_path, slm_tokenizer_dir, case):
    plan, qtype = EXACT[case]
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama3-untied"])
    small = compressed(ck, tmp_path / "small", [plan])
    result = export_gguf(small, tmp_path / "m.gguf")
    assert result.weight_errors == {} and result.notes == []
    tensors = assert_file_holds_the_checkpoint(result.path, small)
    held = {n for n, t in tensors.items() if t.tensor_type not in (QT.F32, QT.F16)}
    assert held == set(result.held_tensors) and all(tensors[n].tensor_type == qtype for n in held)
    projections = {n for n in tensors if n.startswith("blk.") and ".attn_norm" not in n and ".ffn_norm" not in n}
    # untied embeddings=true quantizes the output matrix; the input table stays float (F32: the checkpoint's fp32)
    assert held == projections | ({"output.weight"} if "embeddings" in case else set())
    assert tensors["token_embd.weight"].tensor_type == QT.F32
    meta, _ = read_gguf(result.path)
    assert meta["general.file_type"] == {QT.Q8_0: 7, QT.Q4_0: 2, QT.Q4_1: 3}[qtype]
    assert result.file_type == qtype.name.lower()


@pytest.mark.parametrize("plan, qtype", [("quant.int8:embeddings=true", QT.Q8_0),
                                         ("quant.int4:format=q4_0,group_size=32,embeddings=true", QT.Q4_0),
                                         ("quant.int4:format=q4_1,group_size=64,embeddings=true", QT.Q4_1)],
                         ids=["q8_0", "q4_0", "q4_1-g64"])
def test_a_tied_quantized_embedding_is_token_embd(tmp_path, slm_tokenizer_dir, plan, qtype):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama-tied"])
    small = compressed(ck, tmp_path / "small", [plan])
    assert isinstance(load_checkpoint(small).model.model.embed_tokens, QuantizedEmbedding)
    result = export_gguf(small, tmp_path / "m.gguf")
    tensors = assert_file_holds_the_checkpoint(result.path, small)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == qtype
    assert result.weight_errors == {} and "token_embd.weight" in result.held_tensors


@pytest.mark.parametrize("case", ["qwen2", "mixtral", "llama-biases-mqa", "phi3"])
def test_every_family_exports_its_codes_exactly(tmp_path, slm_tokenizer_dir, case):
    """qwen2 (no Q/K permutation, q/k/v biases), stacked MoE experts, biases beside quantized weights."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES[case])
    small = compressed(ck, tmp_path / "small", ["quant.int4:format=q4_1,group_size=32"])
    result = export_gguf(small, tmp_path / "m.gguf")
    tensors = assert_file_holds_the_checkpoint(result.path, small)
    assert result.weight_errors == {}
    if case == "mixtral":
        gate = tensors["blk.0.ffn_gate_exps.weight"]
        assert gate.tensor_type == QT.Q4_1 and list(gate.shape) == [64, 128, 4]
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == QT.F32  # the router is not a target


def test_the_file_computes_what_slmkit_computes(tmp_path, slm_tokenizer_dir):
    """An independent float64 forward over the file's tensors gives the compressed model's logits."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, initializer_range=0.2, **CASES["llama3-untied"])
    small = compressed(ck, tmp_path / "small", ["quant.int4:format=q4_1,group_size=64,embeddings=true"])
    model = load_checkpoint(small).model
    ids = prompt_ids()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double()  # 24 rows: the exact dequantize-then-matmul path
    meta, tensors = read_gguf(export_gguf(small, tmp_path / "m.gguf").path)
    assert (reference_logits(meta, tensors, ids) - want).abs().max().item() <= 1e-4


# -- what GGUF cannot hold exactly, or at all ---------------------------------------------------------------

def test_minmax_scales_are_converted_with_a_measured_error(tmp_path, slm_tokenizer_dir):
    """format=minmax keeps fp32 scales: the export writes Q4_1 with fp16-rounded d and m (codes kept), measures
    the largest weight difference, and says so."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    small = compressed(ck, tmp_path / "small", ["quant.int4:group_size=32"])
    result = export_gguf(small, tmp_path / "m.gguf")
    assert len(result.notes) == 1 and "converted to Q4_1 with fp16-rounded parameters" in result.notes[0]
    assert "format=q4_0 or q4_1" in result.notes[0]
    model = load_checkpoint(small).model
    _, tensors = read_gguf(result.path)
    want = slmkit_weights(model)
    assert set(result.weight_errors) == set(result.held_tensors) and len(result.held_tensors) == 14
    for name, err in result.weight_errors.items():
        got = dequantized(tensors[name])
        diff = float((got - in_gguf_layout(name, want[name], model.config)).abs().max())
        assert diff == pytest.approx(err, rel=1e-6) and 0 < diff < 1e-3 * float(want[name].abs().max())


def test_int4_fallback_layers_without_blocks_are_written_as_exact_floats(tmp_path, slm_tokenizer_dir):
    """A 48-wide MLP: down_proj's rows of 48 fall back to groups of 16 (no 32-block fits a row), so the file holds
    its dequantized weights in F32 — exact — while the 64-wide projections keep Q4_1 blocks."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, intermediate_size=48)
    small = compressed(ck, tmp_path / "small", ["quant.int4:format=q4_1,group_size=32"])
    assert load_checkpoint(small).model.model.layers[0].mlp.down_proj.group_size == 16
    result = export_gguf(small, tmp_path / "m.gguf")
    tensors = assert_file_holds_the_checkpoint(result.path, small)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == QT.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == QT.Q4_1
    assert any(n.startswith("2 quantized matrices (e.g. blk.0.ffn_down.weight") and n.endswith("F32 (exact)")
               for n in result.notes)


def test_low_rank_factors_are_merged_and_pruned_zeros_stay_zero(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    small = compressed(ck, tmp_path / "small", ["prune.magnitude:sparsity=0.5,targets=gate_proj+up_proj",
                                                "lowrank.svd:ratio=0.5,targets=q_proj+o_proj",
                                                "quant.int8:targets=gate_proj+up_proj+down_proj"])
    result = export_gguf(small, tmp_path / "m.gguf", type="f32")
    tensors = assert_file_holds_the_checkpoint(result.path, small)  # merged in float64, rounded once to F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == QT.F32 and tensors["blk.0.ffn_up.weight"].tensor_type == QT.Q8_0
    up = dequantized(tensors["blk.0.ffn_up.weight"])
    assert (up == 0).double().mean() >= 0.5  # the pruned half, held as code 0, is exactly 0 in the file
    assert any("low-rank projections" in n for n in result.notes)


def test_type_sets_how_float_matrices_of_a_quantized_checkpoint_are_stored(tmp_path, slm_tokenizer_dir):
    """Quantized modules always keep their codes; `--type` decides only the matrices that are still float."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama3-untied"])
    small = compressed(ck, tmp_path / "small", ["quant.int4:format=q4_0,group_size=32,targets=q_proj+k_proj"])
    types = {}
    for file_type in ("auto", "f32", "f16", "q8_0"):
        result = export_gguf(small, tmp_path / f"{file_type}.gguf", type=file_type)
        types[file_type] = result.tensor_types
        assert result.tensor_types["blk.0.attn_q.weight"] == "Q4_0" and result.file_type == "q4_0"
        assert result.tensor_types["blk.0.attn_norm.weight"] == "F32"
    assert types["auto"] == types["f32"] and types["auto"]["blk.0.attn_v.weight"] == "F32"
    assert types["f16"]["blk.0.attn_v.weight"] == "F16" and types["f16"]["token_embd.weight"] == "F16"
    assert types["q8_0"]["blk.0.attn_v.weight"] == "Q8_0" and types["q8_0"]["output.weight"] == "Q8_0"


# -- refusals: before any file is written -------------------------------------------------------------------

@pytest.mark.parametrize("overrides, plan, match", [
    (dict(attention_type="linformer", linformer_k=8, linformer_block=16), "quant.int8", "Linformer"),
    (dict(memory_length=16), "quant.int4:format=q4_1,group_size=32", "Transformer-XL"),
    ({}, "prune.width:mlp_ratio=0.5,uniform=false", r"passes applied: prune.width\).*uniform=True"),
])
def test_what_gguf_cannot_express_is_refused_with_nothing_written(tmp_path, slm_tokenizer_dir, overrides, plan, match):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **overrides)
    small = compressed(ck, tmp_path / "small", [plan])
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(small, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []


def test_a_module_type_gguf_has_no_form_for_is_refused_naming_its_pass(slm_tokenizer_dir):
    from slmkit.export.gguf import check_gguf_exportable
    from slmkit.model import CausalLM, ModelConfig
    from test_gguf import TINY

    class Odd(torch.nn.Module):  # what a third-party pass might swap in
        in_features, out_features = 64, 64

    model = CausalLM(ModelConfig(**TINY))
    model.model.layers[1].self_attn.o_proj = Odd()
    passes = [{"name": "quant.int8", "report": {"modules": ["model.layers.0.mlp.up_proj"]}},
              {"name": "plugin.odd", "report": {"modules": ["model.layers.1.self_attn.o_proj"]}}]
    with pytest.raises(GGUFExportError, match=r"layers.1.self_attn.o_proj: Odd, made by pass plugin.odd\)"):
        check_gguf_exportable(model, where="ck", passes=passes)


def test_a_failed_write_leaves_no_file(tmp_path, slm_tokenizer_dir, monkeypatch):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    small = compressed(ck, tmp_path / "small", ["quant.int8"])

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        export_gguf(small, out / "m.gguf")
    assert list(out.iterdir()) == []


def test_cli_exports_a_quantized_checkpoint(tmp_path, slm_tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    small = compressed(ck, tmp_path / "small", ["quant.int4:group_size=32"])
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", small, tmp_path / "m.gguf")
    assert code == 0, err
    assert "(llama, q4_1, 20 tensors, 14 from quantized codes" in out
    assert "note:" in err and "largest weight difference" in err


# -- Hugging Face export of the same checkpoints -----------------------------------------------------------

def test_hf_export_writes_the_dequantized_weights_with_a_note(tmp_path, slm_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from slmkit.export import export_hf

    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama3-untied"])
    small = compressed(ck, tmp_path / "small", ["prune.magnitude:sparsity=0.5,targets=up_proj",
                                                "lowrank.svd:ratio=0.5,targets=o_proj",
                                                "quant.int4:format=q4_1,group_size=32,targets=q_proj+up_proj,"
                                                "embeddings=true"])
    with pytest.warns(UserWarning, match="written dequantized"):
        out = export_hf(small, tmp_path / "hf")
    card = (out / "README.md").read_text()
    assert "## Hugging Face export" in card and "quantized modules" in card and "low-rank" in card
    model = load_checkpoint(small).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, q.dequantize(torch.float32))
    ids = torch.tensor([prompt_ids()])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
