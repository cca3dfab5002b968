"""Training with Transformer-XL segment memory: consecutive segments of long text, in order.

The memory (slmkit/model/xl_memory.py) only helps if the segment a row sees at step s + 1 is the
continuation of the one it saw at step s. `SegmentBatches` splits the training token stream into
`global_batch` contiguous lanes, as truncated back-propagation through time does for RNNs: lane i is
tokens [i * L, (i + 1) * L), and step s gives every lane its (s mod n)-th segment of `seq_len` tokens
(n = segments per lane). All lanes wrap around together, so the memory is reset for the whole batch at
once (`lane_reset`). The batch is a pure function of (seed, step), like `LMBatches`: the seed shifts where
the lanes' segment grid starts, so different seeds cut different segment boundaries.

`XLLMStep` is the step function: it holds one XLMemory per micro-batch slice of lanes (keyed by the lanes
it reads, so gradient accumulation and several processes each keep their own), calls the model with it,
and resets it when the lanes wrap. Memory is not saved with the training state: a resumed run starts its
first step with an empty memory (the data order itself resumes exactly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .steps import auxiliary_loss


class SegmentBatches:
    """Consecutive `seq_len`-token segments of `global_batch` contiguous lanes of `stream` (anything with
    `len()` and `window(start, length)`)."""

    def __init__(self, stream, seq_len: int, global_batch: int, seed: int):
        lane = len(stream) // global_batch
        if lane < seq_len + 1:
            raise ValueError(f"the training split has {len(stream)} tokens: too few for {global_batch} lanes of at "
                             f"least seq_len+1={seq_len + 1} tokens; use a smaller --batch-size or --seq-len")
        self.stream, self.seq_len, self.global_batch, self.seed = stream, seq_len, global_batch, seed
        self.lane_length = lane
        self.segments_per_lane = (lane - 1) // seq_len  # each segment needs one extra token for its labels
        slack = lane - 1 - self.segments_per_lane * seq_len
        self.shift = int(np.random.default_rng([seed, 0x5E6]).integers(0, slack + 1))

    def starts(self, step: int) -> np.ndarray:
        """Stream offset of each lane's segment at `step`: (global_batch,)."""
        s = step % self.segments_per_lane
        return np.arange(self.global_batch) * self.lane_length + self.shift + s * self.seq_len

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        lanes = np.arange(self.global_batch)[rows]
        starts = self.starts(step)[rows]
        w = np.stack([self.stream.window(int(s), self.seq_len + 1) for s in starts]).astype(np.int64)
        t = torch.from_numpy(w)  # (B, seq_len + 1)
        first = step % self.segments_per_lane == 0
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                "lane_reset": torch.full((len(lanes),), first, dtype=torch.bool),
                "lanes": torch.from_numpy(lanes)}


class XLLMStep:
    """Next-token cross-entropy over a segment, attending to the memory of the lane's earlier segments.
    A step-function object (it carries state); use one per training run."""

    def __init__(self):
        self.memories: dict[tuple[int, ...], object] = {}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]  # (B, T)
        key = tuple(int(i) for i in batch["lanes"].tolist())
        memory = self.memories.get(key)
        if memory is None:
            memory = self.memories[key] = _unwrap(model).new_memory(ids.shape[0])
        elif bool(batch["lane_reset"].any()):  # lanes wrapped around: the memory belongs to other text
            memory.reset()
        logits = model(ids, memory=memory)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        metrics = {"loss": loss.detach()}
        aux = auxiliary_loss(model)
        if aux is not None:
            metrics["aux_loss"] = aux.detach()
            loss = loss + aux
        return loss, metrics


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "_orig_mod", inner)  # torch.compile
