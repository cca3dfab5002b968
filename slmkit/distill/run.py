"""`slm distill`: teacher -> student with the shared training loop and the KD step function.

Logit KD needs the teacher, the student and the dataset to share one tokenizer; everything is checked before
any training starts. With a teacher logit cache the teacher is never loaded during training. A student or
teacher with Transformer-XL memory reads consecutive segments in order (segment_kd.py). Sequence-level KD
(`mode="sequence"`, Kim & Rush, 2016) works across tokenizers: the teacher writes continuations of dataset
prompts, and the student is trained on that text.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.shards import check_same_tokenizer
from ..model import ModelConfig
from ..train import LMBatches, Trainer, TrainConfig, TrainResult
from ..train.loop import resolve_device
from ..train.pretrain import lm_evaluator
from ..train.segments import SegmentBatches
from .kd_losses import KDError
from .segment_kd import CachedSegmentKDBatches, SegmentKDStep, reads_segments
from .steps import KDConfig, KDStep, OnPolicyBatches
from .student import build_student
from .teacher_cache import teacher_identity


def check_shared_vocabulary(teacher_path: Path, identity: dict, ds) -> None:
    """Logit KD compares distributions token by token: the teacher must speak the dataset's tokenizer.
    Checked from the teacher's files, before any weights are loaded."""
    if identity.get("tokenizer_sha256"):
        check_same_tokenizer(ds, teacher_path / "tokenizer.json",
                             alternative="distill across tokenizers with `slm distill --mode sequence`")
    vocab = ModelConfig.load(teacher_path / "config.json").vocab_size
    if vocab < ds.vocab_size:
        raise KDError(f"teacher vocabulary {vocab} < dataset tokenizer {ds.vocab_size}; "
                      "logit KD needs a shared tokenizer (or use --mode sequence)")


def distill(teacher_path: str | Path, student_spec: str | Path, data: str | Path, out: str | Path,
            train_cfg: TrainConfig, kd_cfg: KDConfig, *, cache: str | Path | None = None, resume: bool = False,
            on_step_end=None, quiet: bool = False, lora=None) -> TrainResult:
    """`lora` (an align.lora.LoRAConfig) trains adapters on a frozen student checkpoint; OUT then gets the
    merged student and OUT/adapter/ the adapter."""
    from ..compress.vocab_remap import dataset_for_checkpoint, is_trimmed_from
    from ..data import open_dataset

    ds = open_dataset(data)
    teacher_path = Path(teacher_path)
    if teacher_path.is_dir() and is_trimmed_from(ds, teacher_path) is not None:
        # A teacher whose vocabulary `prune.vocab` trimmed from the dataset's tokenizer: the dataset is carried
        # into the trimmed ids (cached beside it), so student and teacher train in the smaller vocabulary. Any
        # other tokenizer mismatch is refused below, with the way across tokenizers.
        ds = dataset_for_checkpoint(ds, teacher_path, splits=("train", "val"))
    device = resolve_device(train_cfg.device)
    identity = teacher_identity(teacher_path)
    check_shared_vocabulary(teacher_path, identity, ds)
    # The teacher's weights are needed online, or to build the student from its layers; a cached run with a
    # fresh student never loads them.
    needs_weights = cache is None or str(student_spec).startswith("teacher:")
    teacher = load_checkpoint(teacher_path) if needs_weights else None
    t_config = ModelConfig.load(teacher_path / "config.json")
    torch.manual_seed(train_cfg.seed)
    if lora is not None:
        from ..align.lora import lora_base_checkpoint

        lora_base_checkpoint(student_spec, "--student")
    student, init, prior = build_student(student_spec, teacher, ds, seq_len=train_cfg.seq_len)
    if lora is not None:
        from ..align.lora import apply_lora

        apply_lora(student, lora)  # before the Trainer: its optimizer sees only the adapters
    if student.config.vocab_size != t_config.vocab_size:
        raise KDError(f"student vocabulary {student.config.vocab_size} != teacher vocabulary "
                      f"{t_config.vocab_size}: logit KD needs a shared vocabulary; "
                      "use `slm distill --mode sequence` across tokenizers")
    if train_cfg.seq_len > t_config.max_position_embeddings:
        raise KDError(f"seq_len={train_cfg.seq_len} exceeds the teacher's context ({t_config.max_position_embeddings})")

    train = ds.split("train")
    # Transformer-XL memory in either model: consecutive segments in order, each model keeping its memory.
    ordered = reads_segments(student.config, t_config)
    if cache is not None:
        from .teacher_cache import CachedKDBatches, open_teacher_cache, refuse_teacher_with_memory

        refuse_teacher_with_memory(t_config, teacher_path)
        tc = open_teacher_cache(cache, teacher=teacher_path, dataset=ds, temperature=kd_cfg.temperature)
        if tc.seq_len != train_cfg.seq_len:
            raise KDError(f"{cache}: the cache was built with seq_len={tc.seq_len}; train with --seq-len "
                          f"{tc.seq_len} or rebuild the cache")
        batches = (CachedSegmentKDBatches if ordered else CachedKDBatches)(tc, train, train_cfg.batch_size,
                                                                          train_cfg.seed)
        online_teacher = None
        teacher = None  # training from the cache never holds the teacher
    else:
        online_teacher = teacher.model.to(device)
        batches = (SegmentBatches if ordered else LMBatches)(train, train_cfg.seq_len, train_cfg.batch_size,
                                                             train_cfg.seed)
    step = (SegmentKDStep if ordered else KDStep)(kd_cfg, online_teacher, student_config=student.config,
                                                  seed=train_cfg.seed)
    if kd_cfg.on_policy > 0:
        batches = OnPolicyBatches(batches, step)

    stage = {"stage": "distill", "teacher": identity, "student": init, "kd": kd_cfg.to_dict(),
             "train": train_cfg.to_dict(), "cache": str(Path(cache).resolve()) if cache else None,
             "data": {"path": str(Path(data).resolve()), "tokenizer_sha256": ds.meta.get("tokenizer_sha256")}}
    trainer = Trainer(student, step, batches, train_cfg, out, evaluate=lm_evaluator(ds, train_cfg, device),
                      tokenizer_from=ds.path, provenance={**prior, "stages": [*prior["stages"], stage]},
                      on_step_end=on_step_end,
                      quiet=quiet, extra_modules=step.hidden)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        last_eval = result.evals[-1] if result.evals else {}
        stage.update(tokens_seen=result.tokens, steps=result.steps, seconds=round(result.seconds, 1),
                     finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     metrics={k: v for k, v in last_eval.items()
                              if k in ("val_loss", "val_bits_per_byte", "val_perplexity", "val_accuracy")},
                     summary={"teacher": Path(teacher_path).name,
                              "teacher_sha256": identity["weights_sha256"][:12], "loss": kd_cfg.loss,
                              "temperature": kd_cfg.temperature, "alpha": kd_cfg.alpha,
                              "tokens": result.tokens, "cached": cache is not None,
                              "on_policy": kd_cfg.on_policy})
        if lora is not None:
            from ..align.lora import finish_lora_run

            stage["lora"] = finish_lora_run(trainer.model, out, lora, base=student_spec)
        save_checkpoint(trainer.model, out, tokenizer_from=ds.path,
                        provenance={**prior, "stages": [*prior["stages"], stage]})
    return result
