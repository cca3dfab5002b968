"""The one training loop.

Everything that differs between pretraining, distillation, SFT and preference optimisation lives in the
step function (what a micro-batch computes) and the batch source (what data a step sees). The loop owns:
AdamW with a warmup + cosine schedule, gradient accumulation and clipping, bf16 autocast, optional
`torch.compile`, DDP under `torchrun`, periodic validation (bits per byte), progress and a JSONL metrics
log, atomic resumable checkpoints, and a final checkpoint with provenance.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from .config import TrainConfig, TrainConfigError
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from .interrupts import StepBoundaryInterrupts, TrainingInterrupted
from .optim import build_optimizer, in_warmup, lr_at
from .state import find_train_state, load_train_state, save_train_state

console = Console(stderr=True)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Elsewhere (e.g. AVX2-only
    CPUs) torch emulates bf16 matmuls and autocast is several times *slower* than fp32. Read once per process."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `cfg.precision`: None means fp32 throughout."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.precision == "bf16" or cpu_has_fast_bf16():
        return torch.bfloat16
    return None


RECENT_STEPS = 10  # steps whose median time re-estimates a time budget


class Trainer:
    """Runs `step_fn` over `batches` with `cfg`. `evaluate(model) -> dict` is called on the main process
    every `eval_every` steps and at the end. `on_step_end(step, record)` may raise to stop (tests use it
    to simulate a crash)."""

    def __init__(self, model: torch.nn.Module, step_fn: Callable, batches, cfg: TrainConfig, out: str | Path, *,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, tokenizer_from: str | Path | None = None,
                 provenance: dict | None = None, on_step_end: Callable | None = None, quiet: bool = False,
                 extra_modules: torch.nn.Module | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.model = model.to(self.device)
        self.step_fn, self.batches, self.evaluate = step_fn, batches, evaluate
        self.tokenizer_from, self.provenance = tokenizer_from, provenance or {}
        self.qat = self._apply_qat(cfg) if cfg.qat else None
        self.on_step_end, self.quiet = on_step_end, quiet or not self.dist.is_main
        self.amp_dtype = autocast_dtype(cfg, self.device)
        world = self.dist.world_size
        if cfg.batch_size % world:
            raise TrainConfigError(f"batch_size={cfg.batch_size} is not divisible by {world} processes")
        per_rank = cfg.batch_size // world
        self.micro = min(cfg.micro_batch_size or per_rank, per_rank)
        if per_rank % self.micro:
            raise TrainConfigError(f"per-process batch {per_rank} is not divisible by micro_batch_size={self.micro}")
        self.accum = per_rank // self.micro
        # Modules trained beside the model but not saved in its checkpoint (e.g. KD projections).
        self.extra_modules = extra_modules.to(self.device) if extra_modules is not None else None
        trained = self.model if extra_modules is None else torch.nn.ModuleList([self.model, self.extra_modules])
        self.optimizer = build_optimizer(trained, cfg)
        self.trained_parameters = list(trained.parameters())
        self.forward_model = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.forward_model,
                                     device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step, self.total_steps, self.tokens_seen = 0, cfg.steps, 0
        self.lr_anchor: tuple[int, float] | None = None  # set when a resume changes the total (see lr_at)
        self.history: list[dict] = []
        self.evals: list[dict] = []

    def _apply_qat(self, cfg: TrainConfig) -> dict:
        """Quantization-aware modules for `cfg.qat` (compress/qat.py), recorded in the stage's provenance."""
        from ..compress.base import PassError
        from ..compress.qat import apply_qat

        if any(type(m).__name__.startswith("LoRA") for m in self.model.modules()):
            raise TrainConfigError("qat: quantization-aware training trains the full weights; it cannot be combined "
                                   "with LoRA adapters (drop --lora-rank, or --qat)")
        try:
            report = apply_qat(self.model, cfg.qat_plan())
        except PassError as e:
            raise TrainConfigError(f"qat={cfg.qat!r}: {e}") from None
        stages = self.provenance.get("stages")
        if stages:
            stages[-1]["qat"] = report
        return report

    # -- persistence --------------------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "lr_anchor": list(self.lr_anchor) if self.lr_anchor else None,
                "config": self.cfg.to_dict(), "world_size": self.dist.world_size, "evals": self.evals}

    def save_state(self) -> None:
        if self.dist.is_main:
            save_train_state(self.out, self.model, self.optimizer, self._trainer_state(),
                             tokenizer_from=self.tokenizer_from, provenance=self.provenance,
                             extra_modules=self.extra_modules)
        barrier(self.dist)

    def try_resume(self) -> bool:
        state_dir = find_train_state(self.out)
        if state_dir is None:
            return False
        st = load_train_state(state_dir, self.model, self.optimizer, self.extra_modules)
        saved_cfg = st.get("config", {})
        for key in ("batch_size", "seq_len", "seed"):
            if saved_cfg.get(key) != getattr(self.cfg, key):
                raise TrainConfigError(f"{state_dir}: cannot resume with {key}={getattr(self.cfg, key)!r}; "
                                       f"the run was started with {saved_cfg.get(key)!r}")
        self.step, self.total_steps = st["step"], st["total_steps"]
        self.lr_anchor = tuple(st["lr_anchor"]) if st.get("lr_anchor") else None
        self.tokens_seen, self.evals = st.get("tokens_seen", 0), st.get("evals", [])
        if self.dist.is_main:
            self._truncate_log(self.step)
        if not self.quiet:
            console.print(f"[bold]resuming[/] from {state_dir} at step {self.step}/{self.total_steps}")
        # With a time budget the total was measured, not asked for; otherwise cfg.steps is this run's request.
        if not self.cfg.time_budget_s and self.cfg.steps != self.total_steps:
            self._change_total_steps(self.cfg.steps, state_dir)
        return True

    def _change_total_steps(self, steps: int, state_dir: Path) -> None:
        """Honour a new total on resume. The learning rate continues from the value it has now and follows
        the same cosine down to the floor at the new total (see `lr_at`'s anchor); warmup is unaffected."""
        if steps < self.step:
            raise TrainConfigError(f"{state_dir}: cannot resume with steps={steps}: the run is already at step "
                                   f"{self.step} (of {self.total_steps}); pass a total of at least {self.step}, "
                                   f"or use the model in {state_dir} as it is")
        if not in_warmup(self.step, self.total_steps, self.cfg):
            self.lr_anchor = (self.step, lr_at(self.step, self.total_steps, self.cfg, self.lr_anchor))
        if not self.quiet:
            console.print(f"[bold]steps[/] {self.total_steps} -> {steps}: the learning rate continues from "
                          f"{lr_at(self.step, steps, self.cfg, self.lr_anchor):.2e} and decays to its floor "
                          f"at step {steps}")
        self.total_steps = steps

    def _log_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _truncate_log(self, step: int) -> None:
        """Drop records past the resumed step. A line that does not parse (typically the last one, torn by a
        crash mid-write) is dropped with a warning: the log is a record of the run, not its state, so it
        must never stop a resume."""
        path = self._log_path()
        if not path.exists():
            return
        keep, torn = [], []
        for lineno, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not ln.strip():
                continue
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:
                torn.append(lineno)
                continue
            if not isinstance(record, dict):
                torn.append(lineno)
            elif record.get("step", 0) <= step:
                keep.append(ln)
        if torn:
            warnings.warn(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
                          "a crash mid-write leaves a partial last line); resuming", RuntimeWarning, stacklevel=2)
        tmp = path.with_name(path.name + ".tmp")  # a crash while rewriting keeps the old log
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, path)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self._log_path(), "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -----------------------------------------------------------------------------------

    def _micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss, metrics = self.step_fn(self.forward_model, batch)
        (loss / self.accum).backward()
        return loss.detach(), metrics

    def _train_step(self) -> dict:
        lr = lr_at(self.step, self.total_steps, self.cfg, self.lr_anchor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        per_rank = self.micro * self.accum
        base = self.dist.rank * per_rank
        losses, tokens, extras = [], 0, {}
        for m in range(self.accum):
            rows = slice(base + m * self.micro, base + (m + 1) * self.micro)
            batch = self.batches.batch(self.step, rows)
            sync = (m == self.accum - 1) or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()
            with ctx:
                loss, metrics = self._micro_step(batch)
            losses.append(loss)
            for k, v in metrics.items():  # the step's other scalars (e.g. aux_loss), logged as their mean
                if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                    extras.setdefault(k, []).append(v.float())
            tokens += int(batch["input_ids"].numel())
        if self.extra_modules is not None and self.dist.enabled:  # DDP syncs only the wrapped model
            for p in self.extra_modules.parameters():
                if p.grad is not None:
                    p.grad.copy_(all_reduce_mean(p.grad, self.dist))
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = all_reduce_mean(torch.stack(losses).float().mean(), self.dist)
        tokens *= self.dist.world_size
        self.tokens_seen += tokens
        self.step += 1
        return {**{k: torch.stack(v).mean().item() for k, v in extras.items()},
                "step": self.step, "loss": loss.item(), "lr": lr, "tokens": tokens,
                "grad_norm": None if grad_norm is None else float(grad_norm)}

    def _announce_deferred_stop(self, signum: int) -> None:
        if not self.quiet:
            console.print(f"[yellow]{signal.Signals(signum).name}: stopping after the current step and saving; "
                          "send it again to stop at once without saving this step[/]")

    def _run_eval(self) -> dict | None:
        record = None
        if self.evaluate is not None and self.dist.is_main:
            t0 = time.perf_counter()
            metrics = self.evaluate(self.model)
            record = {"step": self.step, **{f"val_{k}": v for k, v in metrics.items()},
                      "eval_seconds": time.perf_counter() - t0}
            self.evals.append(record)
            self._log(record)
            if not self.quiet:
                console.print(f"step {self.step}: val loss {metrics['loss']:.4f}  "
                              f"bits/byte {metrics['bits_per_byte']:.4f}  acc {metrics['accuracy']:.3f}")
        barrier(self.dist)
        return record

    def _calibrate_budget(self, elapsed: float, t_step: float) -> None:
        """With a time budget, set the total number of steps from the measured step time. Called early
        (while still warming up), so changing the total leaves the learning-rate schedule intact."""
        remaining = self.cfg.time_budget_s - elapsed
        self.total_steps = max(self.step + 1, self.step + int(remaining / max(t_step, 1e-6)))
        if not self.quiet:
            console.print(f"time budget {self.cfg.time_budget_s:.0f}s at {t_step:.2f}s/step: "
                          f"training for {self.total_steps} steps")

    def _shrink_to_budget(self, elapsed: float, recent: list[float]) -> bool:
        """Every RECENT_STEPS steps, cut the total if the recent step time (median of the last RECENT_STEPS)
        would take the run more than 2% past the time budget. Returns whether it changed."""
        total = self.total_steps
        if len(recent) < RECENT_STEPS or self.step % RECENT_STEPS:
            return False
        t_step = sorted(recent)[len(recent) // 2]
        if elapsed + (total - self.step) * t_step <= 1.02 * self.cfg.time_budget_s:
            return False
        self.total_steps = max(self.step + 1, self.step + int((self.cfg.time_budget_s - elapsed) / t_step))
        if not self.quiet:
            console.print(f"time budget {self.cfg.time_budget_s:.0f}s: steps now take {t_step:.2f}s, "
                          f"training for {self.total_steps} steps instead of {total}")
        return self.total_steps != total

    def fit(self, *, resume: bool = False) -> TrainResult:
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.try_resume()
        if not resumed and self.dist.is_main and self._log_path().exists():
            self._log_path().unlink()
        self.model.train()
        t_start, done_tokens_at_start = time.perf_counter(), self.tokens_seen
        # Time budget: measure steps after the first (which pays for warm-up and compilation), re-measure
        # once more, then only shrink: every RECENT_STEPS steps, if the recent step time says the run would
        # end more than 2% past the budget (the machine slowed down), the total is cut to fit. Never grown:
        # the learning-rate schedule then only moves forward.
        probes = {3, 3 + max(5, self.cfg.warmup_steps // 2)} if (self.cfg.time_budget_s and not resumed) else set()
        budgeted = bool(self.cfg.time_budget_s) and not resumed
        recent: list[float] = []
        t_first = None
        last = None
        progress = _Progress(self.total_steps, self.step, quiet=self.quiet)
        interrupts = StepBoundaryInterrupts(on_deferred=self._announce_deferred_stop)
        try:
            with progress, interrupts:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    with interrupts.step():
                        last = self._train_step()
                    dt = time.perf_counter() - t0
                    if t_first is None:
                        t_first = time.perf_counter()
                    if self.step in probes:
                        now = time.perf_counter()
                        self._calibrate_budget(now - t_start, (now - t_first) / (self.step - 1))
                        progress.set_total(self.total_steps)
                        probes.discard(self.step)
                    elif budgeted and not probes:
                        recent = (recent + [dt])[-RECENT_STEPS:]
                        if self._shrink_to_budget(time.perf_counter() - t_start, recent):
                            progress.set_total(self.total_steps)
                    elapsed = time.perf_counter() - t_start
                    last.update(tok_per_s=last["tokens"] / dt, elapsed=elapsed)
                    self.history.append(last)
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        self._log(last)
                    progress.update(self.step, last, (self.tokens_seen - done_tokens_at_start) / elapsed)
                    signum = interrupts.stop_requested(self.dist, self.device)
                    if signum is not None:
                        raise TrainingInterrupted(signum, self.step)
                    if not math.isfinite(last["loss"]):
                        raise FloatingPointError(f"loss became {last['loss']} at step {self.step}; "
                                                 "lower --lr or use --precision fp32")
                    if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                        self._run_eval()
                    if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                        self.save_state()
                    if self.on_step_end is not None:
                        self.on_step_end(self.step, last)
        except KeyboardInterrupt:
            if interrupts.torn:  # stopped inside a step: weights and counters may disagree, keep the last save
                if not self.quiet:
                    console.print(f"[yellow]interrupted inside step {self.step + 1}; not saving it "
                                  f"(the last saved state in {self.out} is kept)[/]")
                raise
            if self.step > 0:
                if not self.quiet:
                    console.print(f"[yellow]interrupted at step {self.step}; saving resumable state[/]")
                self.save_state()
            raise
        self._run_eval()
        self.save_state()
        seconds = time.perf_counter() - t_start
        return TrainResult(steps=self.step, tokens=self.tokens_seen, seconds=seconds,
                           final_loss=last["loss"] if last else float("nan"), history=self.history,
                           evals=self.evals)


class _Progress:
    """A rich progress bar on a terminal; plain periodic lines otherwise (CI logs)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.quiet, self.total, self.last_print = quiet, total, 0.0
        self.bar = None
        if not quiet and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar:
            self.bar.update(self.task, total=total)

    def update(self, step: int, rec: dict, tok_s: float) -> None:
        info = f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {tok_s:,.0f} tok/s"
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)
        elif not self.quiet and (time.perf_counter() - self.last_print > 10 or step == self.total):
            self.last_print = time.perf_counter()
            console.print(f"step {step}/{self.total}  {info}")
