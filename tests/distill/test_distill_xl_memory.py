"""Distillation with Transformer-XL memory: consecutive segments in order, the student attending to its memory,
a teacher keeping its own, the teacher logit cache on the segment grid, `slm distill` end to end, and resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from slmkit.checkpoint import load_checkpoint
from slmkit.distill import KDConfig, KDError
from slmkit.distill.kd_losses import kd_loss, softened_logprobs
from slmkit.distill.run import distill
from slmkit.distill.segment_kd import CachedSegmentKDBatches, SegmentKDStep
from slmkit.distill.steps import KDStep
from slmkit.distill.teacher_cache import TeacherCacheError, build_teacher_cache, open_teacher_cache
from slmkit.model import CausalLM, ModelConfig
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain
from slmkit.train.segments import SegmentBatches
from tests.model.test_xl_memory import ArrayStream

SEQ = 16  # segment length in every test here
MODEL_YAML = ("hidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
              "num_key_value_heads: 2\n")


def cfg(**kw):
    base = dict(steps=6, batch_size=4, micro_batch_size=2, seq_len=SEQ, lr=3e-3, warmup_steps=1, eval_every=0,
                save_every=0, log_every=1, precision="fp32", eval_tokens=256, seed=5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    plain, mem = root / "plain.yaml", root / "memory.yaml"
    plain.write_text(MODEL_YAML)
    mem.write_text(MODEL_YAML + "memory_length: 24\n")
    return plain, mem


@pytest.fixture(scope="module")
def teachers(tiny_dataset, specs, tmp_path_factory):
    """A teacher without memory and one with memory_length=24, both briefly pretrained on the dataset."""
    root = tmp_path_factory.mktemp("teachers")
    pretrain(tiny_dataset, specs[0], root / "plain", cfg(steps=8), quiet=True)
    pretrain(tiny_dataset, specs[1], root / "memory", cfg(steps=8), quiet=True)
    return root / "plain", root / "memory"


def tiny(memory_length: int, seed: int) -> CausalLM:
    torch.manual_seed(seed)  # initializer_range 0.1: peaked enough that memory visibly moves the distributions
    return CausalLM(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, memory_length=memory_length,
                                initializer_range=0.1)).eval()


def two_segments():
    sb = SegmentBatches(ArrayStream(np.random.default_rng(0).integers(0, 97, 4000)), SEQ, 4, seed=1)
    return sb.batch(0, slice(0, 4)), sb.batch(1, slice(0, 4))


# -- the step function ------------------------------------------------------------------------------


def test_student_attends_to_its_memory_of_the_previous_segment():
    student, teacher = tiny(64, 0), tiny(0, 1)  # memory 64 >= both segments: all of segment 0 stays visible
    b0, b1 = two_segments()
    assert torch.equal(b1["input_ids"][:, 0], b0["labels"][:, -1])  # every lane continues where it stopped
    step = SegmentKDStep(KDConfig(alpha=0.5), teacher, student_config=student.config)
    with torch.no_grad():
        step(student, b0)
        loss, metrics = step(student, b1)
        plain_loss, plain = KDStep(KDConfig(alpha=0.5), teacher, student_config=student.config)(student, b1)
        # Reference: one pass of the student over both segments; its second half is what memory must give.
        both = torch.cat([b0["input_ids"], b1["input_ids"]], dim=1)  # (4, 2 * SEQ)
        want_ce = F.cross_entropy(student(both)[:, SEQ:].flatten(0, 1), b1["labels"].flatten())
    assert metrics["ce"].item() == pytest.approx(want_ce.item(), abs=1e-5)
    assert abs(metrics["ce"].item() - plain["ce"].item()) > 1e-3  # memory changed the prediction
    assert abs(loss.item() - plain_loss.item()) > 1e-4
    memory = step.student_memories.memories[(0, 1, 2, 3)]
    assert memory.offset == 2 * SEQ and memory.length == 2 * SEQ
    assert step.teacher_memories is None  # this teacher has no memory_length


def test_teacher_with_memory_keeps_its_own_across_the_same_segments():
    student, teacher = tiny(0, 0), tiny(64, 1)  # only the teacher keeps memory
    b0, b1 = two_segments()
    step = SegmentKDStep(KDConfig(loss="forward_kl", temperature=2.0), teacher, student_config=student.config)
    with torch.no_grad():
        step(student, b0)
        _, metrics = step(student, b1)
        both = torch.cat([b0["input_ids"], b1["input_ids"]], dim=1)
        t_logp = softened_logprobs(teacher(both)[:, SEQ:], 2.0)  # the teacher read in order, in one pass
        want = kd_loss("forward_kl", softened_logprobs(student(b1["input_ids"]), 2.0), t_logp, temperature=2.0)
        _, without = KDStep(KDConfig(loss="forward_kl", temperature=2.0), teacher,
                            student_config=student.config)(student, b1)
    assert metrics["kd"].item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(metrics["kd"].item() - without["kd"].item()) > 1e-2 * without["kd"].item()
    assert step.student_memories is None and step.teacher_memories.memories[(0, 1, 2, 3)].offset == 2 * SEQ


def test_memory_resets_when_the_lanes_wrap_and_on_policy_is_refused():
    student, teacher = tiny(8, 0), tiny(0, 1)
    sb = SegmentBatches(ArrayStream(np.arange(400) % 97), SEQ, 4, seed=0)
    step = SegmentKDStep(KDConfig(), teacher, student_config=student.config)
    with torch.no_grad():
        for s in range(sb.segments_per_lane + 1):
            for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches: one memory per slice of lanes
                step(student, sb.batch(s, rows))
    assert sorted(step.student_memories.memories) == [(0, 1), (2, 3)]
    assert all(m.offset == SEQ for m in step.student_memories.memories.values())  # reset, then one segment
    with pytest.raises(KDError, match="on-policy distillation cannot run with Transformer-XL memory"):
        SegmentKDStep(KDConfig(on_policy=0.5), teacher, student_config=student.config)


# -- through `slm distill` --------------------------------------------------------------------------


def record_student_segments(monkeypatch) -> list[dict]:
    """Spy on the student's forward passes (the real method runs): lanes, first input and last label of each
    row, and the student's memory after the pass."""
    seen = []
    real = SegmentKDStep.student_forward

    def spy(self, model, ids, batch, want_hidden):
        out = real(self, model, ids, batch, want_hidden)
        lanes = tuple(batch["lanes"].tolist())
        memory = self.student_memories.memories[lanes]
        seen.append({"lanes": lanes, "first": ids[:, 0].tolist(), "last_label": batch["labels"][:, -1].tolist(),
                     "offset": memory.offset, "length": memory.length})
        return out

    monkeypatch.setattr(SegmentKDStep, "student_forward", spy)
    return seen


