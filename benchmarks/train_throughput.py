"""Training throughput: `slm train`'s step vs a plain eager fp32 PyTorch loop, same model and batch.

Both run in this process on the same synthetic token stream. The slmkit side is the real `Trainer` step
(fused AdamW, autocast per `--precision`, optional `torch.compile`); the baseline is the textbook loop
(eager fp32 forward, cross-entropy, backward, default AdamW). Model FLOPs utilisation is reported against
fp32 and bf16 matmul throughput measured in the same run.

    python benchmarks/train_throughput.py --preset small --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
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


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device=torch.device("cpu")) -> float:
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
    return 2 * n ** 3 / statistics.median(times) / 1e9


def flops_per_token(model: CausalLM, seq_len: int) -> float:
    c = model.config
    n = model.num_parameters() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    # 6N for the matmuls of forward+backward (lm_head included), plus attention scores and values.
    return 6 * n + 12 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def baseline_step_fn(model, batches, step_counter, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step():
        b = {k: v.to(device) for k, v in batches.batch(step_counter[0], slice(None)).items()}
        step_counter[0] += 1
        logits = model(b["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both loops run there)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = resolve_model_config(args.preset, vocab_size=args.vocab)
    stream = SyntheticStream(2_000_000, args.vocab)
    batches = LMBatches(stream, args.seq_len, args.batch_size, seed=0)
    tokens = args.batch_size * args.seq_len

    base_model = CausalLM(config).to(device)
    counter = [0]
    t_base = time_steps(baseline_step_fn(base_model, batches, counter, device), args.warmup, args.steps)
    del base_model

    torch.manual_seed(0)
    cfg = TrainConfig(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                      compile=args.compile, eval_every=0, save_every=0, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(CausalLM(config), lm_step, batches, cfg, tmp, quiet=True)
        trainer.model.train()
        def slm_step():
            trainer._train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        t_slm = time_steps(slm_step, args.warmup + (2 if args.compile else 0), args.steps)
        amp = autocast_dtype(cfg, trainer.device)

    fpt = flops_per_token(CausalLM(config), args.seq_len)
    peak32, peak16 = matmul_gflops(torch.float32, device=device), matmul_gflops(torch.bfloat16, device=device)
    rows = [("plain eager fp32 loop", t_base), (f"slmkit Trainer ({'bf16' if amp else 'fp32'}"
                                                f"{', compiled' if args.compile else ''})", t_slm)]
    print(f"model {args.preset}: {CausalLM(config).num_parameters() / 1e6:.1f}M parameters, batch "
          f"{args.batch_size}x{args.seq_len}, device {device}, threads {torch.get_num_threads()}, "
          f"CPU native bf16: {cpu_has_fast_bf16()}")
    print(f"matmul peak measured: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"{'loop':40s} {'s/step':>8s} {'tok/s':>9s} {'MFU fp32':>9s} {'MFU bf16':>9s}")
    for name, t in rows:
        achieved = fpt * tokens / t / 1e9
        print(f"{name:40s} {t:8.3f} {tokens / t:9.0f} {achieved / peak32:9.1%} {achieved / peak16:9.1%}")
    print(f"speedup: {t_base / t_slm:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
