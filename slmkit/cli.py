"""`slm`: the command-line face of slmkit. Thin: parse arguments, call the library, print results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="slmkit: small language models for one domain, trained, measured and served on your machine.")
export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint to another format.")
import_app = typer.Typer(no_args_is_help=True, help="Import a checkpoint from another format.")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")

out_console = Console()
err_console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .model import ConfigError
    from .compress.base import PassError
    from .train import TrainConfigError

    errors: list[type[BaseException]] = [CheckpointError, DataError, ConfigError, TrainConfigError, PassError,
                                         FileNotFoundError]
    try:
        from .export import GGUFExportError, HFExportError

        errors += [HFExportError, GGUFExportError]
    except ImportError:
        pass
    try:
        from .align.lora import LoRAError
        from .align.preference_losses import PreferenceLossError
        from .align.reference_cache import ReferenceCacheError

        errors += [LoRAError, PreferenceLossError, ReferenceCacheError]
    except ImportError:
        pass
    try:
        from .align.chat import ChatTemplateError
        from .align.json_schema import SchemaError
        from .align.verifiers import VerifierError

        errors += [ChatTemplateError, SchemaError, VerifierError]
    except ImportError:
        pass
    from .evaluate.pareto import BudgetError
    from .evaluate.tasks import TaskError
    from .pipeline.recipe import RecipeError

    errors += [TaskError, BudgetError, RecipeError]
    return tuple(errors)


# -- data --------------------------------------------------------------------------------------------

@app.command()
def data(
    sources: List[str] = typer.Argument(None, help="Files, directories, globs or .jsonl files. "
                                                   "None: the default domain (Python stdlib + pydoc topics)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to write."),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL records."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (including special tokens)."),
    val_fraction: float = typer.Option(0.01, help="Fraction of documents held out (by a hash of their id)."),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Mask e-mails, phones, IPs, card numbers, API keys."),
    tokenizer: Optional[Path] = typer.Option(None, help="Reuse this tokenizer.json (or a directory with one)."),
    max_bytes: Optional[int] = typer.Option(None, help="Stop after this many bytes of documents (quick runs)."),
):
    """Build a dataset directory: cleaned documents, a byte-level BPE tokenizer and token shards.

    Examples:

        slm data --out runs/ds                          # the default domain
        slm data docs/ src/ 'notes/**/*.md' --out runs/ds --scrub-pii
        slm data tickets.jsonl --text-field body --out runs/ds --tokenizer teacher/
    """
    from .data import build_dataset

    meta = build_dataset(list(sources or []), out, text_field=text_field, vocab_size=vocab_size,
                         val_fraction=val_fraction, scrub_pii=scrub_pii, tokenizer=tokenizer, max_bytes=max_bytes)
    table = Table(title=f"dataset {out}")
    table.add_column("split")
    for c in ("documents", "bytes", "tokens"):
        table.add_column(c, justify="right")
    for name, s in meta["splits"].items():
        table.add_row(name, f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}")
    out_console.print(table)
    extra = [f"vocabulary {meta['vocab_size']:,}", f"duplicates removed {meta.get('dedup_removed', 0):,}"]
    if meta.get("skipped_counts"):
        extra.append("skipped " + ", ".join(f"{k}: {v}" for k, v in meta["skipped_counts"].items()))
    if meta.get("pii"):
        extra.append("PII masked " + ", ".join(f"{k}: {v}" for k, v in meta["pii"].items()))
    out_console.print("; ".join(extra))


# -- LoRA options (train, distill, dpo) ---------------------------------------------------------------

LORA_RANK_HELP = "Train LoRA adapters of this rank on a frozen checkpoint instead of all weights (OUT gets the " \
                 "merged model, OUT/adapter/ the PEFT-format adapter)."
LORA_TARGETS_DEFAULT = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _lora_config(rank, alpha, targets, dropout):
    if rank is None:
        return None
    from .align.lora import LoRAConfig

    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(t.strip() for t in targets.split(",")))


def _print_lora_summary(out: Path) -> None:
    """Trainable parameters and peak memory of a LoRA run, from the stage it recorded in OUT/slmkit.json."""
    stages = json.loads((Path(out) / "slmkit.json").read_text()).get("stages", [])
    rec = stages[-1].get("lora") if stages else None
    if rec and "trainable_parameters" in rec:
        out_console.print(f"LoRA: {rec['trainable_parameters']:,} of {rec['total_parameters']:,} parameters trained "
                          f"({rec['trainable_parameters'] / rec['total_parameters']:.2%}); peak RSS "
                          f"{rec['peak_rss_bytes'] / 2**20:,.0f} MiB; adapter -> {Path(out) / rec['adapter']}")


# -- train -------------------------------------------------------------------------------------------

@app.command()
def train(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory from `slm data`."),
    model: str = typer.Option("small", "--model", "-m", help="Preset name (micro, tiny, small, base, medium, "
                              "large), a config YAML/JSON, or a checkpoint to continue from."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    config: Optional[Path] = typer.Option(None, help="Training config YAML (fields of TrainConfig); "
                                                     "command-line options override it."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size in sequences."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass (gradient accumulation)."),
    seq_len: Optional[int] = typer.Option(None, help="Training sequence length in tokens."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup_steps: Optional[int] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    eval_every: Optional[int] = typer.Option(None), save_every: Optional[int] = typer.Option(None),
    time_budget: Optional[float] = typer.Option(None, help="Train for about this many seconds."),
    seed: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last if a previous run was stopped."),
    lora_rank: Optional[int] = typer.Option(None, help=LORA_RANK_HELP),
    lora_alpha: float = typer.Option(16.0, help="LoRA scaling numerator (update scaled by alpha/rank)."),
    lora_targets: str = typer.Option(LORA_TARGETS_DEFAULT, help="Comma-separated module names that get adapters."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
):
    """Pretrain a model on a dataset.

    Examples:

        slm train --data runs/ds --model small --out runs/small --steps 2000
        slm train --data runs/ds --model my_model.yaml --out runs/m --config train.yaml --resume
        torchrun --nproc-per-node 2 -m slmkit.cli train --data runs/ds --model tiny --out runs/ddp
        slm train --data runs/domain-ds --model runs/small --out runs/small-lora --steps 300 --lora-rank 16 --lr 1e-3
    """
    from .train import TrainConfig
    from .train.pretrain import pretrain

    overrides = dict(steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                     lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                     eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                     device=device)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig.from_yaml(config, **overrides) if config else TrainConfig(**overrides)
    lora = _lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = pretrain(data, model, out, cfg, resume=resume, lora=lora)
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")
    if lora is not None:
        _print_lora_summary(out)


# -- distill -----------------------------------------------------------------------------------------

def _train_config(config, **overrides):
    from .train import TrainConfig

    overrides = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig.from_yaml(config, **overrides) if config else TrainConfig(**overrides)


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint directory."),
    student: str = typer.Option(..., "--student", "-s", help="Preset, config YAML, checkpoint, or `teacher:N` "
                                "(keep N evenly spaced teacher layers) / `teacher:0,3,5` (those layers)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (built with the teacher's tokenizer "
                                                         "for logit KD)."),
    out: Path = typer.Option(..., "--out", "-o", help="Student checkpoint directory to write."),
    mode: str = typer.Option("logits", help="logits (token-level KD) | sequence (train on teacher-written text; "
                                            "works across tokenizers)."),
    loss: str = typer.Option("forward_kl", help="forward_kl | reverse_kl | jsd"),
    temperature: float = typer.Option(1.0, help="Softmax temperature of both distributions (loss scaled by T^2)."),
    beta: float = typer.Option(0.5, help="Generalized JSD interpolation (jsd only)."),
    alpha: float = typer.Option(0.5, help="Weight of the KD loss; 1-alpha goes to next-token cross-entropy."),
    cache: Optional[Path] = typer.Option(None, help="Train from this teacher logit cache (`slm teacher-cache`)."),
    cache_teacher: bool = typer.Option(False, "--cache-teacher", help="Build the teacher cache first (top-k "
                                       "--cache-k) next to the dataset, then train from it."),
    cache_k: int = typer.Option(16, help="Top-k log-probabilities kept per position in the cache."),
    on_policy: float = typer.Option(0.0, help="Fraction of steps on student-sampled continuations (GKD)."),
    on_policy_tokens: int = typer.Option(64, help="Tokens the student samples per window on those steps."),
    hidden_weight: float = typer.Option(0.0, help="Weight of the hidden-state loss (0 = off)."),
    layer_map: Optional[str] = typer.Option(None, help="Student:teacher layer pairs, e.g. 0:1,1:3 (default: uniform)."),
    prompts: int = typer.Option(256, help="--mode sequence: number of teacher continuations."),
    new_tokens: int = typer.Option(128, help="--mode sequence: tokens the teacher writes per prompt."),
    config: Optional[Path] = typer.Option(None, help="Training config YAML (fields of TrainConfig)."),
    steps: Optional[int] = typer.Option(None), batch_size: Optional[int] = typer.Option(None),
    micro_batch_size: Optional[int] = typer.Option(None), seq_len: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None), warmup_steps: Optional[int] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile"),
    eval_every: Optional[int] = typer.Option(None), save_every: Optional[int] = typer.Option(None),
    time_budget: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last."),
    lora_rank: Optional[int] = typer.Option(None, help=LORA_RANK_HELP + " --student must be a checkpoint."),
    lora_alpha: float = typer.Option(16.0, help="LoRA scaling numerator (update scaled by alpha/rank)."),
    lora_targets: str = typer.Option(LORA_TARGETS_DEFAULT, help="Comma-separated module names that get adapters."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
):
    """Distill a teacher into a smaller student (logit KD, cached, on-policy, hidden states, or sequence-level).

    Examples:

        slm distill --teacher runs/teacher --student tiny --data runs/ds --out runs/student --steps 500
        slm distill -t runs/teacher -s teacher:4 -d runs/ds -o runs/s4 --loss jsd --beta 0.5 --temperature 2
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --cache-teacher --cache-k 16
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --on-policy 0.25 --hidden-weight 1.0
        slm distill -t runs/hf-llama -s small -d runs/ds -o runs/s --mode sequence --prompts 512
        slm distill -t runs/teacher -s runs/student -d runs/ds -o runs/s-lora --lora-rank 8 --lr 1e-3
    """
    from .distill import KDConfig
    from .distill.run import distill as run_distill

    cfg = _train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                        eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                        device=device)
    lora = _lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    if lora is not None and mode != "logits":
        raise ValueError("--lora-rank works with --mode logits; sequence-level KD trains the whole student")
    if mode == "sequence":
        from .distill.sequence import distill_sequence

        result = distill_sequence(teacher, student, data, out, cfg, prompts=prompts, new_tokens=new_tokens,
                                  temperature=temperature, resume=resume)
    elif mode == "logits":
        kd = KDConfig(loss=loss, temperature=temperature, beta=beta, alpha=alpha, on_policy=on_policy,
                      on_policy_tokens=on_policy_tokens, hidden_weight=hidden_weight, layer_map=layer_map)
        if cache_teacher:
            from .distill.teacher_cache import build_teacher_cache

            cache = build_teacher_cache(teacher, data, k=cache_k, seq_len=cfg.seq_len, temperature=temperature)
        result = run_distill(teacher, student, data, out, cfg, kd, cache=cache, resume=resume, lora=lora)
    else:
        raise ValueError(f"--mode {mode!r}: choose logits or sequence")
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"distilled {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")
    if lora is not None:
        _print_lora_summary(out)


@app.command("teacher-cache")
def teacher_cache(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint directory."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (the teacher's tokenizer)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache directory (default: inside the dataset)."),
    k: int = typer.Option(16, help="Top-k log-probabilities kept per position."),
    seq_len: int = typer.Option(256, help="Window length; distill with the same --seq-len."),
    temperature: float = typer.Option(1.0, help="Teacher temperature; distill with the same --temperature."),
    batch_size: int = typer.Option(8), max_chunks: Optional[int] = typer.Option(None, help="Cache only this many windows."),
    device: str = typer.Option("cpu"),
):
    """Run the teacher once over the training split and store its top-k log-probabilities (resumable).

    Example:

        slm teacher-cache --teacher runs/teacher --data runs/ds --k 16
        slm distill --teacher runs/teacher --student tiny --data runs/ds --out runs/s --cache runs/ds/teacher_cache/...
    """
    from .distill.teacher_cache import build_teacher_cache, open_teacher_cache

    path = build_teacher_cache(teacher, data, out, k=k, seq_len=seq_len, temperature=temperature,
                               batch_size=batch_size, max_chunks=max_chunks, device=device)
    meta = open_teacher_cache(path).meta
    out_console.print(f"teacher cache {path}: {meta['num_chunks']:,} windows x {meta['seq_len']} tokens, "
                      f"top-{meta['k']}, {meta['bytes'] / 1e6:.1f} MB, built in {meta['seconds']:.0f}s")


# -- preference optimisation / LoRA -----------------------------------------------------------------

@app.command()
def sft(
    ckpt: Path = typer.Argument(..., help="Checkpoint to fine-tune (its tokenizer_config.json holds the chat template)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="JSONL of {\"messages\": [...]} conversations or "
                                    "{prompt, completion} pairs (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack whole examples into seq_len rows (attention "
                              "crosses examples in a row, as in pretraining) or pad one example per row."),
    val_fraction: float = typer.Option(0.05, help="Records held out (by a hash of their content) for validation "
                                       "loss on assistant tokens."),
    config: Optional[Path] = typer.Option(None, help="Training config YAML (fields of TrainConfig)."),
    steps: int = typer.Option(200), batch_size: int = typer.Option(16, help="Rows per optimizer step."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Rows per forward pass."),
    seq_len: int = typer.Option(512, help="Row length in tokens; longer examples are truncated (and counted)."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (LoRA usually wants about 10x more)."),
    warmup_steps: int = typer.Option(10), weight_decay: float = typer.Option(0.0),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    eval_every: int = typer.Option(50), save_every: int = typer.Option(100),
    seed: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last."),
    lora_rank: Optional[int] = typer.Option(None, help=LORA_RANK_HELP),
    lora_alpha: float = typer.Option(16.0, help="LoRA scaling numerator (update scaled by alpha/rank)."),
    lora_targets: str = typer.Option(LORA_TARGETS_DEFAULT, help="Comma-separated module names that get adapters."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
):
    """Supervised fine-tuning (instruction tuning): loss on assistant tokens only.

    Lines that cannot be used are reported as `file:line: reason` and skipped.

    Examples:

        slm sft runs/small --data chat.jsonl --out runs/sft --steps 300
        slm sft runs/small --data chat.jsonl --data more.jsonl --out runs/sft --no-pack --seq-len 256
        slm sft runs/small --data chat.jsonl --out runs/sft-lora --lora-rank 16 --lr 1e-3
    """
    from .align.sft import sft as run_sft

    cfg = _train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                        precision=precision, eval_every=eval_every, save_every=save_every, seed=seed, device=device)
    lora = _lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = run_sft(ckpt, list(data), out, cfg, pack=pack, val_fraction=val_fraction, lora=lora, resume=resume)
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    m = stage.get("metrics", {})
    val = (f"; held-out assistant-token loss {m['start_val_loss']:.4f} -> {m['val_loss']:.4f}"
           if "val_loss" in m and "start_val_loss" in m else "")
    out_console.print(f"sft: {result.steps} steps, {stage['assistant_tokens']:,} assistant tokens trained on "
                      f"in {result.seconds:.0f}s{val} -> {out}")
    if lora is not None:
        _print_lora_summary(out)


@app.command()
def pairs(
    ckpt: Path = typer.Argument(..., help="Checkpoint to sample from."),
    prompts: str = typer.Option(..., "--prompts", help="JSONL with 'prompt' (or chat 'messages'), a text file "
                                "with one prompt per line, or `default` (held-out stdlib function prompts)."),
    verifier: str = typer.Option(..., "--verifier", "-v", help="NAME[:key=value,...]: python-syntax, json, regex, "
                                 "length, teacher, or a plug-in module:function / file.py:function."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL of pairs to write."),
    k: int = typer.Option(8, "-k", help="Samples per prompt."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    seed: int = typer.Option(0, help="Sampling seed: the same seed and --batch-prompts give the same pairs."),
    batch_prompts: int = typer.Option(4, help="Prompts per generate call (each repeated K times)."),
    margin: float = typer.Option(0.0, help="Graded verifiers: smallest score gap between chosen and rejected."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many prompts (default prompts: 200)."),
    stop: List[str] = typer.Option([], help="Stop string (repeatable)."),
    val_fraction: Optional[float] = typer.Option(None, help="`--prompts default`: the held-out fraction (default: "
                                                 "the smallest of the checkpoint's datasets)."),
):
    """Synthesize preference pairs: sample K completions per prompt, judge them with a verifier, keep best vs worst.

    Examples:

        slm pairs runs/small --prompts default --verifier python-syntax --out runs/pairs.jsonl -k 8
        slm pairs runs/sft --prompts asks.jsonl --verifier json:schema=ticket.schema.json --out pairs.jsonl
        slm pairs runs/sft --prompts asks.txt --verifier 'regex:pattern=^[A-Z].*\\.$,fullmatch=true' -o pairs.jsonl
        slm pairs runs/small --prompts default --verifier teacher:ckpt=runs/teacher --margin 0.2 -o pairs.jsonl
        slm pairs runs/sft --prompts asks.jsonl --verifier my_checks.py:is_polite --out pairs.jsonl
    """
    from .align.pairs import pairs_from_checkpoint

    stats = pairs_from_checkpoint(ckpt, prompts, verifier, out, limit=limit, val_fraction=val_fraction,
                                  say=lambda m: err_console.print(m, markup=False, highlight=False), k=k,
                                  temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                  batch_prompts=batch_prompts, margin=margin, stop=list(stop))
    s = stats.to_dict()
    out_console.print(f"{s['pairs']} pairs from {s['prompts']} prompts x {k} samples (pass rate {s['pass_rate']:.1%});"
                      f" skipped: all passed {s['skipped_all_passed']}, all failed {s['skipped_all_failed']}, "
                      f"small margin {s['skipped_small_margin']}, identical {s['skipped_identical']}, "
                      f"bad lines {s['skipped_lines']} -> {out}")


@app.command()
def dpo(
    ckpt: Path = typer.Argument(..., help="Checkpoint to align (also the frozen reference)."),
    pairs: Path = typer.Option(..., "--pairs", help="JSONL of {prompt, chosen, rejected}: text, or chat messages."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    loss: str = typer.Option("dpo", help="dpo (sigmoid) | ipo | simpo (reference-free)."),
    beta: Optional[float] = typer.Option(None, help="Inverse temperature (default: 0.1 for dpo/ipo, 2.0 for simpo)."),
    label_smoothing: float = typer.Option(0.0, help="dpo/simpo: assumed fraction of flipped labels (cDPO)."),
    gamma: float = typer.Option(1.0, help="simpo: target reward margin."),
    val_fraction: float = typer.Option(0.1, help="Pairs held out (by a hash of their content) for preference accuracy."),
    ref_cache: Optional[Path] = typer.Option(None, help="Reference log-prob cache file (default OUT/"
                                             "reference_logps.safetensors); reused when pairs and checkpoint match."),
    config: Optional[Path] = typer.Option(None, help="Training config YAML (fields of TrainConfig)."),
    steps: int = typer.Option(200), batch_size: int = typer.Option(8, help="Pairs per optimizer step."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Pairs per forward pass."),
    seq_len: int = typer.Option(512, help="Longest prompt+completion; longer prompts lose their start."),
    lr: float = typer.Option(1e-5, help="Peak learning rate (LoRA usually wants 10-100x more)."),
    warmup_steps: int = typer.Option(10), weight_decay: float = typer.Option(0.0),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    eval_every: int = typer.Option(50), save_every: int = typer.Option(100),
    seed: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last."),
    lora_rank: Optional[int] = typer.Option(None, help=LORA_RANK_HELP),
    lora_alpha: float = typer.Option(16.0, help="LoRA scaling numerator (update scaled by alpha/rank)."),
    lora_targets: str = typer.Option(LORA_TARGETS_DEFAULT, help="Comma-separated module names that get adapters."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
):
    """Preference optimisation (DPO, IPO, SimPO) of a checkpoint on chosen/rejected pairs.

    Reference log-probabilities are computed once with the starting weights and cached; held-out pairs give
    preference accuracy.

    Examples:

        slm dpo runs/sft --pairs runs/pairs.jsonl --out runs/dpo --steps 300 --beta 0.1
        slm dpo runs/sft --pairs pairs.jsonl --out runs/ipo --loss ipo --beta 0.5
        slm dpo runs/sft --pairs pairs.jsonl --out runs/simpo --loss simpo --beta 2.0 --gamma 1.0
        slm dpo runs/sft --pairs pairs.jsonl --out runs/dpo-lora --lora-rank 16 --lr 5e-4
    """
    from .align.dpo import dpo as run_dpo
    from .align.preference_losses import PreferenceConfig

    pref = PreferenceConfig(loss=loss, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    cfg = _train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                        precision=precision, eval_every=eval_every, save_every=save_every, seed=seed, device=device)
    lora = _lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = run_dpo(ckpt, pairs, out, cfg, pref, lora=lora, val_fraction=val_fraction, ref_cache=ref_cache,
                     resume=resume)
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    m = stage.get("metrics", {})
    acc = (f"; held-out preference accuracy {m['start_preference_accuracy']:.3f} -> {m['val_preference_accuracy']:.3f}"
           if "val_preference_accuracy" in m and "start_preference_accuracy" in m else "")
    out_console.print(f"{loss}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s{acc} -> {out}")
    if lora is not None:
        _print_lora_summary(out)
    else:
        s = stage["summary"]
        out_console.print(f"{s['trainable_parameters']:,} parameters trained; peak RSS {s['peak_rss_bytes'] / 2**20:,.0f} MiB")


@app.command("merge-lora")
def merge_lora_cmd(
    base: Path = typer.Argument(..., help="Checkpoint the adapter was trained on."),
    adapter: Path = typer.Argument(..., help="Adapter directory (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint directory to write."),
):
    """Fold a LoRA adapter (slmkit or PEFT layout) into its base checkpoint: an ordinary checkpoint out.

    Example:

        slm merge-lora runs/sft runs/dpo-lora/adapter --out runs/dpo-merged
    """
    from .align.lora import merge_adapter_checkpoint

    rec = merge_adapter_checkpoint(base, adapter, out)
    out_console.print(f"merged {len(rec['modules'])} adapted layers (rank {rec['config']['rank']}) into {base} -> {out}")


# -- compress ----------------------------------------------------------------------------------------

@app.command()
def compress(
    ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint directory to compress."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Compressed checkpoint directory to write."),
    passes: List[str] = typer.Option([], "--pass", "-p", help="NAME or NAME:key=value,... (repeatable; applied "
                                     "in order; tuple options joined with +, e.g. targets=gate_proj+up_proj)."),
    plan: Optional[Path] = typer.Option(None, help="YAML plan: a list of `{pass: NAME, key: value}` entries."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset for calibration and bits/byte "
                                        "(built with this checkpoint's tokenizer)."),
    calib_samples: int = typer.Option(64, help="Calibration sequences."),
    calib_seq_len: int = typer.Option(256, help="Calibration sequence length (also the eval window)."),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens scored before and after each pass."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure decode tokens/s after each pass."),
    list_passes: bool = typer.Option(False, "--list", help="List the available passes and their options."),
):
    """Compress a checkpoint with passes (pruning, low-rank, quantization), one measured table row per pass.

    Examples:

        slm compress --list
        slm compress runs/small --data runs/ds --pass prune.wanda:sparsity=0.5 --pass quant.int8 --out runs/small-c
        slm compress runs/small --data runs/ds --pass prune.width:mlp_ratio=0.5,heads_ratio=0.5 --out runs/narrow
        slm compress runs/small --data runs/ds --pass quant.gptq:bits=4,group_size=128,act_order=true -o runs/q4
        slm compress runs/small --data runs/ds --plan plan.yaml --out runs/small-c
    """
    import dataclasses as dc

    from .compress.base import PASSES, _load_builtin_passes
    from .compress.run import compress as run_compress, load_plan, parse_pass

    if list_passes:
        _load_builtin_passes()
        t = Table(title="compression passes")
        t.add_column("pass")
        t.add_column("calibration")
        t.add_column("options (default)")
        t.add_column("what it does")
        for name, p in sorted(PASSES.items()):
            opts = ", ".join(f"{f.name}={f.default!r}" if f.default is not dc.MISSING else f.name
                             for f in dc.fields(p.config_cls))
            t.add_row(name, "yes" if p.needs_calibration else "", opts, p.summary)
        out_console.print(t)
        return
    if ckpt is None or out is None:
        raise ValueError("give a checkpoint and --out (or --list)")
    specs = (load_plan(plan) if plan else []) + [parse_pass(p) for p in passes]
    if not specs:
        raise ValueError("no passes given: use --pass NAME[:k=v,...] or --plan FILE (see `slm compress --list`)")

    table = Table(title=f"slm compress {ckpt} -> {out}")
    for col in ("pass", "params", "nonzero", "bytes", "bits/byte", "decode tok/s", "seconds"):
        table.add_column(col, justify="left" if col == "pass" else "right")

    def row(r: dict) -> None:
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        tok = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        table.add_row(r["pass"], f"{r['parameters']:,}", f"{r['nonzero']:,}", f"{r['bytes']:,}", bpb, tok,
                      f"{r['seconds']:.1f}")
        err_console.print(f"[dim]{r['pass']}: done[/]")

    run_compress(ckpt, out, specs, data=data, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                 eval_tokens=eval_tokens, speed=speed, progress=row)
    out_console.print(table)
    out_console.print(f"wrote {out}")


# -- generate ----------------------------------------------------------------------------------------

@app.command()
def generate(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    prompts: List[str] = typer.Argument(..., help="One or more prompts (batched together)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass."),
    stop: List[str] = typer.Option([], help="Stop string (repeatable)."),
    seed: Optional[int] = typer.Option(None),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come (single prompt)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step: about 2x faster "
                                 "decoding after a one-off compile of a minute or more; worth it for long runs."),
):
    """Sample continuations with a KV cache.

    Examples:

        slm generate runs/small "def parse_header(line):" -n 64 --temperature 0
        slm generate runs/small "import os" "class Queue:" --seed 0 --stop "\\n\\n"
    """
    from .checkpoint import load_checkpoint
    from .serve.generate import SamplingParams, generate as run_generate

    ck = load_checkpoint(ckpt)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop=list(stop), seed=seed)
    streaming = stream and len(prompts) == 1
    if streaming:
        out_console.print(prompts[0], end="", style="bold", markup=False, highlight=False)

    def on_token(row: int, delta: str) -> None:
        out_console.print(delta, end="", markup=False, highlight=False)

    results = run_generate(ck.model, ck.tokenizer(), list(prompts), params, on_token=on_token if streaming else None,
                           compile=compile)
    if streaming:
        out_console.print()
    else:
        for p, r in zip(prompts, results):
            out_console.rule(p[:60], style="dim")
            out_console.print(p + r.text, markup=False, highlight=False)
    r = results[0]
    tok_s = sum(x.completion_tokens for x in results) / max(r.decode_seconds, 1e-9)
    err_console.print(f"[dim]{sum(x.completion_tokens for x in results)} tokens, {tok_s:.1f} tok/s decode, "
                      f"finish: {', '.join(x.finish_reason for x in results)}[/]")


# -- serve -------------------------------------------------------------------------------------------

@app.command()
def serve(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default serves this machine only; "
                             "0.0.0.0 exposes the server to the network (use --api-key then)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SLM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every /v1 request "
                                               "(or set SLM_API_KEY)."),
    max_concurrent: int = typer.Option(8, help="Sequences decoded together (continuous batching)."),
    max_queue: int = typer.Option(64, help="Sequences that may wait for a slot; beyond that requests get 503."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt accepted (default: the context)."),
    max_n: int = typer.Option(8, help="Largest `n` (samples per prompt) accepted."),
    log_requests: bool = typer.Option(False, "--log-requests", help="Log request bodies (prompts) and an access "
                                      "log. Off by default: prompts and completions are never logged."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the checkpoint "
                                             "directory's name)."),
):
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health), with continuous batching and streaming. Private by default: binds 127.0.0.1,
    makes no outbound connections, logs no request text.

    Examples:

        slm serve runs/small                     # http://127.0.0.1:8000/v1, model "small"
        SLM_API_KEY=s3cret slm serve runs/small --port 9000 --max-concurrent 16
        slm serve runs/small --host 0.0.0.0 --api-key s3cret --model-name domain

    Then, from any OpenAI client (base_url http://127.0.0.1:8000/v1):

        curl -s localhost:8000/v1/completions -H 'Content-Type: application/json'
             -d '{"model": "small", "prompt": "def main():", "max_tokens": 32}'
    """
    from .serve.server import serve as run_server

    run_server(ckpt, host=host, port=port, api_key=api_key, max_concurrent=max_concurrent, max_waiting=max_queue,
               max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
               log_requests=log_requests, dtype=dtype, device=device, model_name=model_name)


