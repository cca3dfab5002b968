"""The compression driver: passes compose, each is measured, the result loads compressed, bad plans fail early."""


import pytest
import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.compress.base import PASSES, PassError, _load_builtin_passes
from slmkit.compress.run import compress, load_plan, parse_pass
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain
from pinned_kernels import each_kernel_choice


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_model_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "m"
    pretrain(tiny_dataset, tiny_model_yaml, out, TrainConfig(steps=20, batch_size=4, seq_len=32, eval_every=0,
                                                             save_every=0, precision="fp32"), quiet=True)
    return out


def test_builtin_passes_are_registered():
    _load_builtin_passes()
    expected = {"prune.magnitude", "prune.wanda", "prune.sparsegpt", "prune.width", "prune.depth", "lowrank.svd",
                "lowrank.asvd", "quant.int8", "quant.int4", "quant.gptq"}
    assert expected <= set(PASSES)


def test_parse_pass_and_plan(tmp_path):
    spec = parse_pass("prune.wanda:sparsity=0.5,targets=gate_proj+up_proj")
    assert spec.name == "prune.wanda" and spec.options == {"sparsity": "0.5", "targets": "gate_proj+up_proj"}
    plan = tmp_path / "plan.yaml"
    plan.write_text("passes:\n  - pass: prune.magnitude\n    sparsity: 0.5\n  - quant.int8\n")
    assert [s.name for s in load_plan(plan)] == ["prune.magnitude", "quant.int8"]
    with pytest.raises(PassError, match="key=value"):
        parse_pass("prune.wanda:0.5")


def test_passes_compose_and_the_checkpoint_loads_compressed(trained, tiny_dataset, tmp_path):
    specs = [parse_pass("prune.wanda:sparsity=0.5"), parse_pass("lowrank.asvd:ratio=0.9,targets=down_proj"),
             parse_pass("quant.int8")]
    rows = compress(trained, tmp_path / "c", specs, data=tiny_dataset, calib_samples=8, calib_seq_len=32,
                    eval_tokens=2048, speed=False)
    assert [r["pass"] for r in rows] == ["(input)", "prune.wanda", "lowrank.asvd", "quant.int8"]
    assert rows[1]["nonzero"] < rows[0]["nonzero"] and rows[-1]["bytes"] < rows[0]["bytes"]
    assert all(0 < r["bits_per_byte"] < 10 for r in rows)
    ck = load_checkpoint(tmp_path / "c")
    assert [p["name"] for p in ck.provenance["passes"]] == ["prune.wanda", "lowrank.asvd", "quant.int8"]
    assert ck.provenance["stages"][-1]["stage"] == "compress"
    on_disk = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert abs(on_disk - rows[-1]["bytes"]) < 64 * 1024  # reported bytes are the real tensors (+ header)
    x = torch.randint(0, ck.config.vocab_size, (2, 16))
    again = load_checkpoint(tmp_path / "c")
    assert torch.equal(ck.model(x), again.model(x))


def test_structured_pruning_output_is_smaller_and_distillable(trained, tiny_dataset, tmp_path):
    rows = compress(trained, tmp_path / "w", [parse_pass("prune.width:mlp_ratio=0.5")], data=tiny_dataset,
                    calib_samples=8, calib_seq_len=32, eval_tokens=2048, speed=False)
    assert rows[1]["parameters"] < rows[0]["parameters"]
    ck = load_checkpoint(tmp_path / "w")
    assert ck.config.intermediate_size == 32


@pytest.mark.parametrize("plan,match", [
    (["prune.nope"], "unknown pass"),
    (["prune.magnitude:sparsity=1.5"], "sparsity"),
    (["prune.magnitude:speed=3"], "unknown option"),
    (["quant.int4:group_size=48"], "group_size"),
    (["quant.int8", "prune.magnitude:sparsity=0.5"], "quantiz"),
])
def test_bad_plans_fail_before_writing_anything(trained, tiny_dataset, tmp_path, plan, match):
    with pytest.raises(PassError, match=match):
        compress(trained, tmp_path / "c", [parse_pass(p) for p in plan], data=tiny_dataset, calib_samples=4,
                 calib_seq_len=32, eval_tokens=512, speed=False)
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_calibration_needs_data_and_the_same_tokenizer(trained, tmp_path):
    with pytest.raises(PassError, match="needs calibration data"):
        compress(trained, tmp_path / "c", [parse_pass("prune.wanda:sparsity=0.5")], speed=False)
    from slmkit.data import TokenizerMismatchError, build_dataset

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"other words number {i} " * 300)
    other = tmp_path / "other"
    build_dataset([str(corpus)], other, vocab_size=280, val_fraction=0.3, progress=False)
    with pytest.raises(TokenizerMismatchError, match=r"is not the tokenizer dataset .*other was built with"):
        compress(trained, tmp_path / "c", [parse_pass("prune.wanda:sparsity=0.5")], data=other, speed=False)


