"""Small layers at batch 1: the fixed cost of a packed quantized kernel against a plain fp32 matmul, one run.

A packed kernel (int8 `_weight_int8pack_mm`, int8 dynamic fbgemm, int4 `_weight_int4pack_mm_for_cpu`) has a
per-call cost that a small layer does not repay; this is why a quantized Linear times its kernel against a
dequantized dense copy on first use (`kernel_choice="auto"`). For each shape: median µs per call of `nn.Linear`
(fp32) and of `Int8Linear` (weight_only, dynamic) and `Int4Linear` forced to their packed kernels
(`kernel_choice="packed"`) and left on `"auto"`, on one row. The variants take turns inside each of
`--rounds` rounds, so a slow phase of a shared machine falls on all alike.

    python benchmarks/small_layer_kernels.py --threads 1
    python benchmarks/small_layer_kernels.py --shapes 128x128,576x576,1024x4096 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slmkit.compress.qlinear import Int4Linear, Int8Linear


def variants(in_f: int, out_f: int, group_size: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False)
    out = {"fp32": lin}
    makers = {"int8 weight_only": lambda: Int8Linear.from_linear(lin, "weight_only"),
              "int8 dynamic": lambda: Int8Linear.from_linear(lin, "dynamic"),
              f"int4 g{group_size}": lambda: Int4Linear.from_linear(lin, group_size)}
    for name, make in makers.items():
        for choice in ("packed", "auto"):
            m = make()
            m.kernel_choice = choice
            out[f"{name} {choice}"] = m
    return out


@torch.inference_mode()
def median_us(modules: dict[str, nn.Module], in_f: int, calls: int, rounds: int) -> dict[str, float]:
    x = torch.randn(1, in_f)
    for m in modules.values():  # warm-up (and the auto choice's one-time measurement)
        for _ in range(10):
            m(x)
    times = {name: [] for name in modules}
    for _ in range(rounds):
        for name, m in modules.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                m(x)
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="128x128,1024x1024", help="comma-separated IN x OUT")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (must divide IN)")
    ap.add_argument("--calls", type=int, default=200, help="calls per timing")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()} torch={torch.__version__} "
          f"batch 1, median µs per call over {args.rounds} interleaved rounds of {args.calls} calls")
    print(f"{'shape':<12} {'variant':<22} {'µs/call':>9} {'time / fp32':>12}")
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        us = median_us(variants(in_f, out_f, args.group_size), in_f, args.calls, args.rounds)
        for name, t in us.items():
            print(f"{shape:<12} {name:<22} {t:9.1f} {t / us['fp32']:11.2f}x")


if __name__ == "__main__":
    main()
