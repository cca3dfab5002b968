"""Language-modelling metrics on held-out tokens.

bits_per_byte = total next-token cross-entropy in bits / UTF-8 bytes of the predicted tokens. Each token's
byte count comes from the tokenizer (byte-level BPE tokens stand for definite byte strings; special tokens
for none), so the number is comparable across tokenizers and vocabulary sizes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F


def _windows(n: int, seq_len: int, max_tokens: int | None) -> tuple[list[int], int, int]:
    """(window starts, window length, tokens used) for scoring `max_tokens` of a stream of `n` tokens."""
    if n < 2:
        raise ValueError("the held-out split has fewer than 2 tokens; build the dataset with a larger --val-fraction")
    limit = n if max_tokens is None else min(n, max_tokens + 1)
    seq_len = min(seq_len, limit - 1)
    return list(range(0, limit - 1, seq_len)), seq_len, limit


def lm_windows(n: int, seq_len: int, max_tokens: int | None) -> int:
    """How many windows `evaluate_lm` scores (the units of its `progress` calls)."""
    return len(_windows(n, seq_len, max_tokens)[0])


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, stream, byte_lengths: np.ndarray, *, seq_len: int,
                max_tokens: int | None = None, batch_size: int = 8, autocast_dtype: torch.dtype | None = None,
                progress=None) -> dict[str, float]:
    """Score consecutive non-overlapping windows of `stream` (anything with len() and window()).
    Returns loss (nats/token), bits_per_byte, perplexity, accuracy (top-1), tokens and bytes scored."""
    starts, seq_len, limit = _windows(len(stream), seq_len, max_tokens)
    device = next(model.parameters()).device
    lengths = torch.as_tensor(np.asarray(byte_lengths), dtype=torch.float64)
    total_nats, total_bytes, total_tokens, correct = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            rows = [stream.window(s, min(seq_len + 1, limit - s)) for s in chunk]
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            labels = np.full((len(rows), width - 1), -100, dtype=np.int64)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = r
                labels[j, :len(r) - 1] = r[1:]
            x, y = torch.from_numpy(ids[:, :-1]).to(device), torch.from_numpy(labels).to(device)
            with amp:
                logits = model(x)
            logits = logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
            valid = y.flatten() != -100
            total_nats += nll[valid].double().sum().item()
            total_tokens += int(valid.sum())
            correct += int((logits.argmax(-1).flatten() == y.flatten())[valid].sum())
            total_bytes += lengths[y.flatten()[valid].cpu()].sum().item()
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss": loss,
        "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1.0),
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / max(total_tokens, 1),
        "tokens": total_tokens,
        "bytes": int(total_bytes),
    }
