"""Blockwise causal Linformer attention vs full causal SDPA attention, same width.

Part 1 — one attention layer (q/k/v/o projections included, RoPE, batch 1) forward+backward at each sequence
length: median wall time over `--repeats` runs, and peak memory. Each (length, variant) runs in a fresh
subprocess with one thread; peak memory is the process's resident high-water mark (VmHWM in
/proc/self/status) during the first forward+backward minus its resident size just before it — torch's CPU
allocator returns large blocks to the OS, so this is the real extra memory the step needed (inputs and
weights excluded; they are the same for both). Variants: full = `Attention` (SDPA is_causal; on CPU that is
the fused flash kernel, which never materialises T x T scores), linformer = `LinformerAttention` (blockwise,
per-block keys recomputed in backward), linformer-keep = the same keeping per-block keys (no recompute).

Part 2 — quality: two equal-size tiny models (full vs Linformer) trained for `--train-steps` steps with
`slmkit.train.pretrain` on the same slice of the default domain; validation bits per byte side by side.

    python benchmarks/linformer_vs_full.py                      # 512..4096, k=16, block=128 (~3 min)
    python benchmarks/linformer_vs_full.py --lengths 4096,8192 --skip-quality
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _layer(variant: str, T: int, args):
    import torch

    from slmkit.model import ModelConfig
    from slmkit.model.attention import Attention
    from slmkit.model.linformer import LinformerAttention
    from slmkit.model.rope import RotaryEmbedding

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.width, num_attention_heads=args.heads, num_hidden_layers=1,
                      attention_type="linformer" if variant.startswith("linformer") else "full",
                      linformer_k=args.k, linformer_block=args.block)
    layer = LinformerAttention(cfg, 0) if variant.startswith("linformer") else Attention(cfg, 0)
    layer.recompute_blocks = variant != "linformer-keep"
    rope = RotaryEmbedding(cfg)(torch.arange(T)[None], torch.float32)
    x = torch.randn(1, T, args.width, requires_grad=True)
    grad_out = torch.randn(1, T, args.width)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with _backend(variant):
            layer(x, rope, None).backward(grad_out)

    return step


def _backend(variant: str):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # "full-math": SDPA's reference kernel, which materialises the T x T scores (the paper's baseline).
    return sdpa_kernel(SDPBackend.MATH) if variant == "full-math" else nullcontext()


def measure_memory(variant: str, T: int, args) -> dict:
    """Child process: peak resident memory of one forward+backward, after a short warm-up that loads the
    kernels (their one-time buffers would otherwise be charged to whichever variant runs first)."""
    import torch

    torch.set_num_threads(1)
    _layer(variant, 2 * args.block + 5, args)()
    step = _layer(variant, T, args)
    before = _rss_kb("VmRSS")
    step()
    return {"peak_mb": (_rss_kb("VmHWM") - before) / 1024}


def measure_time(variants: list[str], T: int, args) -> dict:
    """Child process: every variant timed in turn, repetitions interleaved so load on the machine hits all
    variants alike; median after one warm-up."""
    import torch

    torch.set_num_threads(1)
    steps = {v: _layer(v, T, args) for v in variants}
    times = {v: [] for v in variants}
    for rep in range(args.repeats + 1):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:
                times[v].append(time.perf_counter() - t0)
    return {v: 1000 * statistics.median(ts) for v, ts in times.items()}


def run_child(fn: str, *fn_args, args) -> dict:
    code = (f"import argparse, json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import linformer_vs_full as b; a = argparse.Namespace(**{vars(args)!r}); "
            f"print(json.dumps(b.{fn}(*{fn_args!r}, a)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"{fn}{fn_args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_and_memory(args) -> None:
    print(f"\none attention layer (q/k/v/o, RoPE), width {args.width}, {args.heads} heads, batch 1, fp32, 1 thread; "
          f"Linformer k={args.k} per block of {args.block}\nforward+backward: median ms of {args.repeats} "
          f"(interleaved) and peak RSS growth MB (fresh process each); speedup = full time / Linformer time, "
          f"memory = Linformer MB / full MB, against fused SDPA and (vs math) SDPA's materialising kernel")
    names = {"full": "full SDPA", "linformer": "Linformer", "linformer-keep": "Lin. keep", "full-math": "full math"}
    cols = ["full", "linformer"] + (["linformer-keep"] if args.keep else []) + (["full-math"] if args.math else [])
    head = f"{'T':>5} | " + " | ".join(f"{names[v] + ' ms':>14} {'MB':>6}" for v in cols)
    head += f" | {'speedup':>7} | {'memory':>6}" + (f" | {'vs math':>7} | {'memory':>6}" if args.math else "")
    print(head + "\n" + "-" * len(head))
    for T in args.lengths:
        run = [v for v in cols if v != "full-math" or T <= args.math_max]
        ms = run_child("measure_time", run, T, args=args)
        mb = {v: run_child("measure_memory", v, T, args=args)["peak_mb"] for v in run}
        cells = " | ".join(f"{ms[v]:>14.1f} {mb[v]:>6.1f}" if v in run else f"{'-':>14} {'-':>6}" for v in cols)
        line = f"{T:>5} | {cells} | {_ratios(ms, mb, 'full')}"
        if args.math:
            no_math = f"{'-':>7} | {'-':>6}"
            line += " | " + (_ratios(ms, mb, "full-math") if "full-math" in run else no_math)
        print(line, flush=True)


def _ratios(ms: dict, mb: dict, baseline: str) -> str:
    """Speed-up (baseline time / Linformer time) and memory ratio (Linformer MB / baseline MB) cells."""
    return f"{ms[baseline] / ms['linformer']:>6.2f}x | {mb['linformer'] / max(mb[baseline], 1e-9):>6.2f}"


def quality(args) -> None:
    import torch

    from slmkit.data import build_dataset
    from slmkit.train import TrainConfig
    from slmkit.train.pretrain import pretrain

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        build_dataset([], tmp / "ds", max_bytes=2_000_000, vocab_size=4096, progress=False)
        print(f"\nquality: default domain, 2 MB, vocab 4096 (built in {time.perf_counter() - t0:.0f}s); "
              f"{args.train_steps} steps x batch {args.batch_size} x {args.seq_len} tokens, same seed and data")
        base = ("hidden_size: 128\nintermediate_size: 384\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                "num_key_value_heads: 4\n")
        k, block = args.quality_k, args.quality_block
        rows = [("full", base), (f"linformer k={k}/{block}",
                                 base + f"attention_type: linformer\nlinformer_k: {k}\nlinformer_block: {block}\n")]
        print(f"{'model':>22} | {'params':>9} | {'val bits/byte':>13} | {'train s':>7}")
        for name, spec in rows:
            (tmp / "m.yaml").write_text(spec)
            cfg = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-3,
                              warmup_steps=10, eval_every=0, save_every=0, log_every=50, precision="fp32",
                              eval_tokens=32768, seed=0, device="cpu")
            t0 = time.perf_counter()
            res = pretrain(tmp / "ds", tmp / "m.yaml", tmp / name.split()[0], cfg, quiet=True)
            secs = time.perf_counter() - t0
            from slmkit.checkpoint import load_checkpoint

            params = load_checkpoint(tmp / name.split()[0]).model.num_parameters()
            print(f"{name:>22} | {params:>9,} | {res.evals[-1]['val_bits_per_byte']:>13.3f} | {secs:>7.0f}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(t) for t in s.split(",")], default=[512, 1024, 2048, 4096])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=16, help="Linformer summary rows per block")
    p.add_argument("--block", type=int, default=128, help="Linformer block size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="also Linformer keeping per-block keys for backward")
    p.add_argument("--math", action=argparse.BooleanOptionalAction, default=True,
                   help="also full attention with SDPA's math kernel (materialised T x T scores)")
    p.add_argument("--math-max", type=int, default=1024, help="longest T for the math kernel (memory)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--quality-k", type=int, default=8)
    p.add_argument("--quality-block", type=int, default=64)
    args = p.parse_args()
    t0 = time.perf_counter()
    speed_and_memory(args)
    if not args.skip_quality:
        quality(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
