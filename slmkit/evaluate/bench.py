"""Speed, memory and size of a checkpoint on this machine: what `slm bench` prints.

Timed with the model's own KV cache, greedy, on a fixed synthetic prompt (the token ids do not change the
arithmetic), so every candidate is measured the same way:

- prefill tokens/s: one forward over a `prompt_len` prompt, batch 1 and batch 8;
- decode tokens/s: `new_tokens` single-token steps after the prefill, each timed; the step time is the median
  step (an interrupted step does not count), tokens/s is batch / step time (batch 1 and 8), and milliseconds
  per decode step at batch 1;
- time to first token: prefill plus the first sample at batch 1;
- peak resident memory: the process's high-water mark (`ru_maxrss`) after loading and running, which is
  only meaningful when the checkpoint is measured in a fresh process — `bench_in_subprocess` does that;
- bytes on disk, parameters (total, active per token for mixtures of experts, nonzero).

Every timing is the median of `repeats` runs after a warm-up, and the result describes the machine
(CPU model, cores, threads, torch version), because figures from different machines do not compare.
`bench_side_by_side` times several models in rotating rounds in one process, so that their *ratios* hold on
a machine whose speed drifts (a 2-vCPU virtual machine measured the same checkpoint at 376 and 762 tok/s in
back-to-back runs); `slm select` uses it for every candidate and reference.

A `progress` callback is called with 1 after each run, warm-ups included and outside the timed part
(`bench_runs` calls in all); the `*_in_subprocess` functions relay the child's calls as they happen.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..compress.fuse import fuse_projections
from ..compress.qlinear import prompt_prefill


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 5
    threads: int | None = None  # None: torch's default
    dtype: str = "fp32"  # fp32 | bf16 (autocast)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1 or not self.batch_sizes:
            raise ValueError("prompt_len, new_tokens and repeats must be >= 1 and batch_sizes non-empty")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, not {self.dtype!r}")


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


def peak_rss_bytes() -> int:
    """This process's resident high-water mark. On Linux it is VmHWM of /proc/self/status, which belongs to
    the current address space: `ru_maxrss` would also count the parent's memory when the process was started
    with vfork + exec (as Python's subprocess does), reporting the parent's size for a small child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


class _Run:
    """One timed generation: a prefill over the fixed prompt, then single-token greedy steps, each timed."""

    def __init__(self, model, batch: int, cfg: BenchConfig, amp):
        self.model, self.amp = model, amp
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        self.prompt = (torch.arange(batch * cfg.prompt_len, device=device) * 7919 % vocab).view(batch, cfg.prompt_len)
        self.cache = model.new_cache(batch, cfg.prompt_len + cfg.new_tokens + 1,
                                     dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[float] = []
        self.nxt = None

    @torch.inference_mode()
    def prefill(self) -> tuple[float, float]:
        """(prefill seconds, time to first token). The prompt is prefilled as `generate` and `slm serve` prefill
        it (`qlinear.prompt_prefill`: quantized layers in bf16 on CPUs with native bf16)."""
        with self.amp(), prompt_prefill():
            t0 = time.perf_counter()
            logits = self.model(self.prompt, cache=self.cache, last_only=True)
            self.sync()
            t_prefill = time.perf_counter() - t0
            self.nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            _ = self.nxt.tolist()  # the first token exists on the host: time to first token
        return t_prefill, time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, n: int) -> None:
        with self.amp():
            for _ in range(n):
                t1 = time.perf_counter()
                logits = self.model(self.nxt, cache=self.cache, last_only=True)
                self.nxt = logits[:, -1].argmax(-1, keepdim=True)
                self.sync()
                self.steps.append(time.perf_counter() - t1)


def _time_once(model, batch: int, cfg: BenchConfig, amp) -> tuple[float, float, float]:
    """(prefill seconds, time to first token, median seconds of one decode step)."""
    run = _Run(model, batch, cfg, amp)
    t_prefill, ttft = run.prefill()
    run.decode(cfg.new_tokens)
    return t_prefill, ttft, statistics.median(run.steps)


def _amp(cfg: BenchConfig, device: torch.device):
    import contextlib

    return ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bf16"
            else contextlib.nullcontext)


