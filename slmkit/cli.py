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
        from .export import HFExportError

        errors.append(HFExportError)
    except ImportError:
        pass
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
):
    """Pretrain a model on a dataset.

    Examples:

        slm train --data runs/ds --model small --out runs/small --steps 2000
        slm train --data runs/ds --model my_model.yaml --out runs/m --config train.yaml --resume
        torchrun --nproc-per-node 2 -m slmkit.cli train --data runs/ds --model tiny --out runs/ddp
    """
    from .train import TrainConfig
    from .train.pretrain import pretrain

    overrides = dict(steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                     lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                     eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                     device=device)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig.from_yaml(config, **overrides) if config else TrainConfig(**overrides)
    result = pretrain(data, model, out, cfg, resume=resume)
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")


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
):
    """Distill a teacher into a smaller student (logit KD, cached, on-policy, hidden states, or sequence-level).

    Examples:

        slm distill --teacher runs/teacher --student tiny --data runs/ds --out runs/student --steps 500
        slm distill -t runs/teacher -s teacher:4 -d runs/ds -o runs/s4 --loss jsd --beta 0.5 --temperature 2
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --cache-teacher --cache-k 16
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --on-policy 0.25 --hidden-weight 1.0
        slm distill -t runs/hf-llama -s small -d runs/ds -o runs/s --mode sequence --prompts 512
    """
    from .distill import KDConfig
    from .distill.run import distill as run_distill

    cfg = _train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                        eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                        device=device)
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
        result = run_distill(teacher, student, data, out, cfg, kd, cache=cache, resume=resume)
    else:
        raise ValueError(f"--mode {mode!r}: choose logits or sequence")
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"distilled {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")


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


# -- eval / info -------------------------------------------------------------------------------------

@app.command("eval")
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (its held-out split is scored)."),
    split: str = typer.Option("val"),
    seq_len: int = typer.Option(256),
    max_tokens: Optional[int] = typer.Option(None, help="Score at most this many tokens."),
    precision: str = typer.Option("fp32", help="fp32 | bf16"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
):
    """Bits per byte, perplexity and top-1 accuracy on held-out data.

    Example:

        slm eval runs/small --data runs/ds --json runs/small/eval.json
    """
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
    profile: str = typer.Option("default", help="default (about 7.5 minutes on 2 cores) | tiny (seconds, for tests)."),
):
    """Run the main job on the built-in default domain: data, tokenizer, training, evaluation, samples.

    Example:

        slm quickstart
    """
    from .pipeline.quickstart import run_quickstart

    run_quickstart(out, profile=profile)


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
