"""Peak memory and step time of the plain losses (full (B, T, V) logits) against the chunked, head-fused losses
of slmkit/train/chunked_losses.py, on a SmolLM2-shaped student (vocabulary 49,152, hidden 576, tied
embeddings) at 8 x 256 tokens, all arms in one run.

Arms: the LM step (`lm_step`), the KD step against an online teacher (SmolLM2-shaped, more layers) and the KD
step from a teacher top-k cache (`KDStep`), each plain (`SLMKIT_CHUNKED_LOSS=0`) and chunked. One training
micro-step = forward + loss + backward (no optimizer: it is the same in every arm).

- Memory: each arm runs in a fresh subprocess: setup, one warm-up step, grads dropped, `malloc_trim`, then the
  kernel's peak-RSS mark is reset (`/proc/self/clear_refs`, Linux) and one step runs; the figure is the peak
  RSS of that step above the RSS before it (torch's CPU allocator keeps no statistics; tracemalloc does not
  see torch's allocations). Without clear_refs it falls back to the first step's ru_maxrss growth.
- Time: all arms live in this process and run interleaved, round after round; medians are reported.

Targets (issue 20): peak memory of a KD step at 8 x 256 <= 1/3 of the plain one; a KD-from-cache step <= 1.3x
a plain LM step.

    python benchmarks/chunked_loss_memory.py [--layers 2 --teacher-layers 4 --rounds 5 --bf16]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from slmkit.distill import KDConfig, KDStep
from slmkit.distill.teacher_cache import teacher_topk
from slmkit.model import CausalLM, ModelConfig
from slmkit.train.chunked_losses import ENV_ENABLE
from slmkit.train.steps import lm_step

ARMS = ["lm plain", "lm chunked", "kd online plain", "kd online chunked", "kd cache plain", "kd cache chunked"]


def smollm2_config(layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=2048, rope_theta=100000.0)


class Setup:
    """Student, teacher and one batch for every arm (built once per process, same seed everywhere)."""

    def __init__(self, args, kinds: set[str]):
        torch.manual_seed(0)
        self.student = CausalLM(smollm2_config(args.layers)).train()
        B, T, V = args.batch, args.seq_len, 49152
        ids = torch.randint(0, V, (B, T + 1))
        self.batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
        self.teacher = None
        if "online" in kinds or "cache" in kinds:
            self.teacher = CausalLM(smollm2_config(args.teacher_layers)).eval()
        kd = KDConfig(loss=args.loss, temperature=args.temperature, alpha=0.5)
        self.steps = {"lm": lm_step}
        if "online" in kinds:
            self.steps["online"] = KDStep(kd, self.teacher, student_config=self.student.config)
        if "cache" in kinds:
            # The teacher's top-k, a row of positions at a time so no full (B, T, V) tensor is made here.
            parts = []
            with torch.no_grad():
                hidden = self.teacher(self.batch["input_ids"], return_final_hidden=True)  # (B, T, d)
                for b in range(B):
                    parts.append(teacher_topk(self.teacher.lm_head(hidden[b:b + 1]), args.k, args.temperature))
            top_ids, top_lp, tail = (torch.cat(p) for p in zip(*parts))
            self.cache_batch = {**self.batch, "teacher_topk_ids": top_ids.to(torch.int32),
                                "teacher_topk_logprobs": top_lp.half(), "teacher_tail_logprob": tail}
            self.steps["cache"] = KDStep(kd, None, student_config=self.student.config)
            if "online" not in kinds:
                self.teacher = None  # the cache arm does not hold a teacher
        self.amp = args.bf16

    def step(self, arm: str) -> None:
        kind = arm.split()[1] if arm.startswith("kd") else "lm"
        os.environ[ENV_ENABLE] = "1" if arm.endswith("chunked") else "0"
        batch = self.cache_batch if kind == "cache" else self.batch
        self.student.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp)
        with ctx:
            loss, _ = self.steps[kind](self.student, batch)
        loss.backward()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(args) -> dict:
    """In this (fresh) process: the peak RSS growth of one step of `args.arm`, in MiB."""
    arm = args.arm
    kind = arm.split()[1] if arm.startswith("kd") else "lm"
    setup = Setup(args, {kind})
    setup.step(arm)  # warm-up: lazy allocations, thread pools
    setup.student.zero_grad(set_to_none=True)
    _trim()
    method = "clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        method = "ru_maxrss"
    before = _status_kib("VmRSS") if method == "clear_refs" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    setup.step(arm)
    peak = _status_kib("VmHWM") if method == "clear_refs" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"arm": arm, "step_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024, "method": method}


def memory_arm(args, arm: str) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--layers", str(args.layers), "--teacher-layers",
           str(args.teacher_layers), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--k", str(args.k),
           "--loss", args.loss, "--temperature", str(args.temperature)] + (["--bf16"] if args.bf16 else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="student decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=16, help="top-k of the teacher cache")
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (every arm once per round)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in every arm")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true", help="memory arms only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.arm = args.child
        print(json.dumps(measure_memory(args)))
        return

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; student SmolLM2-shaped ({args.layers} layers, V=49152, d=576, tied), teacher "
          f"{args.teacher_layers} layers; {args.batch} x {args.seq_len} tokens; {args.loss}, T={args.temperature}, "
          f"k={args.k}; {'bf16 autocast' if args.bf16 else 'fp32'}. Shared machine: medians, same run.")
    memory = {}
    if not args.skip_memory:
        for arm in ARMS:
            memory[arm] = memory_arm(args, arm)
            print(f"  memory {arm:18s} step peak {memory[arm]['step_peak_mib']:8.0f} MiB "
                  f"(process {memory[arm]['process_peak_mib']:.0f} MiB, {memory[arm]['method']})", flush=True)

    if args.skip_time:
        for kind in ("lm", "kd online", "kd cache"):
            r = memory[kind + " chunked"]["step_peak_mib"] / memory[kind + " plain"]["step_peak_mib"]
            print(f"{kind:10s} chunked/plain step peak memory {r:.2f}x")
        return
    setup = Setup(args, {"online", "cache"})
    for arm in ARMS:  # warm-up
        setup.step(arm)
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else reversed(ARMS):
            t0 = time.perf_counter()
            setup.step(arm)
            times[arm].append(time.perf_counter() - t0)
    med = {arm: statistics.median(v) for arm, v in times.items()}

    print(f"\n{'arm':20s} {'step peak MiB':>14s} {'step s (median)':>16s}")
    for arm in ARMS:
        mem = f"{memory[arm]['step_peak_mib']:.0f}" if arm in memory else "-"
        print(f"{arm:20s} {mem:>14s} {med[arm]:16.3f}")
    print()
    for kind in ("lm", "kd online", "kd cache"):
        line = f"{kind:10s} chunked/plain: time {med[kind + ' chunked'] / med[kind + ' plain']:.2f}x"
        if memory:
            mem = memory[kind + " chunked"]["step_peak_mib"] / memory[kind + " plain"]["step_peak_mib"]
            line += f", step peak memory {mem:.2f}x"
        print(line)
    print(f"kd cache chunked / lm plain step time: {med['kd cache chunked'] / med['lm plain']:.2f}x (target <= 1.3x)")
    print(f"kd cache plain   / lm plain step time: {med['kd cache plain'] / med['lm plain']:.2f}x")
    print(f"kd cache chunked / lm chunked step time: {med['kd cache chunked'] / med['lm chunked']:.2f}x")
    if memory:
        r = memory["kd online chunked"]["step_peak_mib"] / memory["kd online plain"]["step_peak_mib"]
        print(f"kd online step peak memory chunked/plain: {r:.2f} (target <= 0.33)")


if __name__ == "__main__":
    main()
