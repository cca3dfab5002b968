"""`slm train`, `slm distill`, `slm teacher-cache`: the commands that train a model from a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (LORA_RANK_HELP, QAT_HELP, print_qat_next_step, LORA_TARGETS_DEFAULT, lora_config, out_console, print_lora_summary,
                     train_config)

app = typer.Typer()


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
    qat: Optional[str] = typer.Option(None, "--qat", help=QAT_HELP),
):
    """Pretrain a model on a dataset.

    Examples:

        slm train --data runs/ds --model small --out runs/small --steps 2000
        slm train --data runs/ds --model my_model.yaml --out runs/m --config train.yaml --resume
        torchrun --nproc-per-node 2 -m slmkit.cli train --data runs/ds --model tiny --out runs/ddp
        slm train --data runs/domain-ds --model runs/small --out runs/small-lora --steps 300 --lora-rank 16 --lr 1e-3
        slm train --data runs/ds --model runs/small --out runs/small-q4 --steps 300 --lr 1e-4 --qat q4_0
    """
    from ..train.pretrain import pretrain

    cfg = train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                       seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                       eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                       device=device, qat=qat, resume_from=out if resume else None)
    lora = lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    result = pretrain(data, model, out, cfg, resume=resume, lora=lora)
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")
    if lora is not None:
        print_lora_summary(out)
    print_qat_next_step(cfg, out)


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint directory."),
    student: str = typer.Option(..., "--student", "-s", help="Preset, config YAML, checkpoint, or `teacher:N` "
                                "(keep N evenly spaced teacher layers) / `teacher:0,3,5` (those layers) / `teacher:drop=N` (all "
                                "but the N of lowest block influence on the data)."),
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
    qat: Optional[str] = typer.Option(None, "--qat", help=QAT_HELP),
):
    """Distill a teacher into a smaller student (logit KD, cached, on-policy, hidden states, or sequence-level).

    Examples:

        slm distill --teacher runs/teacher --student tiny --data runs/ds --out runs/student --steps 500
        slm distill -t runs/teacher -s teacher:4 -d runs/ds -o runs/s4 --loss jsd --beta 0.5 --temperature 2
        slm distill -t runs/quickstart/teacher -s teacher:drop=6 -d runs/quickstart/data -o runs/s24   # Minitron depth
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --cache-teacher --cache-k 16
        slm distill -t runs/teacher -s tiny -d runs/ds -o runs/s --on-policy 0.25 --hidden-weight 1.0
        slm distill -t runs/hf-llama -s small -d runs/ds -o runs/s --mode sequence --prompts 512
        slm distill -t runs/teacher -s runs/student -d runs/ds -o runs/s-lora --lora-rank 8 --lr 1e-3
        slm distill -t runs/teacher -s runs/teacher -d runs/ds -o runs/t-q4 --qat q4_0 --lr 5e-5   # QAT-KD
        slm distill -t runs/quickstart/teacher-vocab -s teacher:drop=6 -d runs/quickstart/data -o runs/s24v --alpha 0 \
            --qat quant.int4:group_size=64,format=q4_1,embeddings=true   # the quickstart's student: trimmed vocabulary, QAT
    """
    from ..distill import KDConfig
    from ..distill.run import distill as run_distill

    cfg = train_config(config, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, precision=precision, compile=compile,
                        eval_every=eval_every, save_every=save_every, time_budget_s=time_budget, seed=seed,
                        device=device, qat=qat, resume_from=out if resume else None)
    lora = lora_config(lora_rank, lora_alpha, lora_targets, lora_dropout)
    if lora is not None and mode != "logits":
        raise ValueError("--lora-rank works with --mode logits; sequence-level KD trains the whole student")
    if mode == "sequence":
        from ..distill.sequence import distill_sequence

        result = distill_sequence(teacher, student, data, out, cfg, prompts=prompts, new_tokens=new_tokens,
                                  temperature=temperature, resume=resume)
    elif mode == "logits":
        kd = KDConfig(loss=loss, temperature=temperature, beta=beta, alpha=alpha, on_policy=on_policy,
                      on_policy_tokens=on_policy_tokens, hidden_weight=hidden_weight, layer_map=layer_map)
        if cache_teacher:
            from ..distill.teacher_cache import build_teacher_cache

            cache = build_teacher_cache(teacher, data, k=cache_k, seq_len=cfg.seq_len, temperature=temperature)
        result = run_distill(teacher, student, data, out, cfg, kd, cache=cache, resume=resume, lora=lora)
    else:
        raise ValueError(f"--mode {mode!r}: choose logits or sequence")
    last = result.evals[-1] if result.evals else {}
    out_console.print(f"distilled {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; "
                      f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f} -> {out}")
    if lora is not None:
        print_lora_summary(out)
    print_qat_next_step(cfg, out)


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
    from ..distill.teacher_cache import build_teacher_cache, open_teacher_cache

    path = build_teacher_cache(teacher, data, out, k=k, seq_len=seq_len, temperature=temperature,
                               batch_size=batch_size, max_chunks=max_chunks, device=device)
    meta = open_teacher_cache(path).meta
    out_console.print(f"teacher cache {path}: {meta['num_chunks']:,} windows x {meta['seq_len']} tokens, "
                      f"top-{meta['k']}, {meta['bytes'] / 1e6:.1f} MB, built in {meta['seconds']:.0f}s")
