"""Transformer-XL segment memory: quality and evaluation speed on long held-out documents.

A small model is trained briefly with memory (`slm train`'s path: consecutive segments, memory kept across
steps), then the held-out split is read segment by segment with four ways of giving each segment context:

- memory:         each segment attends to the memory of the earlier ones (segment T + memory M);
- no memory:      each segment alone (same segment length, the fixed-context baseline);
- window/segment: recompute a window of the M tokens before each segment, then score the segment
                  (same total context as segment + memory, recomputed instead of cached);
- window/token:   recompute a window of M + T tokens for every predicted token (the vanilla evaluation
                  Dai et al., 2019 compare against); speed only, timed on a few tokens per segment.

Bits per byte come from one pass of each evaluation over the same held-out tokens. Speed is timed
separately with the four forwards interleaved segment by segment (this machine is shared and noisy).

    python benchmarks/xl_memory.py                     # default domain, ~3 minutes on one CPU core
    python benchmarks/xl_memory.py --data DATASET_DIR --steps 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.data import build_dataset, open_dataset, token_byte_lengths
from slmkit.evaluate.long_context import evaluate_long_documents, evaluate_sliding_window
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain


@torch.no_grad()
def interleaved_speed(model, stream, *, segment: int, memory: int, batch_size: int, segments: int) -> dict:
    """Seconds per segment of each way to give context, timed alternately on the same segments so the
    load of a shared machine falls on all of them alike. Lanes are contiguous pieces of `stream`; the
    first segments (no full context yet) are skipped. `window/token` runs one full window forward per
    predicted token, timed on the first `batch_size` tokens of each segment and scaled to the segment."""
    warm = (memory + 2 * segment - 2) // segment  # segments before a full (M + T)-token window exists
    L = (segments + warm) * segment + 1
    lanes = torch.stack([torch.as_tensor(stream.window(i * L, L).astype("int64")) for i in range(batch_size)])
    mem = model.new_memory(batch_size, memory)
    times = {"memory": [], "no memory": [], "window/segment": [], "window/token": []}

    def timed(name, fn, scale=1.0):
        t0 = time.perf_counter()
        fn()
        times[name].append((time.perf_counter() - t0) * scale)

    for i in range(segments + warm):
        s = i * segment
        seg = lanes[:, s:s + segment]
        if i < warm:
            model(seg, memory=mem)
            continue
        timed("memory", lambda: model(seg, memory=mem))
        timed("no memory", lambda: model(seg))
        timed("window/segment", lambda: model(lanes[:, s - memory:s + segment]))
        n = min(batch_size, segment)  # per-token windows for n tokens, scaled to the whole segment
        timed("window/token", lambda: [model(lanes[:, s + j - memory - segment + 1:s + j + 1], last_only=True)
                                       for j in range(n)], scale=segment / n)
    tokens = segments * segment * batch_size
    return {name: tokens / sum(t) for name, t in times.items()}  # tokens/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset directory (default: build one from the default domain)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--speed-segments", type=int, default=6, help="segments per lane timed for speed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads oversubscribe and run ~10x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="xl_bench_"))
    t0 = time.perf_counter()
    data = args.data
    if data is None:
        data = work / "ds"
        build_dataset([], data, max_bytes=3_000_000, vocab_size=4096, val_fraction=0.05, progress=False)
    t_data = time.perf_counter() - t0
    spec = work / "model.yaml"
    spec.write_text(f"preset: {args.preset}\nmemory_length: {args.memory}\n")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.segment, lr=3e-3,
                      warmup_steps=min(20, args.steps // 5), eval_every=0, save_every=0, log_every=10)
    t0 = time.perf_counter()
    res = pretrain(data, spec, work / "model", cfg, quiet=True)
    t_train = time.perf_counter() - t0

    ds = open_dataset(data)
    val, lengths = ds.split("val"), token_byte_lengths(ds.tokenizer())
    model = load_checkpoint(work / "model").model.eval()
    kw = dict(segment_len=args.segment, batch_size=args.batch_size, max_tokens=args.eval_tokens)
    rows = [
        ("memory", evaluate_long_documents(model, val, lengths, memory=True, **kw)),
        ("no memory", evaluate_long_documents(model, val, lengths, memory=False, **kw)),
        ("window/segment", evaluate_sliding_window(model, val, lengths, context_len=args.memory, **kw)),
    ]
    speed = interleaved_speed(model, val, segment=args.segment, memory=args.memory, batch_size=args.batch_size,
                              segments=args.speed_segments)

    print(f"\nTransformer-XL memory: {args.preset} model ({model.num_parameters() / 1e6:.2f}M params), "
          f"segment {args.segment}, memory {args.memory}, trained {res.steps} steps x {args.batch_size} lanes "
          f"({t_train:.0f}s; data {t_data:.0f}s); {len(val)} held-out tokens, CPU threads {args.threads}")
    print(f"{'evaluation':<16}{'context/token':>14}{'bits/byte':>11}{'tok/s':>10}{'memory speedup':>16}")
    contexts = {"memory": f"<={args.memory + args.segment}", "no memory": f"<={args.segment}",
                "window/segment": f"<={args.memory + args.segment}", "window/token": f"{args.memory + args.segment}"}
    bpb = {name: f"{r['bits_per_byte']:.4f}" for name, r in rows}
    for name, tok_s in speed.items():
        print(f"{name:<16}{contexts[name]:>14}{bpb.get(name, '-'):>11}{tok_s:>10.0f}"
              f"{speed['memory'] / tok_s:>15.2f}x")
    print(f"bits/byte on the same {rows[0][1]['tokens']} held-out tokens; speed timed alternately on "
          f"{args.speed_segments} segments x {args.batch_size} lanes after the memory has filled")
    gain = rows[1][1]["bits_per_byte"] - rows[0][1]["bits_per_byte"]
    print(f"bits/byte with memory vs without: {gain:+.4f} lower with memory" if gain > 0 else
          f"bits/byte with memory vs without: {-gain:.4f} HIGHER with memory")


if __name__ == "__main__":
    main()
