"""`slm sft`: supervised fine-tuning on conversations or prompt/completion pairs, on the shared training loop.

The loss is next-token cross-entropy over assistant tokens only (completion tokens for prompt/completion
records), averaged over those tokens in each micro-batch; how the mask is built exactly is explained in
``sft_data.py``. Validation reports the same loss, bits per byte and top-1 accuracy over the assistant tokens
of held-out records. Batches are a pure function of (seed, step): each epoch visits every row once in a
seeded order, so resumed and uninterrupted runs see the same data. With a LoRA config only the adapters
train (``lora.py``), and the checkpoint is written the way ``slm dpo`` writes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from ..checkpoint import inherited_provenance, load_checkpoint, save_checkpoint, sha256_file
from ..data import special_token_ids, token_byte_lengths
from ..distill.teacher_cache import teacher_identity as checkpoint_identity
from ..train import Trainer, TrainConfig, TrainResult
from ..train.loop import autocast_dtype, resolve_device
from ..train.steps import auxiliary_loss
from .chat import ChatTemplateError, chat_template_of
from .sft_data import (ChatFormat, Rows, SFTDataError, SFTStats, build_examples, make_rows, packed_inputs,
                       read_sft_records, row_inputs_and_labels, split_records)

console = Console(stderr=True)
MAX_PROBLEMS_SHOWN = 20


class SFTBatches:
    """Rows in a seeded order, epoch by epoch: global row i of step s is ``perm(epoch)[k]`` with
    ``s * batch + i = epoch * N + k``. Trailing columns that are padding in every row of a micro-batch are cut."""

    def __init__(self, rows: Rows, global_batch: int, seed: int):
        if len(rows) == 0:
            raise SFTDataError("no training rows")
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}
        self.targets_per_row = rows.target[:, 1:].sum(axis=1)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        flat = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._perm(int(i // n))[i % n] for i in flat], dtype=np.int64)

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        idx = self.indices(step)[rows]
        width = int(self.rows.real[idx].any(axis=0).nonzero()[0].max()) + 1  # longest real row
        inputs, labels = row_inputs_and_labels(self.rows.tokens[idx, :width], self.rows.target[idx, :width])
        batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                 "labels": torch.from_numpy(np.ascontiguousarray(labels))}
        return batch | _document_inputs(self.rows, idx, width)

    def target_tokens(self, steps: int) -> int:
        """Assistant tokens that ``steps`` optimizer steps train on."""
        return int(sum(self.targets_per_row[self.indices(s)].sum() for s in range(steps)))


def _document_inputs(rows: Rows, idx, width: int) -> dict[str, torch.Tensor]:
    """`document_ids` and restarting `position_ids` for rows `idx` (inputs: the first width - 1 columns) when
    one of them packs several examples; nothing otherwise (plain causal attention is then exact)."""
    if rows.document is None or int(rows.examples_per_row[idx].max()) < 2:
        return {}
    return {k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in packed_inputs(rows.document[idx, :width - 1]).items()}


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy over the labelled (assistant) tokens. Returns (loss, metrics)."""
    packing = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    logits = model(batch["input_ids"], **packing)  # (B, T, V)
    labels = batch["labels"]  # (B, T), -100 off the assistant tokens
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    metrics = {"loss": loss.detach(), "assistant_tokens": (labels != -100).sum().float()}
    aux = auxiliary_loss(model)
    if aux is not None:
        metrics["aux_loss"] = aux.detach()
        loss = loss + aux
    return loss, metrics


