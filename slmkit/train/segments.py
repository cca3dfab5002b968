"""Training with Transformer-XL segment memory: consecutive segments of long text, in order.

The memory (slmkit/model/xl_memory.py) only helps if the segment a row sees at step s + 1 is the
continuation of the one it saw at step s. `SegmentBatches` splits the training token stream into
`global_batch` contiguous lanes, as truncated back-propagation through time does for RNNs: lane i is
tokens [i * L, (i + 1) * L), and step s gives every lane its next segment of `seq_len` tokens (n segments
per lane). All lanes wrap around together, so the memory is reset for the whole batch at once
(`lane_reset`). The batch is a pure function of (seed, step), like `LMBatches`: the seed shifts where the
lanes' segment grid starts, so different seeds cut different segment boundaries.

With `num_chunks` the segments are instead whole chunks of the fixed grid a teacher logit cache was built on
(chunk i = tokens [i * seq_len, (i + 1) * seq_len + 1), see distill/teacher_cache.py): lane i holds chunks
[i * n, (i + 1) * n) and the seed picks the chunk each lane starts at, so cached teacher predictions line up
with the segments exactly.

`LaneMemories` holds one XLMemory per micro-batch slice of lanes (keyed by the lanes it reads, so gradient
accumulation and several processes each keep their own) and resets it when the lanes wrap. `XLLMStep` is the
next-token step function that reads with it. Memory is not saved with the training state: a resumed run
starts its first step with an empty memory (the data order itself resumes exactly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .batches import LMBatches
from .config import TrainConfigError
from .steps import auxiliary_loss, lm_step


class SegmentBatches:
    """Consecutive `seq_len`-token segments of `global_batch` contiguous lanes of `stream` (anything with
    `len()` and `window(start, length)`); with `num_chunks`, lanes of whole cache chunks (see the module
    docstring)."""

    def __init__(self, stream, seq_len: int, global_batch: int, seed: int, *, num_chunks: int | None = None):
        rng = np.random.default_rng([seed, 0x5E6])
        if num_chunks is None:
            lane = len(stream) // global_batch
            if lane < seq_len + 1:
                raise TrainConfigError(f"the training split has {len(stream)} tokens: too few for {global_batch} "
                                       f"lanes of at least seq_len+1={seq_len + 1} tokens; use a smaller "
                                       "--batch-size or --seq-len")
            n = (lane - 1) // seq_len  # each segment needs one extra token for its labels
            slack = lane - 1 - n * seq_len
            self.shift, self.phase = int(rng.integers(0, slack + 1)), 0
        else:
            n = num_chunks // global_batch
            if n < 1:
                raise TrainConfigError(f"the teacher cache holds {num_chunks} windows, fewer than the {global_batch} "
                                       "lanes of consecutive segments (one per sequence of the global batch); use a "
                                       "smaller --batch-size or a cache with more windows")
            lane = n * seq_len
            self.shift, self.phase = 0, int(rng.integers(0, n))
        self.stream, self.seq_len, self.global_batch, self.seed = stream, seq_len, global_batch, seed
        self.num_chunks = num_chunks
        self.lane_length, self.segments_per_lane = lane, n

    def position(self, step: int) -> int:
        """Which of its segments every lane reads at `step` (0 = the lane's first)."""
        return (step + self.phase) % self.segments_per_lane

    def starts(self, step: int) -> np.ndarray:
        """Stream offset of each lane's segment at `step`: (global_batch,)."""
        return (np.arange(self.global_batch) * self.lane_length + self.shift
                + self.position(step) * self.seq_len)

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        lanes = np.arange(self.global_batch)[rows]
        starts = self.starts(step)[rows]
        w = np.stack([self.stream.window(int(s), self.seq_len + 1) for s in starts]).astype(np.int64)
        t = torch.from_numpy(w)  # (B, seq_len + 1)
        first = self.position(step) == 0
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                "lane_reset": torch.full((len(lanes),), first, dtype=torch.bool),
                "lanes": torch.from_numpy(lanes)}


class LaneMemories:
    """The XLMemory of each micro-batch slice of lanes one model reads (one instance per model: a student
    and a teacher each keep their own)."""

    def __init__(self):
        self.memories: dict[tuple[int, ...], object] = {}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """The memory for the lanes of `batch`: created empty on first use, reset when the lanes wrap."""
        key = tuple(int(i) for i in batch["lanes"].tolist())
        memory = self.memories.get(key)
        if memory is None:
            memory = self.memories[key] = unwrap_model(model).new_memory(len(key))
        elif bool(batch["lane_reset"].any()):  # lanes wrapped around: the memory belongs to other text
            memory.reset()
        return memory


class XLLMStep:
    """Next-token cross-entropy over a segment, attending to the memory of the lane's earlier segments.
    A step-function object (it carries state); use one per training run."""

    def __init__(self):
        self.lane_memories = LaneMemories()

    @property
    def memories(self) -> dict:
        return self.lane_memories.memories

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]  # (B, T)
        logits = model(ids, memory=self.lane_memories(model, batch))  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        metrics = {"loss": loss.detach()}
        aux = auxiliary_loss(model)
        if aux is not None:
            metrics["aux_loss"] = aux.detach()
            loss = loss + aux
        return loss, metrics


def lm_batches_and_step(model: torch.nn.Module, stream, seq_len: int, global_batch: int, seed: int):
    """The batch source and step function for next-token training of `model` on `stream`: consecutive segments
    read with memory when its config has `memory_length > 0`, random windows otherwise."""
    if unwrap_model(model).config.memory_length > 0:
        return SegmentBatches(stream, seq_len, global_batch, seed), XLLMStep()
    return LMBatches(stream, seq_len, global_batch, seed), lm_step


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "_orig_mod", inner)  # torch.compile