def test_int4_falls_back_per_layer_and_reloads_exactly(tmp_path):
    """Widths group_size does not divide get the largest power-of-two group >= 16 that does (96 with 64 -> 32),
    else int8 (200 = 8 x 25); each fallback is reported, and loading replays the same per-layer formats."""
    from slmkit.checkpoint import save_checkpoint
    from slmkit.compress.qlinear import Int4Linear, Int8Linear, QuantizedEmbedding
    from slmkit.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    save_checkpoint(CausalLM(cfg), tmp_path / "in")
    rows = compress(tmp_path / "in", tmp_path / "out", [parse_pass("quant.int4:group_size=64,embeddings=true")],
                    speed=False)
    report = load_checkpoint(tmp_path / "out").provenance["passes"][-1]["report"]
    fb = report["fallbacks"]
    assert fb["model.layers.0.self_attn.q_proj"]["group_size"] == 32
    assert fb["model.layers.1.mlp.down_proj"] == {"bits": 8, "kernel": "weight_only",
                                                   "reason": "group_size=64 does not divide in_features=200"}
    assert fb["model.embed_tokens"]["group_size"] == 32
    assert len(fb) == 2 * 7 + 1
    assert rows[-1]["notes"] == [  # one line per format and reason, not one per module
        "int4 group_size=32 on 13 module(s) (embed_tokens, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj): "
        "group_size=64 does not divide in_features=96",
        "int8 per channel (no group >= 16 fits) on 2 module(s) (down_proj): group_size=64 does not divide "
        "in_features=200"]

    loaded = load_checkpoint(tmp_path / "out").model
    layer = loaded.model.layers[1]
    assert isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(layer.mlp.up_proj, Int4Linear) and layer.mlp.up_proj.group_size == 32
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding) and loaded.model.embed_tokens.group_size == 32
    # save -> load is the identity: the same logits as the model quantized in memory
    from slmkit.compress.base import get_pass, make_config

    mem = load_checkpoint(tmp_path / "in").model.eval()
    mem, _ = get_pass("quant.int4").apply(mem, make_config("quant.int4", {"group_size": 64, "embeddings": True}))
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), mem(x))
        for choice in each_kernel_choice(loaded, mem):  # one row: the decode kernels
            assert torch.equal(loaded(x[:, :1]), mem(x[:, :1])), choice


def test_int4_without_fallbacks_reports_none(trained, tmp_path):
    rows = compress(trained, tmp_path / "q", [parse_pass("quant.int4:group_size=32")], speed=False)
    report = load_checkpoint(tmp_path / "q").provenance["passes"][-1]["report"]
    assert "fallbacks" not in report and "notes" not in rows[-1]


def test_progress_covers_calibration_eval_and_speed_with_the_right_totals(trained, tiny_dataset, tmp_path):
    from progress_capture import record_bars

    bars, hook = record_bars()
    rows = compress(trained, tmp_path / "c", [parse_pass("prune.wanda:sparsity=0.5,targets=gate_proj+up_proj"),
                                              parse_pass("lowrank.asvd:ratio=0.9,targets=down_proj"),
                                              parse_pass("quant.gptq:group_size=32")],
                    data=tiny_dataset, calib_samples=8, calib_seq_len=32, eval_tokens=100, speed=True,
                    progress=hook)
    assert len(rows) == 4
    windows = 4  # ceil(100 / 32) held-out windows per bits/byte
    for label in ("(input)", "prune.wanda", "lowrank.asvd", "quant.gptq"):
        assert bars.pop(f"{label}: held-out bits/byte (windows)") == [windows, windows]
        assert bars.pop(f"{label}: decode speed (runs)") == [4, 4]  # a warm-up and three timed runs
    assert bars.pop("prune.wanda: calibration, layer by layer") == [2, 2]
    assert bars.pop("lowrank.asvd: calibration forward (sequences)") == [8, 8]
    assert bars.pop("lowrank.asvd: SVD (projections)") == [2, 2]
    assert bars.pop("quant.gptq: GPTQ (decoder layers)") == [2, 2]
    assert bars == {}