# -- eval / info -------------------------------------------------------------------------------------

@app.command("eval")
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory (its held-out split is "
                                                                    "scored by the lm task)."),
    tasks: str = typer.Option("lm", help="Comma-separated: lm, next-line, function-parse, FILE.jsonl, "
                                         "FILE.jsonl@VERIFIER."),
    split: str = typer.Option("val"),
    seq_len: int = typer.Option(256),
    max_tokens: Optional[int] = typer.Option(None, help="Score at most this many tokens (lm)."),
    items: int = typer.Option(200, help="Items per built-in task."),
    max_new_tokens: int = typer.Option(128, help="Tokens generated per item (generation tasks)."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (lm task)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
):
    """Score a checkpoint: bits per byte on held-out data, multiple-choice and generation tasks.

    Multiple choice is scored by log-likelihood (acc, and acc_norm per byte, as lm-evaluation-harness);
    generation tasks by a verifier (`python-syntax`, `json`, ...) or ROUGE-L against `reference`. The
    built-in `next-line` and `function-parse` tasks come from held-out files of the default domain.

    Examples:

        slm eval runs/small --data runs/ds --json runs/small/eval.json
        slm eval runs/small --data runs/ds --tasks lm,next-line,function-parse
        slm eval runs/small --tasks mc.jsonl,prompts.jsonl@python-syntax
    """
    if tasks.strip() == "lm":
        if data is None:
            raise typer.BadParameter("the lm task needs --data DIR (the dataset whose held-out split is scored)")
        _eval_lm(ckpt, data, split, seq_len, max_tokens, precision, json_out)
        return
    from .evaluate.suite import SuiteConfig, evaluate_checkpoint, parse_tasks

    cfg = SuiteConfig(seq_len=seq_len, max_tokens=max_tokens if max_tokens is not None else 65536, items=items,
                      max_new_tokens=max_new_tokens)
    res = evaluate_checkpoint(ckpt, parse_tasks(tasks), data=data, cfg=cfg)
    table = Table(title=f"{ckpt}")
    table.add_column("task")
    table.add_column("result")
    table.add_column("items", justify="right")
    table.add_column("seconds", justify="right")
    for name, r in res["tasks"].items():
        if name == "lm":
            text = f"bits/byte {r['bits_per_byte']:.4f}, ppl {r['perplexity']:.2f}, acc {r['accuracy']:.3f}"
        elif "acc" in r:
            text = f"acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f} (chance {r['chance']:.3f})"
        else:
            text = f"{r['scorer']} {r['score']:.3f}" + (f", pass rate {r['pass_rate']:.3f}" if "pass_rate" in r else "")
        table.add_row(name, text, f"{r.get('items', r.get('tokens', 0)):,}", f"{r['seconds']:.1f}")
        for line in r.get("skipped_lines", [])[:5]:
            err_console.print(f"[yellow]skipped {line}")
    out_console.print(table)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