def _check_context(model, cfg: BenchConfig) -> None:
    limit = model.config.max_position_embeddings
    if cfg.prompt_len + cfg.new_tokens + 1 > limit:
        raise ValueError(f"prompt_len {cfg.prompt_len} + new_tokens {cfg.new_tokens} exceeds the model's "
                         f"context of {limit}; lower --prompt-len or --new-tokens")


def _summarise(runs: list[tuple[float, float, float]], batch: int, cfg: BenchConfig) -> dict:
    prefill = statistics.median(r[0] for r in runs)
    step = statistics.median(r[2] for r in runs)
    out = {f"prefill_tok_s_b{batch}": batch * cfg.prompt_len / prefill, f"decode_tok_s_b{batch}": batch / step}
    if batch == 1:
        out["ttft_ms"] = 1000 * statistics.median(r[1] for r in runs)
        out["decode_ms_per_token"] = 1000 * step
    return out


def bench_runs(cfg: BenchConfig, models: int = 1) -> int:
    """Runs `bench_model` (models=1) or `bench_side_by_side` makes: per batch size, a warm-up per model and
    `repeats` timed rounds (the units of their `progress` calls)."""
    return len(cfg.batch_sizes) * (models + cfg.repeats)


def _no_progress(n: int) -> None:
    pass


def bench_model(model, cfg: BenchConfig = BenchConfig(), progress: Callable[[int], None] | None = None) -> dict:
    """Timings of an already loaded model (see the module docstring)."""
    progress = progress or _no_progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_context(model, cfg)
    amp = _amp(cfg, next(model.parameters()).device)
    model.eval()
    fuse_projections(model)  # as generate and the server run it
    out: dict = {}
    for b in cfg.batch_sizes:
        _time_once(model, b, cfg, amp)  # warm-up: allocator, kernels, caches, the kernel choice
        progress(1)
        runs = []
        for _ in range(cfg.repeats):
            runs.append(_time_once(model, b, cfg, amp))
            progress(1)
        out.update(_summarise(runs, b, cfg))
    return out


SIDE_BY_SIDE_CHUNK = 8  # decode steps a model runs before the next model takes over


