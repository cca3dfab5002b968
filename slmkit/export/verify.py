"""Check a shipped .gguf against the checkpoint it came from: bits per byte on the same held-out windows, once in
llama.cpp on the file and once in slmkit on the checkpoint (`slm export gguf --verify DATA`, the recipe export
stage's `verify`). An exact export of int8/int4 codes agrees to within llama.cpp's own arithmetic (its 8-bit
activations in Q8_0/Q4_x dot products, a few parts in 10,000 here); a larger gap means the file is not the
model that was measured.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["verify_gguf", "AGREEMENT"]

AGREEMENT = 0.005  # the largest relative bits-per-byte difference reported as agreeing (the 0.5%)


def verify_gguf(gguf_path: str | Path, ckpt: str | Path, data: str | Path, *, tokens: int = 2048,
                seq_len: int = 256, threads: int | None = None) -> dict:
    """{"slmkit_bits_per_byte", "llama_cpp_bits_per_byte", "relative_difference", "agrees", "tokens", ...}.
    When llama.cpp cannot run here, the slmkit figure is still given and `llama_cpp` says why."""
    from ..checkpoint import load_checkpoint
    from ..compress.vocab_remap import dataset_for_checkpoint
    from ..data import open_dataset, token_byte_lengths
    from ..evaluate.lm import evaluate_lm

    ds = dataset_for_checkpoint(open_dataset(data), ckpt, splits=("val",))  # a trimmed vocabulary's own ids
    ck = load_checkpoint(ckpt)
    seq_len = min(seq_len, ck.model.config.max_position_embeddings)
    lengths = token_byte_lengths(ds.tokenizer())
    val = ds.split("val")
    ours = evaluate_lm(ck.model.eval(), val, lengths, seq_len=seq_len, max_tokens=tokens, batch_size=8)
    del ck
    result = {"tokens": int(ours["tokens"]), "seq_len": seq_len, "gguf_bytes": Path(gguf_path).stat().st_size,
              "slmkit_bits_per_byte": ours["bits_per_byte"]}
    from ..llamacpp import LlamaCpp, LlamaCppProcess, unavailable
    from ..llamacpp import evaluate_lm as llama_cpp_evaluate_lm

    if why := unavailable():
        return {**result, "llama_cpp": f"not run: {why}"}
    with LlamaCppProcess() as process:
        llm = LlamaCpp(gguf_path, threads=threads or max(1, min(4, os.cpu_count() or 1)), context=seq_len + 8,
                       process=process)
        theirs = llama_cpp_evaluate_lm(llm, val, lengths, seq_len=seq_len, max_tokens=tokens)
    diff = theirs["bits_per_byte"] / ours["bits_per_byte"] - 1
    return {**result, "llama_cpp_bits_per_byte": theirs["bits_per_byte"], "relative_difference": diff,
            "agrees": abs(diff) <= AGREEMENT, "llama_cpp_seconds": round(theirs.get("seconds", 0.0), 1)}


def describe(v: dict) -> str:
    """One line for the console and the report."""
    if "llama_cpp_bits_per_byte" not in v:
        return (f"slmkit {v['slmkit_bits_per_byte']:.4f} bits/byte on {v['tokens']:,} held-out tokens; llama.cpp "
                f"{v['llama_cpp']}")
    verdict = "agree" if v["agrees"] else f"DISAGREE (more than {AGREEMENT:.1%})"
    return (f"llama.cpp {v['llama_cpp_bits_per_byte']:.4f} bits/byte on the .gguf vs slmkit "
            f"{v['slmkit_bits_per_byte']:.4f} on the checkpoint ({v['relative_difference']:+.2%}, "
            f"{v['tokens']:,} held-out tokens): {verdict}")
