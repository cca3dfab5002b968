"""Scoring long held-out text segment by segment, with Transformer-XL memory or without.

The held-out stream is split into `batch_size` contiguous lanes, read in lockstep one segment of
`segment_len` tokens at a time (the layout `SegmentBatches` trains on). Three ways to give a segment
context, scoring exactly the same tokens so their bits per byte compare directly:

- `evaluate_long_documents(..., memory=True)`: each segment attends to the memory the model keeps of the
  earlier segments (`config.memory_length` positions per layer, Dai et al., 2019);
- `memory=False`: each segment alone (the fixed-context baseline at the same segment length);
- `evaluate_sliding_window`: each segment is scored after recomputing a window of the `context_len`
  tokens before it (the same total context as segment + memory). With `stride=segment_len` it costs
  (context + T) / T times the memory's positions; with `stride=1` it is the vanilla evaluation the paper
  compares against (one full window per predicted token).

Metrics follow `slmkit.evaluate.lm.evaluate_lm` (bits per byte from the tokenizer's byte lengths) plus the
wall-clock seconds and scored tokens per second.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F


class _Scores:
    def __init__(self, byte_lengths: np.ndarray):
        self.lengths = torch.as_tensor(np.asarray(byte_lengths), dtype=torch.float64)
        self.nats, self.bytes, self.tokens, self.correct = 0.0, 0.0, 0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().flatten(0, 1), labels.flatten()  # (N, V), (N,)
        self.nats += F.cross_entropy(logits, labels, reduction="sum").double().item()
        self.tokens += labels.numel()
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.bytes += self.lengths[labels.cpu()].sum().item()

    def result(self, seconds: float) -> dict[str, float]:
        loss = self.nats / max(self.tokens, 1)
        return {"loss": loss, "bits_per_byte": self.nats / math.log(2) / max(self.bytes, 1.0),
                "perplexity": math.exp(min(loss, 50.0)), "accuracy": self.correct / max(self.tokens, 1),
                "tokens": self.tokens, "bytes": int(self.bytes), "seconds": seconds,
                "tokens_per_s": self.tokens / max(seconds, 1e-9)}


def _lanes(stream, batch_size: int, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """(lanes, L): token array (n_lanes, L + 1) of contiguous pieces; position j predicts j + 1."""
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens + batch_size)
    if n < 2 * batch_size:
        raise ValueError(f"the held-out split has {n} tokens, too few for {batch_size} lanes; lower batch_size")
    L = (n - 1) // batch_size
    tokens = np.asarray(stream.window(0, batch_size * L + 1), dtype=np.int64)
    lanes = np.stack([tokens[i * L: i * L + L + 1] for i in range(batch_size)])
    return lanes, L


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, autocast_dtype: torch.dtype | None, device: torch.device):
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with torch.no_grad(), amp:
            yield
    finally:
        model.train(was_training)


def evaluate_long_documents(model: torch.nn.Module, stream, byte_lengths: np.ndarray, *, segment_len: int,
                            memory: bool = True, memory_length: int | None = None, batch_size: int = 8,
                            max_tokens: int | None = None,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Score `stream` segment by segment; with `memory`, each segment attends to the last `memory_length`
    (default `config.memory_length`) positions before it through the model's XL memory."""
    device = next(model.parameters()).device
    lanes, L = _lanes(stream, batch_size, max_tokens)
    scores = _Scores(byte_lengths)
    with _eval_mode(model, autocast_dtype, device):
        mem = model.new_memory(batch_size, memory_length) if memory else None
        t0 = time.perf_counter()
        for s in range(0, L, segment_len):
            chunk = torch.from_numpy(lanes[:, s: min(s + segment_len, L) + 1]).to(device)  # (B, T + 1)
            logits = model(chunk[:, :-1], memory=mem)  # (B, T, V)
            scores.add(logits, chunk[:, 1:])
        seconds = time.perf_counter() - t0
    return scores.result(seconds)


def evaluate_sliding_window(model: torch.nn.Module, stream, byte_lengths: np.ndarray, *, segment_len: int,
                            context_len: int, stride: int | None = None, batch_size: int = 8,
                            max_tokens: int | None = None,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The recompute baseline: the tokens of each segment are scored `stride` (default `segment_len`) at a
    time, each block after a fresh forward over the `context_len` tokens before it (no memory)."""
    stride = stride or segment_len
    device = next(model.parameters()).device
    lanes, L = _lanes(stream, batch_size, max_tokens)
    scores = _Scores(byte_lengths)
    with _eval_mode(model, autocast_dtype, device):
        t0 = time.perf_counter()
        for s in range(0, L, stride):
            end = min(s + stride, L)
            lo = max(0, s - context_len)
            window = torch.from_numpy(lanes[:, lo: end + 1]).to(device)  # (B, ctx + stride + 1)
            logits = model(window[:, :-1])  # (B, ctx + stride, V)
            scores.add(logits[:, s - lo:], window[:, s - lo + 1:])
        seconds = time.perf_counter() - t0
    return scores.result(seconds)
