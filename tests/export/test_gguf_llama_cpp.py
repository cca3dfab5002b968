"""llama.cpp itself reads slmkit's GGUF files: it tokenizes exactly as slmkit for every pre-tokenizer the exporter
names, scores and decodes like the slmkit model for every family, runs the quantized files, and takes SmolLM2
back after `slm import gguf` (and prune.vocab) -> `slm export gguf`. llama.cpp runs through node-llama-cpp's
prebuilt binaries (`llama_cpp_node.py` says how to install them); without them these tests skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")

from llama_cpp_node import llama_cpp  # noqa: E402
from test_gguf import (CASES, CORPUS, TEXTS, VOCAB, make_checkpoint, prompt_ids, read_gguf,  # noqa: E402
                       reference_logits, slm_tokenizer_dir)  # noqa: E402,F401 (slm_tokenizer_dir: a fixture)

from slmkit.checkpoint import load_checkpoint  # noqa: E402
from slmkit.data.tokenizer import encode_documents  # noqa: E402
from slmkit.export import export_gguf  # noqa: E402
from slmkit.export.gguf_tokenizer import PRE_TOKENIZERS  # noqa: E402
from slmkit.serve.generate import SamplingParams, encode_prompts, generate  # noqa: E402

PROMPTS = ["def add(a, b):", "The quick brown"]


def _tokenizer_checkpoint(tmp_path: Path, pre: str) -> Path:
    """A checkpoint whose tokenizer is trained with the split llama.cpp uses for `pre`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=PRE_TOKENIZERS[pre].ignore_merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre].build()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return make_checkpoint(tmp_path / "ck", d)


def _log_softmax(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1).numpy()


def _assert_close_log_probs(theirs: np.ndarray, ours: np.ndarray, atol: float) -> None:
    """llama.cpp returns probabilities (float32), so compare log-probabilities where they are representable."""
    assert theirs.shape == ours.shape
    seen = ours > -30
    assert np.all(theirs[~seen] < -25)
    assert np.abs(theirs[seen] - ours[seen]).max() <= atol


def _prompt_ids(llm, ckpt, prompts: list[str]) -> list[list[int]]:
    """llama.cpp's ids of each prompt, bos first when the model has one; asserted equal to slmkit's."""
    bos = ckpt.config.bos_token_id
    ids = [([bos] if bos is not None else []) + t for t in llm.tokenize(prompts)]
    assert ids == encode_prompts(ckpt.tokenizer(), prompts, bos)
    return ids


def _slmkit_greedy(ckpt, prompts: list[str], steps: int) -> list[list[int]]:
    """One prompt at a time: no padding in the batch, so the arithmetic is that of a single sequence."""
    params = SamplingParams(max_new_tokens=steps, temperature=0.0, stop_token_ids=[])
    return [generate(ckpt.model, ckpt.tokenizer(), [p], params)[0].token_ids for p in prompts]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_llama_cpp_tokenizes_exactly_as_slmkit(tmp_path, slm_tokenizer_dir, pre):
    from tokenizers import Tokenizer

    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir) if pre == "gpt-2" else _tokenizer_checkpoint(tmp_path, pre)
    path = export_gguf(ck, tmp_path / "m.gguf", type="f32").path
    assert read_gguf(path)[0]["tokenizer.ggml.pre"] == pre
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    llm = llama_cpp(path, vocab_only=True)
    assert llm.tokenize(TEXTS) == encode_documents(tok, TEXTS)
    assert llm.tokenize(["<|bos|>x"], special=True)[0][0] == 1  # control tokens parse as special


@pytest.mark.parametrize("case", ["llama-tied", "llama3-untied", "qwen2", "mixtral", "llama-biases-mqa", "phi3",
                                  "head-dim-32"])