def test_slm_compress_draws_bars_on_a_terminal_and_is_silent_when_quiet(trained, tiny_dataset, tmp_path,
                                                                       monkeypatch):
    from progress_capture import run_slm

    args = ["compress", trained, "--data", tiny_dataset, "--pass", "quant.int8", "--calib-seq-len", "32",
            "--eval-tokens", "64"]
    out, err = run_slm(monkeypatch, *args, "-o", tmp_path / "a", terminal=True)
    for text in ("(input): held-out bits/byte", "quant.int8: held-out bits/byte", "quant.int8: decode speed",
                 "2/2", "4/4", "quant.int8: done"):
        assert text in err, err
    assert "held-out bits/byte" not in out and "wrote" in out
    out, err = run_slm(monkeypatch, *args, "-o", tmp_path / "b", "--quiet", terminal=True)
    assert err == "" and "wrote" in out
    out, err = run_slm(monkeypatch, *args, "-o", tmp_path / "c", terminal=False)  # a pipe: lines, no bars
    assert "held-out bits/byte" not in err and "quant.int8: done" in err


def test_gptq_falls_back_per_layer_reloads_and_generates(tiny_dataset, tmp_path):
    """Hidden 72 with group_size=64: no power-of-two group >= 16 divides 72, so those projections are int8 per
    channel (GPTQ-chosen codes); down_proj's 160 takes group 32. Each fallback is reported and replayed on load."""
    from slmkit.checkpoint import save_checkpoint
    from slmkit.compress.base import calibration_from_dataset, get_pass, make_config
    from slmkit.compress.qlinear import Int4Linear, Int8Linear
    from slmkit.data import open_dataset
    from slmkit.model import CausalLM, ModelConfig
    from slmkit.serve.generate import SamplingParams, generate

    ds = open_dataset(tiny_dataset)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=ds.vocab_size, hidden_size=72, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=ds.bos_token_id, eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id)
    save_checkpoint(CausalLM(cfg), tmp_path / "in", tokenizer_from=tiny_dataset)
    rows = compress(tmp_path / "in", tmp_path / "out", [parse_pass("quant.gptq:group_size=64")], data=tiny_dataset,
                    calib_samples=8, calib_seq_len=32, eval_tokens=256, speed=False)
    ck = load_checkpoint(tmp_path / "out")
    report = ck.provenance["passes"][-1]["report"]
    fb = report["fallbacks"]
    assert len(report["modules"]) == len(fb) == 2 * 7
    why72 = "group_size=64 does not divide in_features=72"
    assert fb["model.layers.0.self_attn.q_proj"] == {"bits": 8, "kernel": "weight_only", "reason": why72}
    assert fb["model.layers.1.mlp.down_proj"] == {"bits": 4, "group_size": 32,
                                                   "reason": "group_size=64 does not divide in_features=160"}
    assert rows[-1]["notes"] == [
        f"int8 per channel (no group >= 16 fits) on 12 module(s) (gate_proj, k_proj, o_proj, q_proj, up_proj, "
        f"v_proj): {why72}",
        "int4 group_size=32 on 2 module(s) (down_proj): group_size=64 does not divide in_features=160"]
    assert set(report["layers"]) == set(fb)  # every module was quantized by GPTQ, fallbacks included
    layer = ck.model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert layer.mlp.down_proj.group_size == 32
    assert 0 < rows[-1]["bits_per_byte"] < 2 * rows[0]["bits_per_byte"]
    # save -> load is the identity: the pass applied in memory to the same calibration gives the same logits
    mem = load_checkpoint(tmp_path / "in").model.eval()
    mem, _ = get_pass("quant.gptq").apply(mem, make_config("quant.gptq", {"group_size": 64}),
                                          calibration_from_dataset(ds, samples=8, seq_len=32))
    x = torch.randint(0, ds.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(ck.model.eval()(x), mem(x))
    prompts = ["def add(a, b):", "class Point:", "for i in"]
    for dtype in (None, torch.bfloat16):  # bf16: int8 rows of width 72 must take the safe path on AVX-512
        out = generate(ck.model, ck.tokenizer(), prompts, SamplingParams(max_new_tokens=6, temperature=0,
                                                                        stop_token_ids=[]), dtype=dtype)
        assert [len(o.token_ids) for o in out] == [6, 6, 6]
