"""`slm dpo`: preference optimisation (DPO, IPO, SimPO) of a checkpoint on JSONL pairs, on the shared loop.

Order of work: load the checkpoint and the pairs (tokenized with its tokenizer and chat template), split
held-out pairs by a hash of their content, compute the reference log-probabilities once with the starting
weights (or read them from the cache), then train that same model — so no second copy is ever held. With
LoRA, only adapters train; OUT receives the merged checkpoint and OUT/adapter/ the adapter alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from ..checkpoint import inherited_provenance, load_checkpoint, save_checkpoint
from ..train import Trainer, TrainConfig, TrainResult
from ..train.loop import autocast_dtype, resolve_device
from .lora import LoRAConfig, apply_lora, finish_lora_run, peak_memory, trainable_parameters
from .preference_data import PromptFormat, load_preference_pairs, split_pairs
from .preference_losses import PreferenceConfig, PreferenceLossError
from .preference_step import PreferenceBatches, PreferenceStep, preference_evaluator
from .reference_cache import reference_identity, reference_logps

console = Console(stderr=True)
REFERENCE_CACHE = "reference_logps.safetensors"


def dpo(ckpt: str | Path, pairs: str | Path, out: str | Path, train_cfg: TrainConfig, pref_cfg: PreferenceConfig,
        *, lora: LoRAConfig | None = None, val_fraction: float = 0.1, ref_cache: str | Path | None = None,
        resume: bool = False, on_step_end: Callable | None = None, quiet: bool = False) -> TrainResult:
    from ..data.tokenizer import token_byte_lengths
    from ..distill.teacher_cache import teacher_identity as checkpoint_identity

    say = (lambda msg: None) if quiet else (lambda msg: console.print(msg, markup=False, highlight=False))
    ck = load_checkpoint(ckpt)
    if train_cfg.seq_len > ck.config.max_position_embeddings:
        raise PreferenceLossError(f"--seq-len {train_cfg.seq_len} exceeds {ckpt}'s context "
                                  f"({ck.config.max_position_embeddings} positions); pass --seq-len "
                                  f"{ck.config.max_position_embeddings} or less")
    tokenizer = ck.tokenizer()
    fmt = PromptFormat.from_checkpoint(ckpt, tokenizer)
    examples, stats = load_preference_pairs(pairs, fmt, seq_len=train_cfg.seq_len, warn=lambda m: say(f"warning: {m}"))
    train_idx, val_idx = split_pairs(examples, val_fraction)
    device = resolve_device(train_cfg.device)
    amp = autocast_dtype(train_cfg, device)
    identity = checkpoint_identity(ck)
    micro = train_cfg.micro_batch_size or train_cfg.batch_size
    model = ck.model.to(device)

    ref, cache_path, cached = None, None, False
    if pref_cfg.needs_reference:  # the starting weights are the reference: score every pair once, now
        cache_path = Path(ref_cache) if ref_cache else Path(out) / REFERENCE_CACHE
        ref_id = reference_identity(pairs, identity, seq_len=train_cfg.seq_len, amp_dtype=amp)
        t0 = time.perf_counter()
        ref, cached = reference_logps(cache_path, ref_id, model, examples, batch_size=micro, device=device,
                                      amp_dtype=amp)
        say(f"reference log-probs of {len(examples)} pairs {'read from' if cached else 'written to'} {cache_path} "
            f"({time.perf_counter() - t0:.1f}s)")

    val_examples = [examples[i] for i in val_idx]
    evaluate = None
    if val_examples:
        evaluate = preference_evaluator(val_examples, None if ref is None else ref[val_idx], pref_cfg,
                                        byte_lengths=token_byte_lengths(tokenizer), batch_size=micro,
                                        device=device, amp_dtype=amp)
    before = evaluate(model) if evaluate else {}
    lora_names = apply_lora(model, lora) if lora is not None else []
    trainable, total = trainable_parameters(model)
    model.train()
    if lora is not None:
        say(f"LoRA rank {lora.rank} on {len(lora_names)} layers: {trainable:,} of {total:,} parameters train "
            f"({trainable / total:.2%})")

    prior = inherited_provenance(ck.provenance)
    stage = {"stage": "dpo", "base": identity, "preference": pref_cfg.to_dict(), "train": train_cfg.to_dict(),
             "lora": lora.to_dict() if lora else None,
             "pairs": {"path": str(Path(pairs).resolve()), "train": len(train_idx), "val": len(val_idx),
                       "val_fraction": val_fraction, **stats.to_dict()},
             "reference": None if cache_path is None else {"cache": str(cache_path.resolve()), "reused": cached}}
    batches = PreferenceBatches(examples, train_idx, ref, train_cfg.batch_size, train_cfg.seed)
    trainer = Trainer(model, PreferenceStep(pref_cfg), batches, train_cfg, out, evaluate=evaluate,
                      tokenizer_from=ckpt, provenance={**prior, "stages": [*prior["stages"], stage]},
                      on_step_end=on_step_end, quiet=quiet)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        after = result.evals[-1] if result.evals else {}
        stage.update(steps=result.steps, tokens_seen=result.tokens, seconds=round(result.seconds, 1),
                     finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     metrics=_metrics(before, after),
                     summary={"loss": pref_cfg.loss, "beta": pref_cfg.beta, "pairs": len(train_idx),
                              "val_accuracy": after.get("val_accuracy"), "trainable_parameters": trainable,
                              "total_parameters": total, **peak_memory()})
        if lora is not None:
            stage["lora"] = finish_lora_run(trainer.model, out, lora, base=ckpt, base_sha256=identity["weights_sha256"])
        save_checkpoint(trainer.model, out, tokenizer_from=ckpt,
                        provenance={**prior, "stages": [*prior["stages"], stage]})
    return result


def _metrics(before: dict, after: dict) -> dict:
    """Held-out figures before training (the starting checkpoint) and after, under explicit names."""
    names = {"accuracy": "preference_accuracy", "loss": "preference_loss", "reward_margin": "reward_margin",
             "bits_per_byte": "chosen_bits_per_byte"}
    out = {f"val_{v}": after[f"val_{k}"] for k, v in names.items() if f"val_{k}" in after}
    out.update({f"start_{v}": before[k] for k, v in names.items() if k in before})
    return out
