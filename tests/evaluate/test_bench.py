"""`bench_checkpoint`: every figure is present, positive and consistent with the checkpoint on disk."""

from __future__ import annotations

import pytest
import torch

from slmkit.checkpoint import save_checkpoint
from slmkit.evaluate.bench import BenchConfig, bench_checkpoint, bench_in_subprocess
from slmkit.model import CausalLM, ModelConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_dataset):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return save_checkpoint(CausalLM(cfg), tmp_path_factory.mktemp("b") / "ck", tokenizer_from=tiny_dataset)


def test_bench_reports_every_figure(ckpt):
    cfg = BenchConfig(prompt_len=16, new_tokens=8, batch_sizes=(1, 4), repeats=2)
    r = bench_checkpoint(ckpt, cfg)
    for key in ("prefill_tok_s_b1", "decode_tok_s_b1", "prefill_tok_s_b4", "decode_tok_s_b4", "ttft_ms",
                "decode_ms_per_token", "peak_rss_bytes"):
        assert r[key] > 0, key
    assert r["decode_ms_per_token"] == pytest.approx(1000 / r["decode_tok_s_b1"])
    assert r["bytes_on_disk"] == sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    assert r["parameters"] == r["nonzero_parameters"] == r["active_parameters"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"] == torch.__version__


def test_bench_in_a_fresh_process_and_bad_config(ckpt):
    r = bench_in_subprocess(ckpt, BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=1))
    assert r["decode_tok_s_b1"] > 0 and r["peak_rss_bytes"] > 0
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        bench_checkpoint(ckpt, BenchConfig(prompt_len=120, new_tokens=16, repeats=1))
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int3")


def test_side_by_side_times_every_model_in_rotating_rounds(ckpt, monkeypatch):
    from slmkit.evaluate import bench as bench_mod
    from slmkit.checkpoint import load_checkpoint

    models = {"a": load_checkpoint(ckpt).model, "b": load_checkpoint(ckpt).model, "c": load_checkpoint(ckpt).model}
    order = []
    real = bench_mod._time_once

    def spy(model, batch, cfg, amp):
        order.append(next(n for n, m in models.items() if m is model))
        return real(model, batch, cfg, amp)

    monkeypatch.setattr(bench_mod, "_time_once", spy)
    cfg = BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=3)
    out = bench_mod.bench_side_by_side(models, cfg)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then 3 rotations
    for n in models:
        assert out[n]["decode_tok_s_b1"] > 0 and out[n]["prefill_tok_s_b1"] > 0 and out[n]["ttft_ms"] > 0


def test_side_by_side_in_a_fresh_process(ckpt):
    from slmkit.evaluate.bench import side_by_side_in_subprocess

    out = side_by_side_in_subprocess({"x": ckpt, "y": ckpt}, BenchConfig(prompt_len=8, new_tokens=4,
                                                                          batch_sizes=(1, 2), repeats=1))
    assert set(out) == {"x", "y"} and all(out[n]["decode_tok_s_b2"] > 0 for n in out)
    with pytest.raises(RuntimeError, match="benchmark of --side-by-side"):
        side_by_side_in_subprocess({"x": ckpt.parent / "missing"}, BenchConfig(repeats=1))
