"""Pretraining from a dataset directory: the glue between data, model, the loop and the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checkpoint import inherited_provenance, load_checkpoint, save_checkpoint
from ..evaluate.lm import evaluate_lm
from ..model import CausalLM, ModelConfig, resolve_model_config
from .config import TrainConfig
from .loop import Trainer, TrainResult, autocast_dtype, resolve_device
from .segments import lm_batches_and_step


def model_for_dataset(spec: str | Path, ds, *, seq_len: int) -> tuple[CausalLM, dict]:
    """A fresh model for `spec` (preset, config file) sized to the dataset's tokenizer, or the weights of
    an existing checkpoint directory (continued pretraining). Also returns the provenance the new checkpoint
    inherits (a checkpoint's stages and compression passes)."""
    spec_path = Path(str(spec))
    if spec_path.is_dir() and (spec_path / "model.safetensors").exists():
        ck = load_checkpoint(spec_path)
        if ck.config.vocab_size < ds.vocab_size:
            raise ValueError(f"{spec_path}: vocabulary {ck.config.vocab_size} is smaller than the dataset's "
                             f"tokenizer ({ds.vocab_size}); build the dataset with --tokenizer {spec_path}")
        ck.model.train()
        return ck.model, inherited_provenance(ck.provenance)
    config = resolve_model_config(spec, vocab_size=ds.vocab_size, bos_token_id=ds.bos_token_id,
                                  eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id,
                                  max_position_embeddings=max(2048, seq_len))
    if config.vocab_size < ds.vocab_size:
        raise ValueError(f"model vocab_size={config.vocab_size} is smaller than the dataset's tokenizer "
                         f"({ds.vocab_size} tokens)")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    return CausalLM(config), inherited_provenance({})


def lm_evaluator(ds, cfg: TrainConfig, device: torch.device):
    from ..data import token_byte_lengths

    val = ds.split("val")
    lengths = token_byte_lengths(ds.tokenizer())
    amp = autocast_dtype(cfg, device)

    def evaluate(model: torch.nn.Module) -> dict:
        return evaluate_lm(model, val, lengths, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                           autocast_dtype=amp)

    return evaluate


def pretrain(data: str | Path, model_spec: str | Path, out: str | Path, cfg: TrainConfig, *,
             resume: bool = False, on_step_end=None, quiet: bool = False, lora=None) -> TrainResult:
    """`lora` (an align.lora.LoRAConfig) trains adapters on the frozen checkpoint `model_spec`; OUT then gets
    the merged model and OUT/adapter/ the adapter."""
    from ..data import open_dataset

    ds = open_dataset(data)
    torch.manual_seed(cfg.seed)
    if lora is not None:
        from ..align.lora import lora_base_checkpoint

        lora_base_checkpoint(model_spec)  # refuse a fresh model before any work
    model, prior = model_for_dataset(model_spec, ds, seq_len=cfg.seq_len)
    if lora is not None:
        from ..align.lora import apply_lora

        apply_lora(model, lora)  # before the Trainer: its optimizer sees only the adapters
    # Transformer-XL memory (config.memory_length > 0): consecutive segments, memory kept across steps.
    batches, step_fn = lm_batches_and_step(model, ds.split("train"), cfg.seq_len, cfg.batch_size, cfg.seed)
    device = resolve_device(cfg.device)
    stage = {"stage": "train", "model": str(model_spec), "config": cfg.to_dict(),
             "data": {"path": str(Path(data).resolve()), "tokenizer_sha256": ds.meta.get("tokenizer_sha256"),
                      "train_tokens": len(ds.split("train"))}}
    trainer = Trainer(model, step_fn, batches, cfg, out, evaluate=lm_evaluator(ds, cfg, device),
                      tokenizer_from=ds.path, provenance={**prior, "stages": [*prior["stages"], stage]},
                      on_step_end=on_step_end,
                      quiet=quiet)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        last_eval = result.evals[-1] if result.evals else {}
        metrics = {k: v for k, v in last_eval.items()
                   if k in ("val_loss", "val_bits_per_byte", "val_perplexity", "val_accuracy")}
        stage.update(tokens_seen=result.tokens, steps=result.steps, seconds=round(result.seconds, 1),
                     metrics=metrics, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     summary={"preset": str(model_spec), "steps": result.steps, "tokens": result.tokens,
                              "seq_len": cfg.seq_len, "batch_size": cfg.batch_size})
        if lora is not None:
            from ..align.lora import finish_lora_run

            stage["lora"] = finish_lora_run(trainer.model, out, lora, base=model_spec)
        save_checkpoint(trainer.model, out, tokenizer_from=ds.path,
                        provenance={**prior, "stages": [*prior["stages"], stage]})
    return result