def test_slm_distill_feeds_the_memory_student_consecutive_segments(teachers, specs, tiny_dataset, tmp_path,
                                                                   monkeypatch):
    from slmkit.cli import app

    seen = record_student_segments(monkeypatch)
    out = tmp_path / "student"
    args = ["distill", "--teacher", teachers[0], "--student", specs[1], "--data", tiny_dataset, "--out", out,
            "--steps", 4, "--batch-size", 4, "--micro-batch-size", 2, "--seq-len", SEQ, "--precision", "fp32",
            "--eval-every", 0, "--save-every", 0, "--seed", 5]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert [s["lanes"] for s in seen] == [(0, 1), (2, 3)] * 4  # micro-batches read their own lanes each step
    for lanes in ((0, 1), (2, 3)):
        rows = [s for s in seen if s["lanes"] == lanes]
        for prev, nxt in zip(rows, rows[1:]):
            assert nxt["first"] == prev["last_label"]  # the next segment continues the same text
        assert [s["offset"] for s in rows] == [SEQ, 2 * SEQ, 3 * SEQ, 4 * SEQ]
        assert [s["length"] for s in rows] == [SEQ, 24, 24, 24]  # memory_length=24 kept
    ck = load_checkpoint(out)
    assert ck.config.memory_length == 24
    assert ck.provenance["stages"][-1]["stage"] == "distill"


