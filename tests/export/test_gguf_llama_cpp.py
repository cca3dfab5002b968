"""llama.cpp itself (through llama-cpp-python, optional) reads slmkit's GGUF files: it tokenizes exactly as
slmkit, scores and decodes like the slmkit model for every family, and runs the quantized files. Skipped where
llama-cpp-python is not installed (it compiles llama.cpp, minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")

from test_gguf import (CASES, CORPUS, TEXTS, VOCAB, make_checkpoint, prompt_ids, read_gguf,  # noqa: E402
                       reference_logits, slm_tokenizer_dir)  # noqa: E402,F401 (slm_tokenizer_dir: a fixture)

from slmkit.checkpoint import load_checkpoint  # noqa: E402
from slmkit.data.tokenizer import encode_documents  # noqa: E402
from slmkit.export import export_gguf  # noqa: E402
from slmkit.export.gguf import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; `pip install llama-cpp-python` (compiles "
                            "llama.cpp, minutes) runs these llama.cpp parity checks")
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=1, **kwargs)


def _tokenizer_checkpoint(tmp_path: Path, regex: str | None, ignore_merges: bool = False) -> Path:
    """A checkpoint whose tokenizer splits with `regex` (None: slmkit's GPT-2 ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return make_checkpoint(tmp_path / "ck", d)


@pytest.mark.parametrize("regex, ignore_merges", [(None, False), (LLAMA3_REGEX, True), (QWEN2_REGEX, False)],
                         ids=["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_exactly_as_slmkit(tmp_path, slm_tokenizer_dir, regex, ignore_merges):
    from tokenizers import Tokenizer

    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir) if regex is None else \
        _tokenizer_checkpoint(tmp_path, regex, ignore_merges)
    path = export_gguf(ck, tmp_path / "m.gguf", type="f32").path
    llm = _llama(path, vocab_only=True)
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == encode_documents(tok, [text])[0], text
    assert llm.tokenize(b"<|bos|>x", add_bos=False, special=True)[0] == 1  # control tokens parse as special


@pytest.mark.parametrize("case", ["llama-tied", "llama3-untied", "qwen2", "mixtral", "llama-biases-mqa", "phi3",
                                  "head-dim-32"])
def test_llama_cpp_scores_and_decodes_like_slmkit(tmp_path, slm_tokenizer_dir, case):
    from slmkit.serve.generate import SamplingParams, generate

    # Named after the case: llama.cpp special-cases models *named* phi3, which the export must avoid.
    ck = make_checkpoint(tmp_path / case, slm_tokenizer_dir, initializer_range=0.2, **CASES[case])
    path = export_gguf(ck, tmp_path / "m.gguf", type="f32").path
    llm = _llama(path, n_ctx=128, logits_all=True, type_k=0, type_v=0)  # F32 KV cache: no f16 rounding
    ckpt = load_checkpoint(ck)
    tok = ckpt.tokenizer()
    ids = prompt_ids(seed=3)
    llm.eval(ids)
    with torch.no_grad():
        want = ckpt.model(torch.tensor([ids]))[0]
    assert np.abs(np.asarray(llm.scores[:len(ids)]) - want.numpy()).max() <= 1e-3
    for prompt in ("def add(a, b):", "The quick brown"):
        ours = generate(ckpt.model, tok, [prompt], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                                   stop_token_ids=[]))[0].token_ids
        llm.reset()
        theirs = []
        for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == 16:
                break
        assert theirs == ours, prompt


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("overrides", [CASES["llama3-untied"], dict(hidden_size=48, intermediate_size=96),
                                       dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1)],
                         ids=["llama3", "f16-fallbacks", "q6_k-output"])
def test_llama_cpp_runs_quantized_files(tmp_path, slm_tokenizer_dir, file_type, overrides):
    """llama.cpp loads the mixed-type files and agrees with the dequantized weights; not exactly, because its
    quantized matmuls also round the activations (to q8_0/q8_1)."""
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, initializer_range=0.2, **overrides)
    path = export_gguf(ck, tmp_path / "m.gguf", type=file_type).path
    llm = _llama(path, n_ctx=128, logits_all=True, type_k=0, type_v=0)
    ids = prompt_ids(seed=3)
    llm.eval(ids)
    meta, tensors = read_gguf(path)
    if overrides.get("hidden_size") == 256 and file_type == "q4_0":  # rows of 256: the tied output at Q6_K
        assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    reference = reference_logits(meta, tensors, ids).numpy()
    assert np.mean(np.asarray(llm.scores[:len(ids)]).argmax(-1) == reference.argmax(-1)) >= 0.8