def _eval_lm(ckpt, data, split, seq_len, max_tokens, precision, json_out) -> None:
    import torch

    from .checkpoint import load_checkpoint
    from .data import open_dataset, token_byte_lengths
    from .evaluate.lm import evaluate_lm

    ck = load_checkpoint(ckpt)
    ds = open_dataset(data)
    check_same_tokenizer(ck, ds)
    res = evaluate_lm(ck.model, ds.split(split), token_byte_lengths(ds.tokenizer()), seq_len=seq_len,
                      max_tokens=max_tokens, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    table = Table(title=f"{ckpt} on {data} ({split})")
    for k in ("bits_per_byte", "perplexity", "accuracy", "loss", "tokens", "bytes"):
        table.add_column(k, justify="right")
    table.add_row(*(f"{res[k]:.4f}" if isinstance(res[k], float) else f"{res[k]:,}"
                    for k in ("bits_per_byte", "perplexity", "accuracy", "loss", "tokens", "bytes")))
    out_console.print(table)
    if json_out:
        json_out.write_text(json.dumps({"checkpoint": str(ckpt), "data": str(data), "split": split, **res}, indent=2))


def check_same_tokenizer(ck, ds) -> None:
    import hashlib

    if ck.tokenizer_path is None:
        return
    mine = hashlib.sha256(ck.tokenizer_path.read_bytes()).hexdigest()
    if mine != ds.meta.get("tokenizer_sha256"):
        raise ValueError(f"{ck.path}/tokenizer.json differs from the dataset's tokenizer; "
                         f"rebuild the dataset with `slm data ... --tokenizer {ck.path}`")


@app.command()
def info(ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
         as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Parameters, bytes on disk, config and provenance of a checkpoint.

    Example:

        slm info runs/small
    """
    from .checkpoint import load_checkpoint

    from .compress.base import count_parameters

    ck = load_checkpoint(ckpt)
    files = {p.name: p.stat().st_size for p in sorted(Path(ckpt).iterdir()) if p.is_file()}
    logical, nonzero = count_parameters(ck.model)  # counts weights that compressed modules pack as buffers
    summary = {"path": str(ckpt), "parameters": logical, "nonzero_parameters": nonzero,
               "parameters_without_embeddings": ck.model.num_parameters(exclude_embeddings=True),
               "bytes_on_disk": sum(files.values()), "files": files, "config": ck.config.to_dict(),
               "provenance": {k: v for k, v in ck.provenance.items() if k != "files"}}
    if ck.config.num_local_experts:
        from .model.moe import active_parameters, total_parameters

        summary.update(total_parameters=total_parameters(ck.model), active_parameters=active_parameters(ck.model))
    if as_json:
        out_console.print_json(json.dumps(summary))
        return
    t = Table(title=str(ckpt), show_header=False)
    params = f"{summary['parameters']:,}"
    if "active_parameters" in summary:  # mixture of experts: a token runs through k of E experts
        params = f"total {summary['total_parameters']:,}, active per token {summary['active_parameters']:,}"
    t.add_row("parameters", f"{params} ({summary['parameters_without_embeddings']:,} without embeddings)")
    if nonzero != logical:
        t.add_row("nonzero parameters", f"{nonzero:,} ({1 - nonzero / max(logical, 1):.1%} sparse)")
    if ck.provenance.get("passes"):
        t.add_row("compression", " -> ".join(p["name"] for p in ck.provenance["passes"]))
    t.add_row("bytes on disk", f"{summary['bytes_on_disk']:,}")
    c = ck.config
    t.add_row("architecture", f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                              f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, MLP {c.intermediate_size}, "
                              f"vocab {c.vocab_size}, context {c.max_position_embeddings}")
    for s in ck.provenance.get("stages", []):
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in s.get("metrics", {}).items())
        t.add_row(f"stage {s.get('stage')}", ", ".join(f"{k}={v}" for k, v in s.get("summary", {}).items())
                  + (f"; {metrics}" if metrics else ""))
    out_console.print(t)


@app.command()
def bench(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    prompt_len: int = typer.Option(128, help="Prompt tokens for prefill."),
    new_tokens: int = typer.Option(64, help="Decode steps timed."),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(5, help="Timed runs per figure (the median is reported)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (autocast)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
):
    """Prefill and decode tokens/s (batch 1 and 8), time to first token, peak memory, size and parameters.

    Runs in this process after loading only the checkpoint, so the peak resident memory is the checkpoint's
    (plus torch itself). Medians over `--repeats`; the machine is described in the JSON.

    Examples:

        slm bench runs/small
        slm bench runs/small-int4 --batch-sizes 1,4,16 --json runs/small-int4/bench.json
    """
    from .evaluate.bench import BenchConfig, bench_checkpoint

    cfg = BenchConfig(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, threads=threads,
                      batch_sizes=tuple(int(b) for b in batch_sizes.split(",") if b.strip()), dtype=precision)
    r = bench_checkpoint(ckpt, cfg)
    t = Table(title=f"{ckpt} ({r['machine']['cpu']}, {r['machine']['torch_threads']} threads)", show_header=False)
    params = f"{r['parameters']:,}"
    if r["active_parameters"] != r["parameters"]:
        params += f" (active per token {r['active_parameters']:,})"
    if r["nonzero_parameters"] != r["parameters"]:
        params += f" ({r['nonzero_parameters']:,} nonzero)"
    t.add_row("parameters", params)
    t.add_row("bytes on disk", f"{r['bytes_on_disk']:,}")
    for b in cfg.batch_sizes:
        t.add_row(f"batch {b}", f"prefill {r[f'prefill_tok_s_b{b}']:,.0f} tok/s, decode {r[f'decode_tok_s_b{b}']:,.1f} tok/s")
    t.add_row("time to first token", f"{r['ttft_ms']:.1f} ms ({prompt_len}-token prompt)")
    t.add_row("decode latency", f"{r['decode_ms_per_token']:.2f} ms/token")
    t.add_row("peak resident memory", f"{r['peak_rss_bytes'] / 2 ** 20:,.0f} MiB")
    out_console.print(t)
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@app.command()
def select(
    base: Path = typer.Option(..., "--base", help="Checkpoint to compress into candidates."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (calibration, recovery and held-out scoring)."),
    out: Path = typer.Option(Path("runs/select"), "--out", "-o", help="Work directory (cached between runs)."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher for KD recovery (default: the base) and shown "
                                                      "as a reference."),
    budget: Optional[str] = typer.Option(None, help='Constraints, e.g. "bytes<=20MB,decode_ms<=5,bpb<=1.6".'),
    objective: str = typer.Option("bpb", help="Quality to optimise: bpb, next_line, parse_rate, accuracy."),
    tasks: str = typer.Option("lm", help="Eval tasks measured for every candidate (see slm eval)."),
    plan: Optional[List[str]] = typer.Option(None, "--plan", help="NAME=PASS+PASS[+recover+PASS]; repeatable. "
                                                                 "Default: a built-in set."),
    recover_steps: int = typer.Option(60, help="KD recovery steps after structural passes (0: none)."),
    items: int = typer.Option(200, help="Items per built-in task."),
):
    """Build compressed candidates, measure each (quality, size, speed), draw the Pareto fronts and
    recommend the best candidate inside the budget.

    Candidates are built as a cached recipe in OUT, and measurements are cached by weights digest, so a
    rerun after changing the budget is instant and a new plan only builds what is new.

    Examples:

        slm select --base runs/small --data runs/ds --budget "bytes<=5MB,decode_ms<=4"
        slm select --base runs/student --teacher runs/teacher --data runs/ds --tasks lm,next-line \\
            --objective next_line --plan "w50q=prune.width:mlp_ratio=0.5+recover+quant.int4"
    """
    from .evaluate.select import DEFAULT_PLANS, parse_plan, plan_stages
    from .pipeline.recipe import recipe_from_dict, run_recipe

    plans = [parse_plan(p) for p in plan] if plan else list(DEFAULT_PLANS)
    if recover_steps <= 0:
        plans = [type(p)(p.name, p.passes, False, p.after) for p in plans]
    stages, final = plan_stages(plans, str(base.resolve()), str(data.resolve()),
                                teacher=str(teacher.resolve()) if teacher else None, recover_steps=max(recover_steps, 1))
    refs = {"teacher": str(teacher.resolve())} if teacher else {}
    stages.append({"name": "select", "kind": "select", "with": {
        "candidates": {name: (ref if ref.startswith("@") else ref) for name, ref in final.items()},
        "data": str(data.resolve()), "budget": budget, "objective": objective,
        "tasks": [t.strip() for t in tasks.split(",") if t.strip()], "references": refs, "items": items}})
    stages.append({"name": "report", "kind": "report", "with": {"title": f"slm select: {base}"}})
    recipe = recipe_from_dict({"name": "select", "workdir": str(out), "stages": stages}, source="slm select")
    run_recipe(recipe, log=lambda m: err_console.print(m, markup=False, highlight=False))
    _print_selection(out / "select" / "selection.json", out / "report" / "report.html")


def _print_selection(selection_file: Path, report: Path | None) -> None:
    from .evaluate.report import candidates_table

    sel = json.loads(selection_file.read_text())
    header, rows = candidates_table(sel)
    t = Table(title="candidates")
    for h in header:
        t.add_column(h, justify="left" if h in ("model", "notes") else "right")
    for r in rows:
        t.add_row(*[c.replace("**", "") for c in r])
    out_console.print(t)
    for reason in sel["reasons"]:
        out_console.print(f"- {reason}")
    if report is not None and report.exists():
        out_console.print(f"report: {report}")


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML, or a built-in recipe by name (quickstart, distill-compress-select)."),
    workdir: Optional[Path] = typer.Option(None, help="Override the recipe's workdir."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="STAGE.OPTION=VALUE override; repeatable."),
    force: Optional[List[str]] = typer.Option(None, help="Re-run this stage (and everything after it)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage."),
    quiet: bool = typer.Option(False, help="Less output from the stages."),
):
    """Run a declarative pipeline of stages (data, train, distill, compress, sft, pairs, dpo, eval, bench,
    select, export, report). Each stage is cached by a hash of its options and inputs: an unchanged stage
    is skipped, an edited one re-runs with everything downstream, an interrupted training stage resumes.

    Examples:

        slm run distill-compress-select
        slm run distill-compress-select --set teacher.time_budget_s=600 --set select.budget=bytes<=2MB
        slm run my.yaml --force student --until select
    """
    from .pipeline.recipe import load_recipe, run_recipe

    r = load_recipe(recipe, workdir=workdir, overrides=list(set_ or []))
    records = run_recipe(r, force=tuple(force or ()), until=until, quiet=quiet,
                         log=lambda m: err_console.print(m, markup=False, highlight=False))
    t = Table(title=f"recipe {r.name} ({r.workdir})")
    for c in ("stage", "kind", "cached", "seconds", "output"):
        t.add_column(c)
    for rec in records:
        t.add_row(rec.name, rec.kind, "yes" if rec.cached else "", f"{rec.seconds:.1f}", rec.output)
    out_console.print(t)
    sel = [rec for rec in records if rec.kind == "select"]
    if sel:
        rep = [rec for rec in records if rec.kind == "report"]
        _print_selection(r.workdir / sel[-1].name / "selection.json", Path(rep[-1].output) if rep else None)


# -- export / import ---------------------------------------------------------------------------------

@export_app.command("hf")
def export_hf_cmd(ckpt: Path = typer.Argument(..., help="slmkit checkpoint directory."),
                  out: Path = typer.Argument(..., help="Directory to write (Hugging Face layout).")):
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Example:

        slm export hf runs/small runs/small-hf
    """
    from .export import export_hf

    path = export_hf(ckpt, out)
    out_console.print(f"wrote {path}")


@export_app.command("gguf")
def export_gguf_cmd(ckpt: Path = typer.Argument(..., help="slmkit checkpoint directory."),
                    out: Path = typer.Argument(..., help="GGUF file to write."),
                    type: str = typer.Option("f16", "--type", "-t",
                                             help="Matrix storage: f32 | f16 | q8_0 | q4_0 (norms stay f32).")):
    """Write one GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python, ollama) loads.

    Llama, Mistral, Phi-3 and Mixtral export as llama.cpp's `llama` architecture, Qwen2 as `qwen2`; the
    tokenizer and chat template go into the file. Linformer, Transformer-XL memory and slmkit-compressed
    (low-rank, int8/int4) checkpoints are refused: export the model from before compression and let
    `--type` quantize it for llama.cpp.

    Examples:

        slm export gguf runs/small runs/small.gguf

        slm export gguf runs/small runs/small-q8_0.gguf --type q8_0

        llama-cli -m runs/small-q8_0.gguf -p "def fib(n):"
    """
    from .export import export_gguf

    result = export_gguf(ckpt, out, type=type)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    out_console.print(f"wrote {result.path} ({result.architecture}, {result.file_type}, "
                      f"{len(result.tensor_types)} tensors, {result.bytes:,} bytes)")


@import_app.command("hf")
def import_hf_cmd(hf_dir: Path = typer.Argument(..., help="Local Hugging Face Llama/Mistral/Qwen2/Phi-3/Mixtral directory."),
                  out: Path = typer.Argument(..., help="slmkit checkpoint directory to write.")):
    """Read a local Hugging Face checkpoint (safetensors) into slmkit format.

    Example:

        slm import hf ~/models/Llama-3.2-1B runs/llama-1b
    """
    from .export import import_hf

    path = import_hf(hf_dir, out)
    out_console.print(f"wrote {path}")


# -- quickstart --------------------------------------------------------------------------------------

@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Where everything is written."),
    profile: str = typer.Option("default", help="default (about 11 minutes on 2 cores) | tiny (about a minute, "
                                                "for tests)."),
    force: Optional[List[str]] = typer.Option(None, help="Re-run this stage (and everything after it)."),
):
    """Run the built-in recipe on the default domain (your Python's standard library and pydoc topics):
    data -> teacher -> distilled student -> DPO on verifier-made pairs -> int8/int4 variants -> measured ->
    recommended -> report.

    It is the `quickstart` recipe (`slm run quickstart`), so an interrupted run resumes and a rerun reuses
    every finished stage.

    Examples:

        slm quickstart
        slm quickstart --out runs/qs --force select
    """
    from .pipeline.quickstart import run_quickstart

    run_quickstart(out, profile=profile, force=tuple(force or ()))


def main() -> None:
    import os

    errors = _user_errors()
    if os.environ.get("SLM_DEBUG"):  # full tracebacks for bug reports
        errors = ()
    try:
        app()
    except errors as e:
        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        sys.exit(2)
    except ValueError as e:
        if os.environ.get("SLM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
