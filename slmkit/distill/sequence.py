"""Sequence-level knowledge distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation").

The teacher continues prompts taken from the dataset; the prompt plus the teacher's continuation becomes the
student's training text, tokenized with the student's (the dataset's) tokenizer. No logits are compared, so
the teacher may use any tokenizer — an imported Hugging Face model included.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..train import Trainer, TrainConfig, TrainResult
from ..train.loop import resolve_device
from ..train.pretrain import lm_evaluator, model_for_dataset
from ..train.segments import lm_batches_and_step
from .kd_losses import KDError
from .teacher_cache import teacher_identity


def teacher_corpus(teacher_path: str | Path, data: str | Path, out_jsonl: str | Path, *, prompts: int = 256,
                   prompt_tokens: int = 48, new_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                   batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Write `prompts` teacher continuations of dataset prompts to JSONL (`{"text": ...}`), resumably: lines
    already in `out_jsonl` are kept and generation continues after them."""
    from rich.progress import Progress

    from ..data import open_dataset
    from ..serve.generate import SamplingParams, generate

    if prompts < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise KDError("prompts, prompt_tokens and new_tokens must be >= 1")
    ds = open_dataset(data)
    teacher = load_checkpoint(teacher_path)
    tok_data, tok_teacher = ds.tokenizer(), teacher.tokenizer()
    train = ds.split("train")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, max(1, len(train) - prompt_tokens), size=prompts)
    special = {ds.bos_token_id, ds.eos_token_id, ds.pad_token_id}
    texts = []
    for s in starts:
        ids = [int(t) for t in train.window(int(s), prompt_tokens) if int(t) not in special]
        texts.append(tok_data.decode(ids))
    out_jsonl = Path(out_jsonl)
    done = sum(1 for ln in out_jsonl.read_text().splitlines() if ln.strip()) if out_jsonl.exists() else 0
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    t0 = time.perf_counter()
    with open(out_jsonl, "a") as f, Progress(disable=not progress) as bar:
        task = bar.add_task("teacher writes", total=prompts, completed=done)
        for i in range(done, prompts, batch_size):
            chunk = texts[i:i + batch_size]
            results = generate(teacher.model, tok_teacher, chunk, dataclasses.replace(params, seed=seed + i))
            for prompt, r in zip(chunk, results):
                f.write(json.dumps({"text": prompt + r.text}) + "\n")
            f.flush()
            bar.advance(task, len(chunk))
    return {"prompts": prompts, "new_tokens": new_tokens, "temperature": temperature,
            "seconds": time.perf_counter() - t0, "path": str(out_jsonl)}


def distill_sequence(teacher_path: str | Path, student_spec: str | Path, data: str | Path, out: str | Path,
                     train_cfg: TrainConfig, *, prompts: int = 256, prompt_tokens: int = 48, new_tokens: int = 128,
                     temperature: float = 0.8, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Teacher text -> a dataset in the student's tokenizer -> next-token training; validated on the original
    dataset's held-out split, so bits per byte stay comparable with any other run on it."""
    from ..data import build_dataset, open_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(data)
    corpus = out / "teacher_corpus.jsonl"
    gen = teacher_corpus(teacher_path, data, corpus, prompts=prompts, prompt_tokens=prompt_tokens,
                         new_tokens=new_tokens, temperature=temperature, seed=train_cfg.seed, progress=not quiet)
    seq_data = out / "teacher_data"
    if not (seq_data / "meta.json").exists():
        build_dataset([str(corpus)], seq_data, tokenizer=ds.path, val_fraction=0.0, progress=not quiet)
    seq_ds = open_dataset(seq_data)
    torch.manual_seed(train_cfg.seed)
    student, prior = model_for_dataset(student_spec, ds, seq_len=train_cfg.seq_len)
    device = resolve_device(train_cfg.device)
    stage = {"stage": "distill", "mode": "sequence", "teacher": teacher_identity(teacher_path), "generation": gen,
             "train": train_cfg.to_dict(), "data": {"path": str(Path(data).resolve())}}
    # A student with XL memory reads the teacher's text in consecutive segments, as `slm train` does.
    batches, step_fn = lm_batches_and_step(student, seq_ds.split("train"), train_cfg.seq_len, train_cfg.batch_size,
                                           train_cfg.seed)
    trainer = Trainer(student, step_fn, batches, train_cfg, out, evaluate=lm_evaluator(ds, train_cfg, device),
                      tokenizer_from=ds.path, provenance={**prior, "stages": [*prior["stages"], stage]},
                      quiet=quiet)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        last_eval = result.evals[-1] if result.evals else {}
        stage.update(tokens_seen=result.tokens, steps=result.steps,
                     metrics={k: v for k, v in last_eval.items() if k.startswith("val_")
                              and k in ("val_loss", "val_bits_per_byte", "val_perplexity", "val_accuracy")},
                     summary={"teacher": Path(teacher_path).name, "mode": "sequence", "prompts": prompts,
                              "tokens": result.tokens})
        save_checkpoint(trainer.model, out, tokenizer_from=ds.path,
                        provenance={**prior, "stages": [*prior["stages"], stage]})
    return result