@torch.no_grad()
def evaluate_assistant_tokens(model: torch.nn.Module, rows: Rows, byte_lengths: np.ndarray, *, batch_size: int = 8,
                              autocast: torch.dtype | None = None) -> dict[str, float]:
    """Loss (nats/token), bits per byte, perplexity and top-1 accuracy over the labelled tokens of ``rows``."""
    device = next(model.parameters()).device
    lengths = torch.as_tensor(byte_lengths, dtype=torch.float64)
    nats, nbytes, tokens, correct = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        for i in range(0, len(rows), batch_size):
            inputs, labels = row_inputs_and_labels(rows.tokens[i:i + batch_size], rows.target[i:i + batch_size])
            x, y = torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device).flatten()
            packing = {k: v.to(device) for k, v in
                       _document_inputs(rows, np.arange(i, min(i + batch_size, len(rows))), rows.tokens.shape[1]).items()}
            with amp:
                logits = model(x, **packing)
            logits = logits.float().flatten(0, 1)  # (B*T, V)
            valid = y != -100
            nll = F.cross_entropy(logits[valid], y[valid], reduction="sum")
            nats += nll.item()
            tokens += int(valid.sum())
            correct += int((logits[valid].argmax(-1) == y[valid]).sum())
            nbytes += lengths[y[valid].cpu()].sum().item()
    finally:
        model.train(was_training)
    loss = nats / max(tokens, 1)
    return {"loss": loss, "bits_per_byte": nats / math.log(2) / nbytes if nbytes else float("nan"),
            "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(tokens, 1), "tokens": tokens}


@dataclass
class SFTData:
    train: Rows
    val: Rows | None
    stats: SFTStats
    val_stats: SFTStats


def prepare_sft_data(files: list[str | Path], ck_path: Path, tokenizer, *, seq_len: int, pack: bool,
                     val_fraction: float) -> SFTData:
    """Read, split, tokenize and pack; skipped lines are printed as ``file:line: reason``."""
    records, problems = read_sft_records(files)
    config = _tokenizer_config(ck_path)
    template, variables = None, {}
    if any(r.messages is not None for r in records):
        template, variables = chat_template_of(config)
    ids = special_token_ids(tokenizer, config)
    fmt = ChatFormat(template, variables, tokenizer, ids["bos"], ids["eos"])
    train_records, val_records = split_records(records, val_fraction)
    stats, val_stats = SFTStats(records=len(train_records), problems=problems), SFTStats(records=len(val_records))
    train = build_examples(train_records, fmt, seq_len, stats)
    val = build_examples(val_records, fmt, seq_len, val_stats)
    stats.problems += val_stats.problems
    _report_problems(stats.problems)
    if not train:
        shown = "; ".join(stats.problems[:3])
        raise SFTDataError(f"no usable training examples in {', '.join(map(str, files))} "
                           f"({len(stats.problems)} line(s) skipped{': ' + shown if shown else ''}; "
                           f"{stats.no_target} without assistant tokens within seq_len={seq_len})")
    pad = ids["pad"] if ids["pad"] is not None else (ids["eos"] or 0)
    return SFTData(make_rows(train, seq_len, pad, pack=pack), make_rows(val, seq_len, pad, pack=pack) if val else None,
                   stats, val_stats)


def _tokenizer_config(ck_path: Path) -> dict:
    path = Path(ck_path) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SFTDataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None


def _report_problems(problems: list[str]) -> None:
    for p in problems[:MAX_PROBLEMS_SHOWN]:
        console.print(f"[yellow]skipped[/] {p}", markup=True, highlight=False)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        console.print(f"[yellow]... and {len(problems) - MAX_PROBLEMS_SHOWN} more skipped line(s)[/]")


def sft(ckpt: str | Path, data: list[str | Path], out: str | Path, cfg: TrainConfig, *, pack: bool = True,
        val_fraction: float = 0.05, lora=None, resume: bool = False, on_step_end=None,
        quiet: bool = False) -> TrainResult:
    """Fine-tune checkpoint ``ckpt`` on JSONL ``data`` files; write the result to ``out``."""
    ck = load_checkpoint(ckpt)
    if cfg.seq_len > ck.config.max_position_embeddings:
        raise SFTDataError(f"seq_len={cfg.seq_len} exceeds the model's context ({ck.config.max_position_embeddings})")
    tok = ck.tokenizer()
    try:
        d = prepare_sft_data(data, ck.path, tok, seq_len=cfg.seq_len, pack=pack, val_fraction=val_fraction)
    except ChatTemplateError as e:
        raise SFTDataError(f"{ck.path}/tokenizer_config.json: {e}") from None
    if not quiet:
        console.print(f"sft: {d.stats.examples:,} train / {d.val_stats.examples:,} held-out examples in "
                      f"{len(d.train):,} rows of {cfg.seq_len + 1} tokens ({'packed' if pack else 'padded'}, "
                      f"{d.train.fill:.0%} filled); truncated {d.stats.truncated + d.val_stats.truncated}, "
                      f"skipped {len(d.stats.problems)} line(s)")
    model = ck.model
    model.train()
    if lora is not None:
        from .lora import apply_lora, trainable_parameters

        names = apply_lora(model, lora)
        trainable, total = trainable_parameters(model)
        if not quiet:
            console.print(f"LoRA rank {lora.rank} on {len(names)} layers: {trainable:,} of {total:,} parameters "
                          f"train ({trainable / total:.2%})")
    batches = SFTBatches(d.train, cfg.batch_size, cfg.seed)
    device = resolve_device(cfg.device)
    evaluate = None
    if d.val is not None:
        lengths, amp = token_byte_lengths(tok), autocast_dtype(cfg, device)
        evaluate = lambda m: evaluate_assistant_tokens(m.to(device), d.val, lengths, autocast=amp)  # noqa: E731
    before = evaluate(model) if evaluate is not None else {}
    prior = inherited_provenance(ck.provenance)
    stage = {"stage": "sft", "base": checkpoint_identity(ck),
             "data": {"files": [{"path": str(Path(f).resolve()), "sha256": sha256_file(Path(f))} for f in data],
                      "train": d.stats.to_dict(), "val": d.val_stats.to_dict(), "val_fraction": val_fraction,
                      "pack": pack, "rows": len(d.train), "fill": round(d.train.fill, 4)},
             "train": cfg.to_dict(), "lora": lora.to_dict() if lora is not None else None}
    trainer = Trainer(model, sft_step, batches, cfg, out, evaluate=evaluate, tokenizer_from=ck.path,
                      provenance={**prior, "stages": [*prior["stages"], stage]}, on_step_end=on_step_end,
                      quiet=quiet)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        last_eval = result.evals[-1] if result.evals else {}
        assistant_tokens = batches.target_tokens(result.steps)
        stage.update(tokens_seen=result.tokens, assistant_tokens=assistant_tokens, steps=result.steps,
                     seconds=round(result.seconds, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     metrics={**{k: v for k, v in last_eval.items()
                                 if k in ("val_loss", "val_bits_per_byte", "val_perplexity", "val_accuracy")},
                              **{f"start_val_{k}": before[k] for k in ("loss", "bits_per_byte", "accuracy")
                                 if k in before}},
                     summary={"base": ck.path.name, "examples": d.stats.examples, "steps": result.steps,
                              "assistant_tokens": assistant_tokens, "pack": pack,
                              "lora_rank": getattr(lora, "rank", None)})
        if lora is not None:
            from .lora import finish_lora_run

            stage["lora"] = finish_lora_run(trainer.model, out, lora, base=ck.path,
                                            base_sha256=stage["base"]["weights_sha256"])
        save_checkpoint(trainer.model, out, tokenizer_from=ck.path,
                        provenance={**prior, "stages": [*prior["stages"], stage]})
    return result
