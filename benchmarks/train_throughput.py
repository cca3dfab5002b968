"""Training throughput: `slm train`'s step vs plain eager PyTorch loops (fp32 and bf16 autocast), one run.

All three train the same model (same initial weights) on the same synthetic token stream in this process:

- eager fp32: the textbook loop (fp32 forward, cross-entropy, backward, clipping, default AdamW);
- eager bf16 autocast: the same loop with forward and loss under `torch.autocast(dtype=torch.bfloat16)`,
  what a user would try first to go faster;
- slmkit: the real `Trainer` step (fused AdamW, autocast per `--precision`, optional `torch.compile`).

Timing interleaves the loops: after a warm-up of each, every round runs `--steps` timed steps of each
loop in turn (the order rotating per round), so a slow phase of a shared machine falls on all of them
alike; the table shows the median step over all rounds and the ratio of slmkit's tokens/s to each baseline.
Model FLOPs utilisation is reported against fp32 and bf16 matmul throughput measured in the same run.
On CPUs without native bf16 (AVX2 only) torch emulates bf16 matmuls and the autocast loop is many
times slower; `--no-bf16` leaves it out.

    python benchmarks/train_throughput.py --preset small --seq-len 256 --batch-size 8
    python benchmarks/train_throughput.py --preset tiny --threads 2 --rounds 3 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.model import CausalLM, resolve_model_config
from slmkit.train import LMBatches, Trainer, TrainConfig, lm_step
from slmkit.train.loop import autocast_dtype, cpu_has_fast_bf16


class SyntheticStream:
    def __init__(self, n: int, vocab: int):
        self.tokens = np.random.default_rng(0).integers(0, vocab, size=n)

    def __len__(self):
        return len(self.tokens)

    def window(self, start, length):
        return self.tokens[start:start + length]


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 7, device=torch.device("cpu")) -> float:
    """Peak matmul GFLOP/s: the fastest of `repeats` n x n products (a peak, so the best, not the median)."""
    if device.type == "cuda":
        n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def flops_per_token(model: CausalLM, seq_len: int) -> float:
    c = model.config
    n = model.num_parameters() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    # 6N for the matmuls of forward+backward (lm_head included), plus attention scores and values.
    return 6 * n + 12 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim


def eager_step_fn(config, batches, device, amp: torch.dtype | None):
    """One step of the plain loop on its own model (seeded like the others) and optimizer."""
    torch.manual_seed(0)
    model = CausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    step_index = [0]

    def step():
        b = {k: v.to(device) for k, v in batches.batch(step_index[0], slice(None)).items()}
        step_index[0] += 1
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            logits = model(b["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the Trainer reads its loss every step too
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def interleaved_step_times(steps: dict, warmup: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds of every timed step of each loop; the loops take turns, order rotating by round."""
    for name, step in steps.items():
        for _ in range(warmup[name]):
            step()
    names, times = list(steps), {name: [] for name in steps}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(per_round):
                t = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of interleaved timing")
    ap.add_argument("--steps", type=int, default=2, help="timed steps of each loop per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="slmkit's --precision (auto | bf16 | fp32)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="include the eager bf16-autocast loop")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (all loops run there)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config = resolve_model_config(args.preset, vocab_size=args.vocab)
    stream = SyntheticStream(2_000_000, args.vocab)
    batches = LMBatches(stream, args.seq_len, args.batch_size, seed=0)
    tokens = args.batch_size * args.seq_len

    cfg = TrainConfig(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                      compile=args.compile, eval_every=0, save_every=0, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        trainer = Trainer(CausalLM(config), lm_step, batches, cfg, tmp, quiet=True)
        trainer.model.train()
        amp = autocast_dtype(cfg, trainer.device)

        def slm_step():
            trainer._train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        slm_name = f"slmkit Trainer ({'bf16' if amp else 'fp32'}{', compiled' if args.compile else ''})"
        steps = {"eager fp32": eager_step_fn(config, batches, device, None)}
        if args.bf16:
            steps["eager bf16 autocast"] = eager_step_fn(config, batches, device, torch.bfloat16)
        steps[slm_name] = slm_step
        warmup = {name: args.warmup for name in steps}
        warmup[slm_name] += 2 if args.compile else 0  # compilation and its first recompile
        times = interleaved_step_times(steps, warmup, args.rounds, args.steps)

    fpt = flops_per_token(CausalLM(config), args.seq_len)
    peak32, peak16 = matmul_gflops(torch.float32, device=device), matmul_gflops(torch.bfloat16, device=device)
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"model {args.preset}: {CausalLM(config).num_parameters() / 1e6:.1f}M parameters, batch "
          f"{args.batch_size}x{args.seq_len}, device {device} ({cpu}), threads {torch.get_num_threads()}, "
          f"CPU native bf16: {cpu_has_fast_bf16()}")
    print(f"interleaved: {args.rounds} rounds x {args.steps} steps per loop; median step")
    print(f"matmul peak measured: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"{'loop':40s} {'s/step':>8s} {'tok/s':>9s} {'MFU fp32':>9s} {'MFU bf16':>9s} {'slmkit speed-up':>16s}")
    for name, t in median.items():
        achieved = fpt * tokens / t / 1e9
        print(f"{name:40s} {t:8.3f} {tokens / t:9.0f} {achieved / peak32:9.1%} {achieved / peak16:9.1%} "
              f"{t / median[slm_name]:15.2f}x")
    for name in list(median)[:-1]:
        print(f"speedup slmkit / {name}: {median[name] / median[slm_name]:.2f}x")
    print("target: slmkit >= 2x the eager fp32 loop where bf16 is native")


if __name__ == "__main__":
    main()