def bench_side_by_side(models: dict[str, torch.nn.Module], cfg: BenchConfig = BenchConfig(),
                       progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Timings of several loaded models, interleaved so that they share the machine's slow and fast phases
    and their *ratios* hold on a machine whose speed drifts. Each of `cfg.repeats` rounds prefills every
    model (in an order that rotates from round to round), then decodes them in turns of SIDE_BY_SIDE_CHUNK
    steps until each has made `new_tokens` steps. A model's decode step time is the median of all its steps
    (the first step of a turn, slowed by the other models' weights in the caches, does not decide it);
    prefill and time to first token are medians over rounds."""
    progress = progress or _no_progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = list(models)
    for m in models.values():
        _check_context(m, cfg)
        m.eval()
        fuse_projections(m)
    amps = {n: _amp(cfg, next(models[n].parameters()).device) for n in names}
    out: dict[str, dict] = {n: {} for n in names}
    for b in cfg.batch_sizes:
        for n in names:
            _time_once(models[n], b, cfg, amps[n])  # warm-up
            progress(1)
        prefills: dict[str, list] = {n: [] for n in names}
        steps: dict[str, list] = {n: [] for n in names}
        for r in range(cfg.repeats):
            order = [names[(i + r) % len(names)] for i in range(len(names))]
            runs = {n: _Run(models[n], b, cfg, amps[n]) for n in order}
            for n in order:
                prefills[n].append(runs[n].prefill())
            for start in range(0, cfg.new_tokens, SIDE_BY_SIDE_CHUNK):
                for n in order:
                    runs[n].decode(min(SIDE_BY_SIDE_CHUNK, cfg.new_tokens - start))
            for n in order:
                steps[n].extend(runs[n].steps)
            progress(1)
        for n in names:
            out[n].update(_summarise([(p, t, statistics.median(steps[n])) for p, t in prefills[n]], b, cfg))
    return out


def bench_checkpoint(path: str | Path, cfg: BenchConfig = BenchConfig(),
                     progress: Callable[[int], None] | None = None) -> dict:
    """Load `path` and measure it in this process (peak memory is this process's high-water mark)."""
    from ..checkpoint import load_checkpoint
    from ..compress.base import count_parameters

    path = Path(path)
    ck = load_checkpoint(path)
    total, nonzero = count_parameters(ck.model)
    result = {"checkpoint": str(path), "parameters": total, "nonzero_parameters": nonzero,
              "active_parameters": total,
              "bytes_on_disk": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
              "config": asdict(cfg), "machine": machine_description()}
    if ck.config.num_local_experts:
        from ..model.moe import active_parameters

        result["active_parameters"] = active_parameters(ck.model)
    result.update(bench_model(ck.model, cfg, progress))
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def bench_in_subprocess(path: str | Path, cfg: BenchConfig = BenchConfig(), *, timeout: float = 1800,
                        progress: Callable[[int], None] | None = None) -> dict:
    """`bench_checkpoint` in a fresh Python process, so the peak memory is this checkpoint's alone."""
    return _run_child([str(path)], cfg, timeout, progress)


def side_by_side_in_subprocess(paths: dict[str, str | Path], cfg: BenchConfig = BenchConfig(), *,
                               timeout: float = 3600, progress: Callable[[int], None] | None = None
                               ) -> dict[str, dict]:
    """`bench_side_by_side` of the checkpoints `paths` (name -> directory), all loaded in one fresh process."""
    return _run_child(["--side-by-side", json.dumps({n: str(p) for n, p in paths.items()})], cfg, timeout, progress)


_PROGRESS_LINE = "slmkit-bench-progress "  # how the child reports a finished run on its stderr


def _run_child(args: list[str], cfg: BenchConfig, timeout: float, progress: Callable[[int], None] | None):
    cmd = [sys.executable, "-m", "slmkit.evaluate.bench", *args, "--config", json.dumps(asdict(cfg))]
    if progress is not None:
        cmd.append("--progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []
    stderr: list[str] = []

    def relay_stderr() -> None:
        for line in proc.stderr:
            if progress is not None and line.startswith(_PROGRESS_LINE):
                progress(int(line[len(_PROGRESS_LINE):]))
            else:
                stderr.append(line)

    # Both pipes are drained by threads while this one waits, so neither can fill up and stall the child.
    readers = [threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True),
               threading.Thread(target=relay_stderr, daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except BaseException:  # a timeout or an interrupt: the child does not outlive the wait
        proc.kill()
        proc.wait()
        raise
    finally:
        for t in readers:
            t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {' '.join(args)} failed:\n{''.join(stderr).strip()[-2000:]}")
    return json.loads("".join(stdout).strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Benchmark checkpoints and print JSON (used by the *_in_subprocess "
                                            "functions).")
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--side-by-side", help="JSON object name -> checkpoint: time them in rounds in this process")
    p.add_argument("--config", default="{}")
    p.add_argument("--progress", action="store_true", help="report each finished run on stderr")
    a = p.parse_args(argv)
    raw = json.loads(a.config)
    if "batch_sizes" in raw:
        raw["batch_sizes"] = tuple(raw["batch_sizes"])
    cfg = BenchConfig(**raw)
    progress = (lambda n: print(f"{_PROGRESS_LINE}{n}", file=sys.stderr, flush=True)) if a.progress else None
    if a.side_by_side:
        from ..checkpoint import load_checkpoint

        models = {n: load_checkpoint(p).model for n, p in json.loads(a.side_by_side).items()}
        print(json.dumps(bench_side_by_side(models, cfg, progress)))
    else:
        print(json.dumps(bench_checkpoint(a.ckpt, cfg, progress)))


if __name__ == "__main__":
    _main(sys.argv[1:])
