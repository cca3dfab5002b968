"""Teacher logit cache: round trip against the online teacher, resumability, refusals, KD batches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data import TokenizerMismatchError, build_dataset, open_dataset
from slmkit.distill import teacher_cache as tc
from slmkit.distill.teacher_cache import (CachedKDBatches, TeacherCacheError, build_teacher_cache,
                                          open_teacher_cache)
from slmkit.model import CausalLM, ModelConfig

SEQ, K = 16, 8

TEXTS = {
    "code.py": "\n".join(f"def f_{i}(x, y={i}):\n    return [x * y + {i} for _ in range({i % 5 + 1})]\n"
                         for i in range(25)),
    "prose.md": ("# Notes on distillation\n\nA small student learns from a larger teacher's distribution. "
                 "Top-k log-probabilities keep most of the mass; the tail holds the rest.\n") * 8,
    "log.txt": "\n".join(f"2024-05-{i % 28 + 1:02d} INFO request id={i * 37 % 1000} took {i * 3 % 97} ms"
                         for i in range(60)),
    "mixed.txt": "café naïve Größe — quotes “like this”, numbers 3.14159 2.71828, emails a@b.example\n" * 10,
}


def _corpus(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True)
    for name, text in TEXTS.items():
        (root / name).write_text(text, encoding="utf-8")
    if extra:
        (root / "extra.txt").write_text(extra, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    base = tmp_path_factory.mktemp("tc")
    build_dataset([str(_corpus(base / "corpus"))], base / "ds", vocab_size=300, val_fraction=0.2, progress=False)
    return open_dataset(base / "ds")


def _teacher(ds, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    # A larger init scale than the default so the tiny random teacher is peaked, not near-uniform.
    cfg = ModelConfig(vocab_size=ds.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return save_checkpoint(CausalLM(cfg), out, tokenizer_from=ds.path)


@pytest.fixture(scope="module")
def teacher(ds, tmp_path_factory):
    return _teacher(ds, tmp_path_factory.mktemp("teacher") / "t", seed=0)


@pytest.fixture(scope="module")
def cache_dir(ds, teacher, tmp_path_factory):
    t0 = time.perf_counter()
    out = build_teacher_cache(teacher, ds.path, tmp_path_factory.mktemp("cache") / "c", k=K, seq_len=SEQ,
                              batch_size=4, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    print(f"\ntiny teacher cache: {meta['num_chunks']} chunks x {SEQ} tokens, k={K}: {meta['bytes']} bytes, "
          f"{time.perf_counter() - t0:.3f} s (meta seconds {meta['seconds']})")
    return out


def _online(teacher_path: Path, ds, chunks, k=K, temperature=1.0):
    model = load_checkpoint(teacher_path).model
    stream = ds.split("train")
    x = torch.from_numpy(np.stack([stream.window(i * SEQ, SEQ) for i in chunks]))
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float() / temperature, dim=-1)  # (n, SEQ, V)
    return logp.topk(k, dim=-1)


def test_round_trip_matches_online_teacher(ds, teacher, cache_dir):
    cache = open_teacher_cache(cache_dir, teacher=teacher, dataset=ds.path, temperature=1.0)
    assert cache.num_chunks == (len(ds.split("train")) - 1) // SEQ > 8
    chunks = np.array([0, 3, cache.num_chunks - 1])
    ids, logprobs, tail = cache.chunk_arrays(chunks)
    assert ids.dtype == np.int64 and logprobs.dtype == np.float32 and tail.dtype == np.float32
    assert ids.shape == logprobs.shape == (3, SEQ, K) and tail.shape == (3, SEQ)
    want = _online(teacher, ds, chunks)
    np.testing.assert_array_equal(ids, want.indices.numpy())
    np.testing.assert_allclose(logprobs, want.values.numpy(), rtol=1e-3, atol=1e-4)
    assert (logprobs.max(-1) > np.log(2.0 / ds.vocab_size)).all()  # the teacher is not uniform: a real test
    total = np.exp(tail.astype(np.float64)) + np.exp(logprobs.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


def test_tail_is_exact_where_one_minus_sum_cancels():
    logits = torch.tensor([[[0.0, -30.0, -40.0, -50.0]]])
    ids, logprobs, tail = tc.teacher_topk(logits, k=1)
    assert ids.item() == 0
    expected = torch.logsumexp(torch.tensor([-30.0, -40.0, -50.0]), 0) - torch.logsumexp(logits[0, 0], 0)
    assert torch.isclose(tail[0, 0], expected, rtol=1e-6)  # log1p(-exp(lp)) would give -inf in float32
    assert tail.item() == pytest.approx(-30.0, abs=1e-3)


def test_k_equal_vocab_gives_minus_inf_tail(ds, teacher, tmp_path):
    out = build_teacher_cache(teacher, ds.path, tmp_path / "full", k=ds.vocab_size, seq_len=SEQ, max_chunks=2,
                              progress=False)
    cache = open_teacher_cache(out)
    ids, logprobs, tail = cache.chunk_arrays(np.arange(2))
    assert np.isneginf(tail).all()
    assert (np.sort(ids, -1) == np.arange(ds.vocab_size)).all()  # every token exactly once
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=2e-3)


def test_bf16_autocast_build(ds, teacher, tmp_path):
    out = build_teacher_cache(teacher, ds.path, tmp_path / "bf16", k=K, seq_len=SEQ, max_chunks=3,
                              autocast_dtype=torch.bfloat16, progress=False)
    cache = open_teacher_cache(out)
    assert cache.meta["autocast_dtype"] == "bfloat16" and cache.num_chunks == 3
    ids, logprobs, tail = cache.chunk_arrays(np.arange(3))
    want = _online(teacher, ds, range(3))
    assert (ids[..., 0] == want.indices.numpy()[..., 0]).mean() > 0.9  # bf16 may swap near-ties
    total = np.exp(tail.astype(np.float64)) + np.exp(logprobs.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


def test_files_and_meta(ds, teacher, cache_dir):
    meta = json.loads((cache_dir / "meta.json").read_text())
    files = ["topk_ids.bin", "topk_logprobs.bin", "tail_logprob.bin"]
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(files + ["meta.json"])  # progress.json removed
    assert meta["bytes"] == sum((cache_dir / f).stat().st_size for f in files)
    n = meta["num_chunks"]
    assert (cache_dir / "topk_ids.bin").stat().st_size == n * SEQ * K * 2  # uint16 for V <= 65536
    assert (cache_dir / "topk_logprobs.bin").stat().st_size == n * SEQ * K * 2
    assert (cache_dir / "tail_logprob.bin").stat().st_size == n * SEQ * 4
    assert meta["format"] == "slmkit.teacher_cache/1" and meta["tokens"] == n * SEQ
    assert meta["dtypes"] == {"topk_ids.bin": "uint16", "topk_logprobs.bin": "float16", "tail_logprob.bin": "float32"}
    prov = json.loads((teacher / "slmkit.json").read_text())
    assert meta["teacher"]["weights_sha256"] == prov["files"]["model.safetensors"]["sha256"]
    assert meta["dataset"]["tokenizer_sha256"] == ds.meta["tokenizer_sha256"]
    assert meta["dataset"]["train_tokens"] == len(ds.split("train"))


def test_default_out_and_rebuild_is_a_no_op(ds, teacher, monkeypatch):
    out = build_teacher_cache(teacher, ds.path, k=4, seq_len=SEQ, temperature=2.0, max_chunks=3, progress=False)
    sha = json.loads((teacher / "slmkit.json").read_text())["files"]["model.safetensors"]["sha256"]
    assert out == ds.path / "teacher_cache" / f"{sha[:12]}-k4-s{SEQ}-t2"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(tc, "_score_batch", lambda *a, **kw: pytest.fail("a complete cache was recomputed"))
    assert build_teacher_cache(teacher, ds.path, k=4, seq_len=SEQ, temperature=2.0, max_chunks=3, progress=False) == out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(TeacherCacheError, match="already holds a complete cache"):
        build_teacher_cache(teacher, ds.path, out, k=4, seq_len=SEQ, temperature=1.0, max_chunks=3, progress=False)


def test_cached_kd_batches(ds, cache_dir):
    cache = open_teacher_cache(cache_dir)
    stream = ds.split("train")
    batches = CachedKDBatches(cache, stream, global_batch=6, seed=7)
    b = batches.batch(3, slice(None))
    assert b["input_ids"].shape == b["labels"].shape == (6, SEQ) and b["input_ids"].dtype == torch.long
    assert b["teacher_topk_ids"].shape == (6, SEQ, K) and b["teacher_topk_ids"].dtype == torch.long
    assert b["teacher_topk_logprobs"].dtype == torch.float32 and b["teacher_tail_logprob"].shape == (6, SEQ)
    chunks = batches.chunks(3)
    ids, logprobs, tail = cache.chunk_arrays(chunks)
    for r, i in enumerate(chunks):
        w = stream.window(int(i) * SEQ, SEQ + 1)
        assert b["input_ids"][r].tolist() == w[:-1].tolist() and b["labels"][r].tolist() == w[1:].tolist()
    assert torch.equal(b["teacher_topk_ids"], torch.from_numpy(ids))
    assert torch.equal(b["teacher_topk_logprobs"], torch.from_numpy(logprobs))
    assert torch.equal(b["teacher_tail_logprob"], torch.from_numpy(tail))
    # a pure function of (seed, step)
    again = CachedKDBatches(cache, stream, global_batch=6, seed=7).batch(3, slice(None))
    assert all(torch.equal(b[key], again[key]) for key in b)
    other = batches.batch(4, slice(None))
    assert not torch.equal(b["input_ids"], other["input_ids"])
    # rank slices partition the global batch
    parts = [batches.batch(3, slice(r, r + 2)) for r in (0, 2, 4)]
    for key in b:
        assert torch.equal(torch.cat([p[key] for p in parts]), b[key])
    with pytest.raises(TeacherCacheError, match="train split"):
        CachedKDBatches(cache, ds.split("val"), global_batch=2, seed=0)


def test_refuses_another_teacher(ds, teacher, cache_dir, tmp_path):
    other = _teacher(ds, tmp_path / "other", seed=1)
    with pytest.raises(TeacherCacheError) as e:
        open_teacher_cache(cache_dir, teacher=other)
    msg = str(e.value)
    assert str(teacher.resolve()) in msg and str(other.resolve()) in msg and "was built with teacher" in msg
    open_teacher_cache(cache_dir, teacher=load_checkpoint(teacher))  # a loaded Checkpoint works too


def test_refuses_another_dataset_and_temperature(ds, cache_dir, tmp_path):
    (tmp_path / "ds2").mkdir()
    for f in ("meta.json", "tokenizer.json"):
        (tmp_path / "ds2" / f).write_bytes((ds.path / f).read_bytes())
    meta = json.loads((ds.path / "meta.json").read_text())
    meta["sources"] = ["somewhere else"]
    (tmp_path / "ds2" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherCacheError, match="was built on dataset"):
        open_teacher_cache(cache_dir, dataset=tmp_path / "ds2")
    open_teacher_cache(cache_dir, dataset=ds)  # the Dataset object itself is fine
    with pytest.raises(TeacherCacheError, match="rebuilt with that temperature"):
        open_teacher_cache(cache_dir, temperature=2.0)


def test_refuses_truncated_file(cache_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in cache_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    data = (copy / "topk_logprobs.bin").read_bytes()
    (copy / "topk_logprobs.bin").write_bytes(data[:-10])
    pattern = rf"topk_logprobs\.bin has {len(data) - 10} bytes, expected {len(data)}"
    with pytest.raises(TeacherCacheError, match=pattern):
        open_teacher_cache(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(TeacherCacheError, match="not a complete teacher cache"):
        open_teacher_cache(copy)


def test_refuses_before_work(ds, teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "_score_batch", lambda *a, **kw: pytest.fail("refusal came after work started"))
    monkeypatch.setattr(tc, "load_checkpoint", lambda *a, **kw: pytest.fail("weights loaded before refusing"))
    corpus = _corpus(tmp_path / "corpus", extra=" ".join(f"word{i} token{i * 7}" for i in range(400)))
    build_dataset([str(corpus)], tmp_path / "big", vocab_size=420, val_fraction=0.2, progress=False)
    big = open_dataset(tmp_path / "big")
    assert big.vocab_size > ds.vocab_size
    with pytest.raises(TeacherCacheError, match="--tokenizer"):
        build_teacher_cache(teacher, big.path, tmp_path / "c", k=K, seq_len=SEQ, progress=False)
    # same vocabulary size, different tokenizer.json: ids would mean other strings
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = json.loads((ds.path / "tokenizer.json").read_text())
    (tok_dir / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same vocabulary, other bytes
    retok = save_checkpoint(load_checkpoint(teacher).model, tmp_path / "retok", tokenizer_from=tok_dir)
    with pytest.raises(TokenizerMismatchError, match="is not the tokenizer dataset"):
        build_teacher_cache(retok, ds.path, tmp_path / "c", k=K, seq_len=SEQ, progress=False)
    for kwargs, pattern in [({"k": 0}, "k=0"), ({"k": ds.vocab_size + 1}, "k="), ({"seq_len": 0}, "seq_len=0"),
                            ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
                            ({"seq_len": len(ds.split("train"))}, "fewer than one chunk"),
                            ({"seq_len": 2049}, "exceeds the teacher's context")]:
        args = {"k": K, "seq_len": SEQ, **kwargs}
        with pytest.raises(TeacherCacheError, match=pattern):
            build_teacher_cache(teacher, ds.path, tmp_path / "c", progress=False, **args)
    assert not (tmp_path / "c").exists()


def test_resume_gives_identical_files(ds, teacher, cache_dir, tmp_path, monkeypatch):
    real, calls = tc._score_batch, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tc, "_score_batch", crash_on_third)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, ds.path, out, k=K, seq_len=SEQ, batch_size=4, progress=False)
    assert not (out / "meta.json").exists()
    assert json.loads((out / "progress.json").read_text())["chunks_done"] == 8
    with pytest.raises(TeacherCacheError, match="interrupted"):
        open_teacher_cache(out)
    with pytest.raises(TeacherCacheError, match="partial cache built from other inputs"):
        build_teacher_cache(teacher, ds.path, out, k=K + 1, seq_len=SEQ, batch_size=4, progress=False)

    calls.clear()
    monkeypatch.setattr(tc, "_score_batch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    build_teacher_cache(teacher, ds.path, out, k=K, seq_len=SEQ, batch_size=4, progress=True)
    n = json.loads((out / "meta.json").read_text())["num_chunks"]
    assert len(calls) == -(-n // 4) - 2  # only the batches the interrupted run had not flushed
    for name in ("topk_ids.bin", "topk_logprobs.bin", "tail_logprob.bin"):
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name
    assert not (out / "progress.json").exists()
    open_teacher_cache(out, teacher=teacher, dataset=ds)
