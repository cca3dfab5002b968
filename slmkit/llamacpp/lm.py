"""Language-modelling metrics of a GGUF file computed by llama.cpp itself, defined exactly as slmkit's.

`evaluate_lm(llm, stream, byte_lengths, seq_len=...)` scores the same consecutive non-overlapping windows as
`slmkit.evaluate.lm.evaluate_lm` (each evaluated from an empty cache, every token after a window's first predicted)
and returns the same figures: bits_per_byte = total next-token cross-entropy in bits / UTF-8 bytes of the predicted
tokens, so a file's number in llama.cpp and its checkpoint's number in slmkit compare directly.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .runner import LlamaCpp


def evaluate_lm(llm: LlamaCpp, stream, byte_lengths: np.ndarray, *, seq_len: int, max_tokens: int | None = None,
                progress=None) -> dict[str, float]:
    """Score `stream` (anything with len() and window()) in llama.cpp. Returns loss (nats/token), bits_per_byte,
    perplexity, accuracy (top-1), tokens and bytes scored, and the seconds it took."""
    from ..evaluate.lm import _windows  # the windowing slmkit's own figure uses

    starts, seq_len, limit = _windows(len(stream), seq_len, max_tokens)
    lengths = np.asarray(byte_lengths, dtype=np.int64)
    total_nats, total_bytes, total_tokens, correct = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for s in starts:
        ids = np.asarray(stream.window(s, min(seq_len + 1, limit - s)), dtype=np.int64)
        scores = llm.score(ids.tolist())
        labels = ids[1:]
        total_nats -= float(scores.log_probs.sum())
        total_tokens += len(labels)
        correct += int((scores.argmax == labels).sum())
        total_bytes += int(lengths[labels].sum())
        if progress is not None:
            progress(1)
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss": loss,
        "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / max(total_tokens, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "seconds": time.perf_counter() - t0,
    }