def test_llama_cpp_scores_and_decodes_like_slmkit(tmp_path, slm_tokenizer_dir, case):
    # Named after the case: llama.cpp special-cases models *named* phi3, which the export must avoid.
    ck = make_checkpoint(tmp_path / case, slm_tokenizer_dir, initializer_range=0.2, **CASES[case])
    path = export_gguf(ck, tmp_path / "m.gguf", type="f32").path
    ckpt = load_checkpoint(ck)
    ids = prompt_ids(seed=3)
    llm = llama_cpp(path, context=128)
    _assert_close_log_probs(llm.log_probs(ids), _log_softmax(ckpt.model, ids), atol=1e-3)
    assert llm.greedy(_prompt_ids(llm, ckpt, PROMPTS), 16) == _slmkit_greedy(ckpt, PROMPTS, 16)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("overrides", [CASES["llama3-untied"], dict(hidden_size=48, intermediate_size=96),
                                       dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1)],
                         ids=["llama3", "f16-fallbacks", "q6_k-output"])
def test_llama_cpp_runs_quantized_files(tmp_path, slm_tokenizer_dir, file_type, overrides):
    """llama.cpp loads the mixed-type files and agrees with the dequantized weights; not exactly, because its
    quantized matmuls also round the activations (to q8_0/q8_1)."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, initializer_range=0.2, **overrides)
    path = export_gguf(ck, tmp_path / "m.gguf", type=file_type).path
    ids = prompt_ids(seed=3)
    scores = llama_cpp(path, context=128).log_probs(ids)
    meta, tensors = read_gguf(path)
    if overrides.get("hidden_size") == 256 and file_type == "q4_0":  # rows of 256: the tied output at Q6_K
        assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    reference = reference_logits(meta, tensors, ids).numpy()
    assert np.mean(scores.argmax(-1) == reference.argmax(-1)) >= 0.8


# -- SmolLM2-135M-Instruct ---------------------------------------------------------------------------

@pytest.mark.slow
def test_llama_cpp_tokenizes_smollm2_as_the_imported_tokenizer(smollm2_checkpoint, smollm2_f32_gguf,
                                                               smollm2_vocab_trimmed, smollm2_vocab_trimmed_f32_gguf,
                                                               held_out_documents):
    """Every held-out default-domain document: llama.cpp's ids with the original file's vocabulary, with the
    re-exported file's, and with the vocab-trimmed export's equal slmkit's tokenizer of that checkpoint."""
    from slmkit.export import smollm2_gguf_path

    for path, ck in [(smollm2_gguf_path(), smollm2_checkpoint), (smollm2_f32_gguf, smollm2_checkpoint),
                     (smollm2_vocab_trimmed_f32_gguf, smollm2_vocab_trimmed)]:
        ours = encode_documents(load_checkpoint(ck).tokenizer(), held_out_documents)
        theirs = llama_cpp(path, vocab_only=True).tokenize(held_out_documents)
        for doc, a, b in zip(held_out_documents, theirs, ours):
            assert a == b, (path.name, doc[:80])


SMOLLM2_PROMPTS = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
                   "import os\n\n\ndef list_python_files(root):\n",
                   "The json module in Python"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, exported", [("smollm2_checkpoint", "smollm2_f32_gguf"),
                                                  ("smollm2_vocab_trimmed", "smollm2_vocab_trimmed_f32_gguf")],
                         ids=["imported", "vocab-trimmed"])
def test_llama_cpp_decodes_exported_smollm2_like_slmkit(request, checkpoint, exported):
    """`import gguf` -> (prune.vocab) -> `export gguf --type f32`: llama.cpp's greedy tokens equal slmkit's fp32
    greedy tokens, and its next-token log-probabilities over the first prompt agree (measured: within 3e-4)."""
    ckpt = load_checkpoint(request.getfixturevalue(checkpoint))
    llm = llama_cpp(request.getfixturevalue(exported))
    prompts = _prompt_ids(llm, ckpt, SMOLLM2_PROMPTS)  # SmolLM2 has no bos
    assert llm.greedy(prompts, 24) == _slmkit_greedy(ckpt, SMOLLM2_PROMPTS, 24)
    _assert_close_log_probs(llm.log_probs(prompts[0]), _log_softmax(ckpt.model, prompts[0]), atol=2e-3)
