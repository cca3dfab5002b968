"""Blockwise causal Linformer attention vs full causal SDPA attention, same width.

Part 1 — one attention layer (q/k/v/o projections included, RoPE, batch 1) forward+backward at each sequence
length: median wall time over `--repeats` runs, and peak memory two ways. Each (length, variant) runs in a
fresh subprocess with one thread.
- live MB: the peak of the bytes malloc has handed out and not taken back (glibc `mallinfo2`: in-use heap +
  mmapped blocks), sampled after every aten op of one forward+backward, minus its value at the first op:
  the tensors the step holds at once, whatever the allocator caches.
- RSS MB: the process's resident high-water mark (VmHWM) during the step minus its resident size just
  before it: what the OS sees. glibc keeps freed blocks resident and reuses them, so this moves with the
  allocation pattern (flash SDPA's RSS growth ranges 48-68 MB at T = 4096 between runs).
Inputs, output gradient and weights are allocated before and excluded; they are the same for every variant.
Variants: full = `Attention` (SDPA is_causal; on CPU that is the fused flash kernel, which never materialises
T x T scores), full-math = the same with SDPA's reference kernel (materialised T x T scores: the paper's
baseline), linformer = `LinformerAttention` with its default window (training path: blocks batched into one
SDPA call, autograd keeps activations), linformer-recompute = the same with `linformer_recompute` (the block
scan: keeps x and the block summaries, recomputes each block in backward).

Part 2 — decoding: one decode step (batch 1, KV cache) of a 6-layer `small`-width model after prompts of
`--decode-lengths` tokens: Linformer keeping its block summaries with the cache (the default) against
Linformer recompressing every completed block at each step (as before summaries were kept) and full
attention; median step ms, best of two interleaved rounds.

Part 3 — quality: equal-size tiny models (full attention, and Linformer with each of `--quality-windows`)
trained for `--train-steps` steps with `slmkit.train.pretrain` on the same slice of the default domain;
validation bits per byte side by side.

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
                      linformer_k=args.k, linformer_block=args.block, linformer_window=args.window,
                      linformer_recompute=variant == "linformer-recompute")
    layer = LinformerAttention(cfg, 0) if variant.startswith("linformer") else Attention(cfg, 0)
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


def _malloc_in_use():
    """Bytes glibc's malloc has handed out and not taken back (None where mallinfo2 is unavailable)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd
    return in_use


