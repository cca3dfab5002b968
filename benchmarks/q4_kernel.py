"""The integer CPU kernels (`slmkit.compress.cpu_kernels.q4_gemv`, `q8_gemv`) against the kernels they would replace.

For each (IN x OUT, rows) shape: median µs per call of
  q4        `q4_gemv` (int4 codes x int8 activations, integer dot products) at the best code level here
  q8        `q8_gemv` (int8 codes x int8 activations; the same int8 weights as fbgemm-i8)
  q4@avx2, q8@avx2  the same kernels pinned to their AVX2 code, on CPUs whose best is AVX-512 VNNI (the ratio
            avx2/vnni shows what `vpdpbusd` buys)
  torch-i4  `aten._weight_int4pack_mm_for_cpu` with bf16 inputs (what `Int4Linear` runs by default) and fp32
  fbgemm-i8 `quantized::linear_dynamic` (what `Int8Linear(kernel="dynamic")` runs; int8 weights)
  fp32      `F.linear` with the dequantized weight
at 1 thread (CPU time of the calling thread, `time.thread_time`, robust to other load on a shared machine) and
at 2 threads (wall time). The variants take turns inside each of `--rounds` rounds. Ratios: torch-i4 bf16 / q4,
fbgemm-i8 / q4, fp32 / q4 and fbgemm-i8 / q8 (above 1: the new kernel is faster).

    python benchmarks/q4_kernel.py
    python benchmarks/q4_kernel.py --shapes 576x3072 --rows 1,4 --group-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from slmkit.compress.cpu_kernels import available, kernel_level, prepare_q4, prepare_q8, q4_gemv, q8_gemv

SMOLLM2 = "576x960,576x576,576x3072,1536x576,576x20175,576x49152"  # q|k|v, o, gate|up, down, trimmed/full head


def layer(in_f: int, out_f: int, group_size: int):
    """Random int4 codes, scales, zeros -> (dequantized fp32 weight, q4 weights, torch-int4 args, fbgemm weight)."""
    g = torch.Generator().manual_seed(0)
    groups = in_f // group_size
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    s = torch.rand(out_f, groups, generator=g) * 0.01 + 0.001
    z = torch.randint(0, 16, (out_f, groups), generator=g, dtype=torch.uint8)
    w = ((q.float().view(out_f, groups, group_size) - z.float()[:, :, None]) * s[:, :, None]).view(out_f, in_f)
    q4 = prepare_q4(q[:, 0::2] | (q[:, 1::2] << 4), s, z, group_size)
    pad = -out_f % 16  # torch's packing takes whole tiles of 16 rows
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(q.to(torch.int32), (0, 0, 0, pad), value=8), 1)
    s_p, zero_p = F.pad(s, (0, 0, 0, pad)), F.pad((8 - z.float()) * s, (0, 0, 0, pad))
    sz = torch.stack([s_p.t(), zero_p.t()], dim=2).contiguous()  # (groups, out, 2)
    amax = w.abs().amax(1).clamp_min(1e-12)
    codes8 = torch.round(w / (amax / 127)[:, None]).to(torch.int8)
    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; Int8Linear packs the same way
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(codes8, (amax / 127).double(), torch.zeros(out_f, dtype=torch.long), 0)
    i8 = torch.ops.quantized.linear_prepack(qw, None)
    q8 = prepare_q8(codes8, amax / 127)
    return w, q4, (packed, group_size, sz), i8, q8


def candidates(in_f: int, out_f: int, rows: int, group_size: int) -> dict:
    w, q4, (packed, gs, sz), i8, q8 = layer(in_f, out_f, group_size)
    x = torch.randn(rows, in_f)
    xb, szb = x.bfloat16(), sz.bfloat16()
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    dyn = torch.ops.quantized.linear_dynamic.default
    lower = {}
    if kernel_level() == "avx512vnni":
        lower = {"q4@avx2": lambda: q4_gemv(x, q4, level="avx2"), "q8@avx2": lambda: q8_gemv(x, q8, level="avx2")}
    return {**lower, "q4": lambda: q4_gemv(x, q4),
            "torch-i4 bf16": lambda: mm4(xb, packed, gs, szb),
            "torch-i4 fp32": lambda: mm4(x, packed, gs, sz),
            "q8": lambda: q8_gemv(x, q8),
            "fbgemm-i8": lambda: dyn(x, i8, True),
            "fp32": lambda: F.linear(x, w)}


@torch.inference_mode()
def median_us(fns: dict, threads: int, calls: int, rounds: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    for fn in fns.values():
        for _ in range(5):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(calls):
                fn()
            times[name].append((clock() - t0) / calls)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SMOLLM2, help="comma-separated IN x OUT")
    ap.add_argument("--rows", default="1,4,16", help="comma-separated input rows")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (a multiple of 32 dividing IN)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget-ms", type=float, default=30.0, help="target time per variant per round")
    args = ap.parse_args()
    if not available():
        raise SystemExit("the C kernels are not available here (see the warning above)")
    print(f"torch {torch.__version__}, kernel level {torch.backends.cpu.get_cpu_capability()}, "
          f"q4 code {kernel_level()}, group {args.group_size}; median µs per call")
    names = ["q4", "torch-i4 bf16", "torch-i4 fp32", "q8", "fbgemm-i8", "fp32"]
    vnni = kernel_level() == "avx512vnni"
    if vnni:
        names = ["q4@avx2", "q8@avx2"] + names
    head = f"{'shape':>12} {'rows':>4} {'thr':>3} " + " ".join(f"{n:>13}" for n in names)
    print(head + "   i4bf16/q4  i8/q4  fp32/q4  i8/q8" + ("  q4 avx2/vnni  q8 avx2/vnni" if vnni else ""))
    for shape in args.shapes.split(","):
        in_f, out_f = map(int, shape.split("x"))
        for rows in map(int, args.rows.split(",")):
            fns = candidates(in_f, out_f, rows, args.group_size)
            for threads in map(int, args.threads.split(",")):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                fns["torch-i4 bf16"]()
                est = max(time.perf_counter() - t0, 1e-5)
                calls = max(1, int(args.budget_ms / 1e3 / est))
                us = median_us(fns, threads, calls, args.rounds)
                q = us["q4"]
                print(f"{shape:>12} {rows:>4} {threads:>3} " + " ".join(f"{us[n]:>13.1f}" for n in names)
                      + f"   {us['torch-i4 bf16'] / q:>9.2f} {us['fbgemm-i8'] / q:>6.2f} {us['fp32'] / q:>8.2f}"
                      f" {us['fbgemm-i8'] / us['q8']:>6.2f}"
                      + (f"  {us['q4@avx2'] / q:>12.2f}  {us['q8@avx2'] / us['q8']:>12.2f}" if vnni else ""),
                      flush=True)


if __name__ == "__main__":
    main()
