"""Distillation over consecutive segments, for students and teachers with Transformer-XL memory (Dai et al.,
2019; see slmkit/model/xl_memory.py).

A model with `memory_length > 0` attends to the keys and values it kept from the segment before, so it must
read each text in order, as `slm train` feeds it (train/segments.py): the global batch is `global_batch`
contiguous lanes of the train split and step s gives every lane its next segment. `SegmentKDStep` is the KD
step function with a memory per model: the student attends to its memory of the lane's earlier segments, and a
teacher with memory keeps its own across the very same segments, so its distribution is the one it would give
reading the text in order. Both memories reset when the lanes wrap; a resumed run restarts them empty (the
data order resumes exactly, as for `slm train`).

With a teacher logit cache the segments are the cache's own chunks, taken lane by lane in order
(`CachedSegmentKDBatches`), so every cached prediction lines up with the segment the student reads. The cache
holds predictions for isolated windows, so it serves a teacher without memory only (a teacher with memory is
refused with a message saying to distill online).

On-policy sampling replaces the tail of each segment with student samples, so the next segment would no longer
continue the text the memory holds; it is refused together with memory.
"""

from __future__ import annotations

import torch

from ..train.segments import LaneMemories, SegmentBatches
from .kd_losses import KDError
from .steps import KDConfig, KDStep
from .teacher_cache import TeacherCache, check_cache_stream


def reads_segments(student_config, teacher_config) -> bool:
    """Whether distillation must feed consecutive segments: either model keeps Transformer-XL memory."""
    return student_config.memory_length > 0 or teacher_config.memory_length > 0


class SegmentKDStep(KDStep):
    """`KDStep` whose student and (online) teacher read with their own memory, kept per slice of lanes."""

    def __init__(self, cfg: KDConfig, teacher: torch.nn.Module | None, *, student_config, seed: int = 0):
        if cfg.on_policy > 0:
            raise KDError("on-policy distillation cannot run with Transformer-XL memory (memory_length > 0): the "
                          "student's samples would replace the text the next segment continues from; use "
                          "--on-policy 0, or a student and teacher without memory_length")
        super().__init__(cfg, teacher, student_config=student_config, seed=seed)
        self.student_memories = LaneMemories() if student_config.memory_length > 0 else None
        self.teacher_memories = (LaneMemories() if teacher is not None and teacher.config.memory_length > 0
                                 else None)

    def student_forward(self, model: torch.nn.Module, ids: torch.Tensor, batch: dict, want_hidden: bool):
        if self.student_memories is None:
            return model(ids, return_hidden_states=want_hidden)
        return model(ids, return_hidden_states=want_hidden, memory=self.student_memories(model, batch))

    def teacher_forward(self, ids: torch.Tensor, batch: dict, want_hidden: bool):
        if self.teacher_memories is None:
            return self.teacher(ids, return_hidden_states=want_hidden)
        return self.teacher(ids, return_hidden_states=want_hidden, memory=self.teacher_memories(self.teacher, batch))


class CachedSegmentKDBatches:
    """Consecutive cache chunks, lane by lane (`SegmentBatches` on the cache's chunk grid), with the teacher's
    top-k log-probabilities for each; same protocol as `LMBatches` (pure in (seed, step), `rows` = DDP slice)."""

    def __init__(self, cache: TeacherCache, stream, global_batch: int, seed: int):
        check_cache_stream(cache, stream)
        self.cache = cache
        self.segments = SegmentBatches(stream, cache.seq_len, global_batch, seed, num_chunks=cache.num_chunks)

    def chunks(self, step: int):
        """The cache chunk each lane reads at `step`: (global_batch,)."""
        return self.segments.starts(step) // self.cache.seq_len

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        b = self.segments.batch(step, rows)  # input_ids / labels (b, L) of exactly those chunks
        ids, logprobs, tail = self.cache.chunk_arrays(self.chunks(step)[rows])
        return {**b, "teacher_topk_ids": torch.from_numpy(ids),  # (b, L, k)
                "teacher_topk_logprobs": torch.from_numpy(logprobs),  # (b, L, k)
                "teacher_tail_logprob": torch.from_numpy(tail)}  # (b, L)
