"""`bench_checkpoint`: every figure is present, positive and consistent with the checkpoint on disk."""

from __future__ import annotations

import pytest
import torch

from slmkit.checkpoint import save_checkpoint
from slmkit.evaluate.bench import BenchConfig, bench_checkpoint, bench_in_subprocess, bench_runs
from slmkit.model import CausalLM, ModelConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_dataset):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return save_checkpoint(CausalLM(cfg), tmp_path_factory.mktemp("b") / "ck", tokenizer_from=tiny_dataset)


def test_bench_reports_every_figure(ckpt):
    cfg = BenchConfig(prompt_len=16, new_tokens=8, batch_sizes=(1, 4), repeats=2)
    runs = []
    r = bench_checkpoint(ckpt, cfg, progress=runs.append)
    assert runs == [1] * bench_runs(cfg) and bench_runs(cfg) == 2 * (1 + 2)  # a warm-up and 2 runs per batch size
    for key in ("prefill_tok_s_b1", "decode_tok_s_b1", "prefill_tok_s_b4", "decode_tok_s_b4", "ttft_ms",
                "decode_ms_per_token", "peak_rss_bytes"):
        assert r[key] > 0, key
    assert r["decode_ms_per_token"] == pytest.approx(1000 / r["decode_tok_s_b1"])
    assert r["bytes_on_disk"] == sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    assert r["parameters"] == r["nonzero_parameters"] == r["active_parameters"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"] == torch.__version__


def test_bench_in_a_fresh_process_and_bad_config(ckpt):
    cfg = BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=1)
    runs = []
    r = bench_in_subprocess(ckpt, cfg, progress=runs.append)  # the child's runs relayed as they finish
    assert r["decode_tok_s_b1"] > 0 and r["peak_rss_bytes"] > 0
    assert runs == [1] * bench_runs(cfg) == [1, 1]
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        bench_checkpoint(ckpt, BenchConfig(prompt_len=120, new_tokens=16, repeats=1))
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int3")


def test_side_by_side_interleaves_models_in_rotating_rounds(ckpt, monkeypatch):
    from slmkit.checkpoint import load_checkpoint
    from slmkit.evaluate import bench as bench_mod

    models = {"a": load_checkpoint(ckpt).model, "b": load_checkpoint(ckpt).model, "c": load_checkpoint(ckpt).model}
    events = []
    real_prefill, real_decode = bench_mod._Run.prefill, bench_mod._Run.decode

    def name(run):
        return next(n for n, m in models.items() if m is run.model)

    def prefill(self):
        events.append(("prefill", name(self)))
        return real_prefill(self)

    def decode(self, n):
        events.append(("decode", name(self), n))
        return real_decode(self, n)

    monkeypatch.setattr(bench_mod._Run, "prefill", prefill)
    monkeypatch.setattr(bench_mod._Run, "decode", decode)
    monkeypatch.setattr(bench_mod, "SIDE_BY_SIDE_CHUNK", 3)
    cfg = BenchConfig(prompt_len=8, new_tokens=5, batch_sizes=(1,), repeats=2)
    out = bench_mod.bench_side_by_side(models, cfg)
    warm = [e for n in "abc" for e in (("prefill", n), ("decode", n, 5))]
    round0 = [("prefill", n) for n in "abc"] + [("decode", n, 3) for n in "abc"] + [("decode", n, 2) for n in "abc"]
    round1 = [("prefill", n) for n in "bca"] + [("decode", n, 3) for n in "bca"] + [("decode", n, 2) for n in "bca"]
    assert events == warm + round0 + round1  # warm-up, then turns of 3 steps, the order rotating per round
    for n in models:
        r = out[n]
        assert r["decode_tok_s_b1"] > 0 and r["prefill_tok_s_b1"] > 0 and r["ttft_ms"] > 0
        assert r["decode_ms_per_token"] == pytest.approx(1000 / r["decode_tok_s_b1"])


def test_side_by_side_in_a_fresh_process(ckpt):
    from slmkit.evaluate.bench import side_by_side_in_subprocess

    cfg = BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=1)
    runs = []
    out = side_by_side_in_subprocess({"x": ckpt, "y": ckpt}, cfg, progress=runs.append)
    assert set(out) == {"x", "y"} and all(out[n]["decode_tok_s_b2"] > 0 for n in out)
    assert len(runs) == bench_runs(cfg, models=2) == 2 * (2 + 1)  # per batch size: 2 warm-ups and 1 round
    with pytest.raises(RuntimeError, match="benchmark of --side-by-side"):
        side_by_side_in_subprocess({"x": ckpt.parent / "missing"}, BenchConfig(repeats=1))


def test_peak_memory_of_a_child_is_its_own(ckpt):
    """A child started from a large parent reports its own high-water mark, not the parent's."""
    ballast = torch.ones(400 * 2**20 // 4)  # 400 MiB in this (parent) process
    ballast.add_(1)  # touch it: resident
    r = bench_in_subprocess(ckpt, BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=1))
    from slmkit.evaluate.bench import peak_rss_bytes

    assert peak_rss_bytes() > 400 * 2**20
    assert r["peak_rss_bytes"] < peak_rss_bytes() - 300 * 2**20
    del ballast
