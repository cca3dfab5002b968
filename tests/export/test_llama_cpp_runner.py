"""slmkit.llamacpp, the llama.cpp runner: bits per byte computed by llama.cpp on an f32 export equals slmkit's on
the checkpoint (same windows, same definition), every path of its per-token scoring agrees with the full
distribution, timed decoding returns the greedy tokens with sane clocks, and a missing node or node-llama-cpp is an
error that says what to install. The llama.cpp tests skip without node-llama-cpp (see llama_cpp_node.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")

from llama_cpp_node import llama_cpp  # noqa: E402
from test_gguf import make_checkpoint  # noqa: E402

from slmkit.checkpoint import load_checkpoint  # noqa: E402
from slmkit.data import open_dataset, token_byte_lengths  # noqa: E402
from slmkit.evaluate.lm import evaluate_lm  # noqa: E402
from slmkit.export import export_gguf  # noqa: E402
from slmkit.llamacpp import (ENV, INSTALL, SCRIPT, LlamaCpp, LlamaCppError, LlamaCppProcess,  # noqa: E402
                             LlamaCppUnavailable, unavailable)
from slmkit.llamacpp import evaluate_lm as llama_cpp_evaluate_lm  # noqa: E402

# Measured on this test: 1e-8 relative (float32 arithmetic in both engines, in different orders); margin for
# other CPUs, whose kernels sum in other orders.
BPB_RTOL = 1e-5


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model on the default domain's tokenizer (weights far from uniform, so that targets are often not
    the argmax and some are very unlikely) and its f32 GGUF export."""
    root = tmp_path_factory.mktemp("runner")
    vocab = open_dataset(tiny_dataset).vocab_size
    ck = make_checkpoint(root / "ck", tiny_dataset, vocab_size=vocab, initializer_range=0.2,
                         max_position_embeddings=256)
    return ck, export_gguf(ck, root / "m.gguf", type="f32").path


def test_bits_per_byte_in_llama_cpp_equals_slmkits(tiny_dataset, exported):
    ck, path = exported
    ds = open_dataset(tiny_dataset)
    val, lengths = ds.split("val"), token_byte_lengths(ds.tokenizer())
    ours = evaluate_lm(load_checkpoint(ck).model, val, lengths, seq_len=96, max_tokens=700)
    theirs = llama_cpp_evaluate_lm(llama_cpp(path, threads=2), val, lengths, seq_len=96, max_tokens=700)
    assert (theirs["tokens"], theirs["bytes"]) == (ours["tokens"], ours["bytes"]) == (700, ours["bytes"])
    assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=BPB_RTOL)
    assert theirs["loss"] == pytest.approx(ours["loss"], rel=BPB_RTOL)
    assert abs(theirs["accuracy"] - ours["accuracy"]) <= 2 / 700  # an argmax may flip on a near tie


def test_every_scoring_path_agrees_with_the_full_distribution(tiny_dataset, exported):
    """Greedy confidence (target = argmax), the biased top-k pass and the whole-distribution fallback."""
    _, path = exported
    llm = llama_cpp(path)
    prompt = open_dataset(tiny_dataset).split("val").window(0, 60).tolist()
    ids = prompt + llm.greedy([prompt], 20)[0]  # the last 20 targets are the argmax
    full = llm.log_probs(ids[:-1])  # (79, V)
    expected = full[np.arange(len(ids) - 1), ids[1:]]
    default = llm.score(ids)
    assert default.second_pass == 60 - 1 - np.sum(full.argmax(-1)[:59] == ids[1:60])
    assert np.array_equal(default.argmax, full.argmax(-1))
    np.testing.assert_allclose(default.log_probs, expected, rtol=0, atol=2e-5)  # the bias's float32 rounding
    no_bias = llm.score(ids, top_k=2, bias=0)  # most targets fall outside the top 2: the whole distribution
    assert no_bias.full_pass > 0
    np.testing.assert_allclose(no_bias.log_probs, expected, rtol=0, atol=1e-6)


def test_timed_decode_returns_the_greedy_tokens_and_its_clock(tiny_dataset, exported):
    _, path = exported
    val = open_dataset(tiny_dataset).split("val")
    prompts = [val.window(s, 40 + 7 * s).tolist() for s in range(3)]
    llm = llama_cpp(path, threads=2)
    one = llm.timed_decode(prompts[0], 12)
    assert one.tokens == llm.greedy(prompts[:1], 12)
    times = one.times_ms[0]
    assert len(times) == 12 and times[0] > 0 and all(b >= a for a, b in zip(times, times[1:]))
    assert one.time_to_first_token_ms == times[0] and one.decode_tokens_per_s > 0
    batch = llm.timed_batch_decode(prompts, 8)
    assert batch.tokens == llm.greedy(prompts, 8)  # each sequence decodes as it would alone
    assert [len(t) for t in batch.times_ms] == [8, 8, 8]
    assert batch.time_to_first_token_ms > 0 and batch.decode_tokens_per_s > 0
    fast = LlamaCpp(path, threads=2, kv_type="f16", flash_attention="auto").timed_decode(prompts[0], 4)
    assert len(fast.tokens[0]) == 4 and fast.decode_tokens_per_s > 0


def test_a_file_llama_cpp_cannot_load_is_a_clear_error(tmp_path, exported):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 10)
    llama_cpp(exported[1])  # skips here without node-llama-cpp
    with LlamaCppProcess() as process:
        with pytest.raises(LlamaCppError, match="bad.gguf"):
            LlamaCpp(bad, process=process).tokenize(["x"])
        assert LlamaCpp(exported[1], vocab_only=True, process=process).tokenize(["def"])  # still serving
        with pytest.raises(LlamaCppError, match="vocab_only"):
            LlamaCpp(exported[1], vocab_only=True, process=process).score([1, 2, 3])


def test_missing_node_llama_cpp_says_what_to_install(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    empty = tmp_path / "empty-prefix"
    empty.mkdir()
    monkeypatch.setenv(ENV, str(empty))
    reason = unavailable()
    assert reason is not None and INSTALL in reason
    with pytest.raises(LlamaCppUnavailable) as e:
        LlamaCpp(model, process=LlamaCppProcess()).tokenize(["x"])
    assert str(e.value) == reason
    if "node-llama-cpp is not installed" in reason:  # node is here: the message names the prefix looked in
        assert str(empty) in reason and ENV in reason


def test_missing_node_says_so(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path))  # no node on it
    with pytest.raises(LlamaCppUnavailable, match="node is not installed.*npm i"):
        LlamaCpp(model, process=LlamaCppProcess()).tokenize(["x"])


def test_the_node_script_ships_with_the_package():
    assert SCRIPT.is_file() and SCRIPT.parent.name == "llamacpp"
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "llamacpp/*.mjs" in pyproject["tool"]["setuptools"]["package-data"]["slmkit"]
