"""Speed, memory and size of a checkpoint on this machine: what `slm bench` prints.

Timed with the model's own KV cache, greedy, on a fixed synthetic prompt (the token ids do not change the
arithmetic), so every candidate is measured the same way:

- prefill tokens/s: one forward over a `prompt_len` prompt, batch 1 and batch 8;
- decode tokens/s: `new_tokens` single-token steps after the prefill, batch 1 and batch 8 (tokens across
  the batch per second), and milliseconds per decode step at batch 1;
- time to first token: prefill plus the first sample at batch 1;
- peak resident memory: the process's high-water mark (`ru_maxrss`) after loading and running, which is
  only meaningful when the checkpoint is measured in a fresh process — `bench_in_subprocess` does that;
- bytes on disk, parameters (total, active per token for mixtures of experts, nonzero).

Every timing is the median of `repeats` runs after a warm-up, and the result describes the machine
(CPU model, cores, threads, torch version), because figures from different machines do not compare.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


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
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@torch.inference_mode()
def _time_once(model, batch: int, cfg: BenchConfig, amp) -> tuple[float, float, float]:
    """(prefill seconds, time to first token, decode seconds for new_tokens steps)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompt = (torch.arange(batch * cfg.prompt_len, device=device) * 7919 % vocab).view(batch, cfg.prompt_len)
    cache = model.new_cache(batch, cfg.prompt_len + cfg.new_tokens + 1,
                            dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)
    with amp():
        t0 = time.perf_counter()
        logits = model(prompt, cache=cache, last_only=True)
        t_prefill = time.perf_counter() - t0
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        _ = nxt.tolist()  # the first token exists on the host: time to first token
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(cfg.new_tokens):
            logits = model(nxt, cache=cache, last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        _ = nxt.tolist()
        t_decode = time.perf_counter() - t1
    return t_prefill, ttft, t_decode


def bench_model(model, cfg: BenchConfig = BenchConfig()) -> dict:
    """Timings of an already loaded model (see the module docstring)."""
    import contextlib

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    if cfg.prompt_len + cfg.new_tokens + 1 > limit:
        raise ValueError(f"prompt_len {cfg.prompt_len} + new_tokens {cfg.new_tokens} exceeds the model's "
                         f"context of {limit}; lower --prompt-len or --new-tokens")
    amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bf16"
           else contextlib.nullcontext)
    model.eval()
    out: dict = {}
    for b in cfg.batch_sizes:
        _time_once(model, b, cfg, amp)  # warm-up: allocator, kernels, caches
        runs = [_time_once(model, b, cfg, amp) for _ in range(cfg.repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[2] for r in runs)
        out[f"prefill_tok_s_b{b}"] = b * cfg.prompt_len / prefill
        out[f"decode_tok_s_b{b}"] = b * cfg.new_tokens / decode
        if b == 1:
            out["ttft_ms"] = 1000 * statistics.median(r[1] for r in runs)
            out["decode_ms_per_token"] = 1000 * decode / cfg.new_tokens
    return out


def bench_checkpoint(path: str | Path, cfg: BenchConfig = BenchConfig()) -> dict:
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
    result.update(bench_model(ck.model, cfg))
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def bench_in_subprocess(path: str | Path, cfg: BenchConfig = BenchConfig(), *, timeout: float = 1800) -> dict:
    """`bench_checkpoint` in a fresh Python process, so the peak memory is this checkpoint's alone."""
    cmd = [sys.executable, "-m", "slmkit.evaluate.bench", str(path), "--config", json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {path} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Benchmark one checkpoint and print JSON (used by bench_in_subprocess).")
    p.add_argument("ckpt")
    p.add_argument("--config", default="{}")
    a = p.parse_args(argv)
    raw = json.loads(a.config)
    if "batch_sizes" in raw:
        raw["batch_sizes"] = tuple(raw["batch_sizes"])
    print(json.dumps(bench_checkpoint(a.ckpt, BenchConfig(**raw))))


if __name__ == "__main__":
    _main(sys.argv[1:])
