"""`slm sft`, `slm pairs`, `slm dpo`, `slm merge-lora`: alignment of a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..align.defaults import DPO_TRAIN_DEFAULTS as DPO, PAIRS_SAMPLING as PAIRS, SFT_TRAIN_DEFAULTS as SFT
from .common import (LORA_RANK_HELP, LORA_TARGETS_DEFAULT, QUIET_HELP, default_help, err_console, lora_config,
                     out_console, print_lora_summary, progress_bars, train_config)

CONTEXT_NOTE = ", or the model's context if shorter"
CONFIG_HELP = "Training config YAML (fields of TrainConfig): overrides the defaults; options given here override it."

app = typer.Typer()


@app.command()
def sft(
    ckpt: Path = typer.Argument(..., help="Checkpoint to fine-tune (its tokenizer_config.json holds the chat template)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="JSONL of {\"messages\": [...]} conversations or "
                                    "{prompt, completion} pairs (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack whole examples into seq_len rows (document "
                              "masking: each example attends only to itself) or pad one example per row."),
    val_fraction: float = typer.Option(0.05, help="Records held out (by a hash of their content) for validation "
                                       "loss on assistant tokens."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    steps: Optional[int] = typer.Option(None, help=default_help("Optimizer steps.", SFT, "steps")),
    batch_size: Optional[int] = typer.Option(None, help=default_help("Rows per optimizer step.", SFT, "batch_size")),
    micro_batch_size: Optional[int] = typer.Option(None, help="Rows per forward pass."),
    seq_len: Optional[int] = typer.Option(None, help=default_help(
        "Row length in tokens; longer examples are truncated (and counted).", SFT, "seq_len", CONTEXT_NOTE)),
    lr: Optional[float] = typer.Option(None, help=default_help(
        "Peak learning rate (LoRA usually wants about 10x more).", SFT, "lr")),
    warmup_steps: Optional[int] = typer.Option(None, help=default_help("", SFT, "warmup_steps")),
    weight_decay: Optional[float] = typer.Option(None, help=default_help("", SFT, "weight_decay")),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    eval_every: Optional[int] = typer.Option(None, help=default_help("", SFT, "eval_every")),
    save_every: Optional[int] = typer.Option(None, help=default_help("", SFT, "save_every")),
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
    from ..align.sft import sft as run_sft

    cfg = train_config(config, stage="sft", ckpt=ckpt, steps=steps, batch_size=batch_size,
                       micro_batch_size=micro_batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, precision=precision, eval_every=eval_every,
                       save_every=save_every, seed=seed, device=device, resume_from=out if resume else None)
    lora = lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = run_sft(ckpt, list(data), out, cfg, pack=pack, val_fraction=val_fraction, lora=lora, resume=resume)
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    m = stage.get("metrics", {})
    val = (f"; held-out assistant-token loss {m['start_val_loss']:.4f} -> {m['val_loss']:.4f}"
           if "val_loss" in m and "start_val_loss" in m else "")
    out_console.print(f"sft: {result.steps} steps, {stage['assistant_tokens']:,} assistant tokens trained on "
                      f"in {result.seconds:.0f}s{val} -> {out}")
    if lora is not None:
        print_lora_summary(out)


@app.command()
def pairs(
    ckpt: Path = typer.Argument(..., help="Checkpoint to sample from."),
    prompts: str = typer.Option(..., "--prompts", help="JSONL with 'prompt' (or chat 'messages'), a text file "
                                "with one prompt per line, or `default` (held-out stdlib function prompts)."),
    verifier: str = typer.Option(..., "--verifier", "-v", help="NAME[:key=value,...]: python-syntax, json, regex, "
                                 "length, teacher, or a plug-in module:function / file.py:function."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL of pairs to write."),
    k: int = typer.Option(PAIRS.k, "-k", help="Samples per prompt."),
    temperature: float = typer.Option(PAIRS.temperature, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(PAIRS.top_p, help="Nucleus sampling mass (1.0: the whole distribution, so "
                                "pairs are on-policy samples)."),
    max_new_tokens: int = typer.Option(PAIRS.max_new_tokens, "--max-new-tokens", "-n"),
    seed: int = typer.Option(PAIRS.seed, help="Sampling seed: the same seed and --batch-prompts give the same pairs."),
    batch_prompts: int = typer.Option(PAIRS.batch_prompts, help="Prompts per generate call (each repeated K times)."),
    margin: float = typer.Option(PAIRS.margin, help="Graded verifiers: smallest score gap between chosen and rejected."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many prompts (default prompts: 200)."),
    stop: List[str] = typer.Option([], help="Stop string (repeatable)."),
    val_fraction: Optional[float] = typer.Option(None, help="`--prompts default`: the held-out fraction (default: "
                                                 "the smallest of the checkpoint's datasets)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Synthesize preference pairs: sample K completions per prompt, judge them with a verifier, keep best vs worst.

    Progress bars on stderr count the samples generated and judged.

    Examples:

        slm pairs runs/small --prompts default --verifier python-syntax --out runs/pairs.jsonl -k 8
        slm pairs runs/sft --prompts asks.jsonl --verifier json:schema=ticket.schema.json --out pairs.jsonl
        slm pairs runs/sft --prompts asks.txt --verifier 'regex:pattern=^[A-Z].*\\.$,fullmatch=true' -o pairs.jsonl
        slm pairs runs/small --prompts default --verifier teacher:ckpt=runs/teacher --margin 0.2 -o pairs.jsonl
        slm pairs runs/sft --prompts asks.jsonl --verifier my_checks.py:is_polite --out pairs.jsonl
    """
    from ..align.pairs import pairs_from_checkpoint

    with progress_bars(quiet) as progress:
        stats = pairs_from_checkpoint(ckpt, prompts, verifier, out, limit=limit, val_fraction=val_fraction,
                                      say=lambda m: err_console.print(m, markup=False, highlight=False), k=k,
                                      temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                      batch_prompts=batch_prompts, margin=margin, stop=list(stop), progress=progress)
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
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    steps: Optional[int] = typer.Option(None, help=default_help("Optimizer steps.", DPO, "steps")),
    batch_size: Optional[int] = typer.Option(None, help=default_help("Pairs per optimizer step.", DPO, "batch_size")),
    micro_batch_size: Optional[int] = typer.Option(None, help="Pairs per forward pass."),
    seq_len: Optional[int] = typer.Option(None, help=default_help(
        "Longest prompt+completion; longer prompts lose their start.", DPO, "seq_len", CONTEXT_NOTE)),
    lr: Optional[float] = typer.Option(None, help=default_help(
        "Peak learning rate (LoRA usually wants 10-100x more).", DPO, "lr")),
    warmup_steps: Optional[int] = typer.Option(None, help=default_help("", DPO, "warmup_steps")),
    weight_decay: Optional[float] = typer.Option(None, help=default_help("", DPO, "weight_decay")),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    eval_every: Optional[int] = typer.Option(None, help=default_help("", DPO, "eval_every")),
    save_every: Optional[int] = typer.Option(None, help=default_help("", DPO, "save_every")),
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
    from ..align.dpo import dpo as run_dpo
    from ..align.preference_losses import PreferenceConfig

    pref = PreferenceConfig(loss=loss, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    cfg = train_config(config, stage="dpo", ckpt=ckpt, steps=steps, batch_size=batch_size,
                       micro_batch_size=micro_batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, precision=precision, eval_every=eval_every,
                       save_every=save_every, seed=seed, device=device, resume_from=out if resume else None)
    lora = lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = run_dpo(ckpt, pairs, out, cfg, pref, lora=lora, val_fraction=val_fraction, ref_cache=ref_cache,
                     resume=resume)
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    m = stage.get("metrics", {})
    acc = (f"; held-out preference accuracy {m['start_preference_accuracy']:.3f} -> {m['val_preference_accuracy']:.3f}"
           if "val_preference_accuracy" in m and "start_preference_accuracy" in m else "")
    out_console.print(f"{loss}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s{acc} -> {out}")
    if lora is not None:
        print_lora_summary(out)
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
    from ..align.lora import merge_adapter_checkpoint

    rec = merge_adapter_checkpoint(base, adapter, out)
    out_console.print(f"merged {len(rec['modules'])} adapted layers (rank {rec['config']['rank']}) into {base} -> {out}")
