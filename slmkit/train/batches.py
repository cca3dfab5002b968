"""Deterministic batches: the batch for optimizer step s is a pure function of (seed, s), so a resumed
run sees exactly the data an uninterrupted run would, and any number of processes split one global batch
the same way."""

from __future__ import annotations

import numpy as np
import torch


class LMBatches:
    """Random windows of `seq_len + 1` tokens from a token stream (anything with `len()` and
    `window(start, length)`), yielding next-token inputs and targets."""

    def __init__(self, stream, seq_len: int, global_batch: int, seed: int):
        if len(stream) < seq_len + 2:
            raise ValueError(f"the training split has {len(stream)} tokens, fewer than seq_len+2={seq_len + 2}; "
                             "use a smaller --seq-len or more data")
        self.stream, self.seq_len, self.global_batch, self.seed = stream, seq_len, global_batch, seed

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.stream) - self.seq_len - 1, size=self.global_batch)

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        starts = self.starts(step)[rows]
        w = np.stack([self.stream.window(int(s), self.seq_len + 1) for s in starts]).astype(np.int64)
        t = torch.from_numpy(w)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