def test_resume_continues_the_segment_order_with_an_empty_memory(teachers, specs, tiny_dataset, tmp_path,
                                                                 monkeypatch):
    seen = record_student_segments(monkeypatch)
    distill(teachers[0], specs[1], tiny_dataset, tmp_path / "whole", cfg(), KDConfig(), quiet=True)
    whole = list(seen)
    seen.clear()

    def crash_after_4(step, _):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(teachers[0], specs[1], tiny_dataset, tmp_path / "cut", cfg(save_every=3), KDConfig(), quiet=True,
                on_step_end=crash_after_4)
    seen.clear()
    res = distill(teachers[0], specs[1], tiny_dataset, tmp_path / "cut", cfg(save_every=3), KDConfig(), quiet=True,
                  resume=True)
    assert res.steps == 6 and len(seen) == 3 * 2  # steps 4..6, two micro-batches each
    assert [(s["lanes"], s["first"]) for s in seen] == [(s["lanes"], s["first"]) for s in whole[6:]]  # same data
    assert [s["offset"] for s in seen[:2]] == [SEQ, SEQ]  # memory restarted empty
    assert [s["offset"] for s in whole[6:8]] == [4 * SEQ, 4 * SEQ]


def test_teacher_with_memory_distills_online(teachers, specs, tiny_dataset, tmp_path):
    out = tmp_path / "s"
    res = distill(teachers[1], specs[0], tiny_dataset, out, cfg(steps=3), KDConfig(hidden_weight=0.5), quiet=True)
    assert res.steps == 3 and all(np.isfinite(r["loss"]) for r in res.history)
    assert load_checkpoint(out).config.memory_length == 0


# -- the teacher logit cache ------------------------------------------------------------------------


def test_cached_distillation_reads_cache_chunks_in_lane_order(teachers, specs, tiny_dataset, tmp_path):
    from slmkit.data import open_dataset

    cache = build_teacher_cache(teachers[0], tiny_dataset, tmp_path / "cache", k=8, seq_len=SEQ, max_chunks=40,
                                progress=False)
    tc, train = open_teacher_cache(cache), open_dataset(tiny_dataset).split("train")
    batches = CachedSegmentKDBatches(tc, train, 4, seed=5)
    n = batches.segments.segments_per_lane
    assert n == 10
    for step in range(2 * n):
        chunks, nxt = batches.chunks(step), batches.chunks(step + 1)
        assert (chunks // n == np.arange(4)).all()  # lane i only ever reads its own 10 chunks
        wrapped = batches.segments.position(step + 1) == 0
        assert (nxt == (chunks - chunks % n) if wrapped else nxt == chunks + 1).all()
        b = batches.batch(step, slice(2, 4))
        ids, logprobs, tail = tc.chunk_arrays(chunks[2:])
        assert torch.equal(b["teacher_topk_ids"], torch.from_numpy(ids))  # the teacher's predictions ...
        assert torch.equal(b["teacher_tail_logprob"], torch.from_numpy(tail))
        window = np.stack([train.window(int(c) * SEQ, SEQ + 1) for c in chunks[2:]]).astype(np.int64)
        assert torch.equal(b["input_ids"], torch.from_numpy(window[:, :-1]))  # ... for exactly these tokens
        assert bool(b["lane_reset"].all()) == (batches.segments.position(step) == 0)

    out = tmp_path / "s"
    res = distill(teachers[0], specs[1], tiny_dataset, out, cfg(steps=3), KDConfig(alpha=0.8), cache=cache,
                  quiet=True)
    assert res.steps == 3 and load_checkpoint(out).config.memory_length == 24
    with pytest.raises(ValueError, match="holds 40 windows, fewer than the 64 lanes"):
        distill(teachers[0], specs[1], tiny_dataset, tmp_path / "x", cfg(batch_size=64, micro_batch_size=8),
                KDConfig(alpha=0.8), cache=cache, quiet=True)


def test_a_cache_of_a_teacher_with_memory_is_refused(teachers, specs, tiny_dataset, tmp_path):
    with pytest.raises(TeacherCacheError, match="memory_length=24 .*distill with the teacher online"):
        build_teacher_cache(teachers[1], tiny_dataset, tmp_path / "cache", k=8, seq_len=SEQ, progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any work
    plain_cache = build_teacher_cache(teachers[0], tiny_dataset, tmp_path / "plain", k=8, seq_len=SEQ,
                                      max_chunks=8, progress=False)
    with pytest.raises(TeacherCacheError, match="memory_length=24"):  # a cache handed in with a memory teacher
        distill(teachers[1], specs[1], tiny_dataset, tmp_path / "x", cfg(), KDConfig(), cache=plain_cache,
                quiet=True)