def measure_memory(variant: str, T: int, args) -> dict:
    """Child process: peak memory of one forward+backward (module docstring), after a short warm-up that
    loads the kernels (their one-time buffers would otherwise be charged to whichever variant runs first).
    The RSS step runs first, untraced; the live-bytes step runs second, under a dispatch mode."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.set_num_threads(1)
    _layer(variant, 2 * args.block + 5, args)()
    step = _layer(variant, T, args)
    before = _rss_kb("VmRSS")
    step()
    result = {"rss_mb": (_rss_kb("VmHWM") - before) / 1024, "live_mb": float("nan")}
    in_use = _malloc_in_use()
    if in_use is None:
        return result

    class PeakInUse(TorchDispatchMode):
        first, peak = None, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            now = in_use()
            self.first = now if self.first is None else self.first
            self.peak = max(self.peak, now)
            return out

    with PeakInUse() as mode:
        step()
    result["live_mb"] = (mode.peak - mode.first) / 2**20
    return result


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
          f"Linformer k={args.k} per block of {args.block}, window {args.window}\nforward+backward: median ms of "
          f"{args.repeats} (interleaved); live MB and RSS MB as in the module docstring (fresh process each); "
          f"speed-up = baseline ms / variant ms, memory = variant MB / baseline MB")
    names = {"full": "full SDPA", "full-math": "full math", "linformer": "Linformer",
             "linformer-recompute": "Lin. recompute"}
    cols = ["full", "linformer", "linformer-recompute"] + (["full-math"] if args.math else [])
    head = (f"{'T':>5} | {'variant':<14} | {'ms':>7} | {'live MB':>7} | {'RSS MB':>6} || vs SDPA: {'speed':>6} "
            f"{'live':>5} {'RSS':>5} || vs math: {'speed':>6} {'live':>5} {'RSS':>5}")
    print(head + "\n" + "-" * len(head))
    for T in args.lengths:
        run = [v for v in cols if v != "full-math" or T <= args.math_max]
        ms = run_child("measure_time", run, T, args=args)
        mb = {v: run_child("measure_memory", v, T, args=args) for v in run}
        for v in run:
            line = f"{T:>5} | {names[v]:<14} | {ms[v]:>7.1f} | {mb[v]['live_mb']:>7.1f} | {mb[v]['rss_mb']:>6.1f} || "
            for base in ("full", "full-math"):
                if v.startswith("linformer") and base in run:
                    line += (f"{'':>9}{ms[base] / ms[v]:>5.2f}x {mb[v]['live_mb'] / mb[base]['live_mb']:>5.2f} "
                             f"{mb[v]['rss_mb'] / max(mb[base]['rss_mb'], 1e-9):>5.2f} || ")
                else:
                    line += f"{'':>9}{'-':>6} {'-':>5} {'-':>5} || "
            print(line.rstrip(" |"), flush=True)


def decoding(args) -> None:
    import torch

    from slmkit.model import CausalLM, ModelConfig
    from slmkit.model.linformer import LinformerAttention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                      attention_type="linformer", linformer_k=args.k, linformer_block=args.block,
                      linformer_window=args.window)
    models = {"Linformer": CausalLM(cfg).eval(), "full": CausalLM(cfg.replace(attention_type="full")).eval()}
    keep = LinformerAttention.summaries

    def recompress(self, k, v, n_blocks, store):  # every completed block compressed again at every step
        return keep(self, k, v, n_blocks, None)

    def step_ms(model, S: int, store: bool, steps: int = 32) -> float:
        LinformerAttention.summaries = keep if store else recompress
        try:
            with torch.no_grad():
                cache = model.new_cache(1, S + steps)
                model(torch.randint(0, 8192, (1, S)), cache=cache)
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    model(torch.tensor([[5]]), cache=cache)
                    times.append(time.perf_counter() - t0)
        finally:
            LinformerAttention.summaries = keep
        return 1000 * statistics.median(times)

    print(f"\ndecoding: one step after S prompt tokens, 6 layers x width 256, batch 1, 1 thread (median step ms, "
          f"best of 2 rounds)\n{'S':>5} | {'Linformer':>9} | {'re-compressing':>14} | {'full':>6} | "
          f"{'kept vs re-compressing':>22}")
    for S in args.decode_lengths:
        rows: dict[str, list[float]] = {}
        for _ in range(2):
            rows.setdefault("kept", []).append(step_ms(models["Linformer"], S, True))
            rows.setdefault("recompress", []).append(step_ms(models["Linformer"], S, False))
            rows.setdefault("full", []).append(step_ms(models["full"], S, True))
        best = {k: min(v) for k, v in rows.items()}
        print(f"{S:>5} | {best['kept']:>9.2f} | {best['recompress']:>14.2f} | {best['full']:>6.2f} | "
              f"{best['recompress'] / best['kept']:>21.2f}x", flush=True)


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
        lin = base + f"attention_type: linformer\nlinformer_k: {k}\nlinformer_block: {block}\n"
        rows = [("full", base)] + [(f"linformer-w{w} k={k}/{block}", lin + f"linformer_window: {w}\n")
                                   for w in args.quality_windows]
        print(f"{'model':>26} | {'params':>9} | {'val bits/byte':>13} | {'train s':>7}")
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
            print(f"{name:>26} | {params:>9,} | {res.evals[-1]['val_bits_per_byte']:>13.3f} | {secs:>7.0f}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(t) for t in s.split(",")], default=[512, 1024, 2048, 4096])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=16, help="Linformer summary rows per block")
    p.add_argument("--block", type=int, default=128, help="Linformer block size")
    p.add_argument("--window", type=lambda s: None if s == "none" else int(s), default=4,
                   help="Linformer window: blocks seen as their own summaries ('none': every block)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--math", action=argparse.BooleanOptionalAction, default=True,
                   help="also full attention with SDPA's math kernel (materialised T x T scores)")
    p.add_argument("--math-max", type=int, default=1024, help="longest T for the math kernel (memory)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--decode-lengths", type=lambda s: [int(t) for t in s.split(",") if t],
                   default=[512, 1536, 3072], help="prompt lengths for the decoding part ('' skips it)")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--quality-k", type=int, default=4)
    p.add_argument("--quality-block", type=int, default=32)
    p.add_argument("--quality-windows", type=lambda s: s.split(","), default=["null", "4", "1"],
                   help="Linformer windows to train (null: every block as its own summaries)")
    args = p.parse_args()
    t0 = time.perf_counter()
    speed_and_memory(args)
    if args.decode_lengths:
        decoding(args)
    if not args.skip_quality:
        quality(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
