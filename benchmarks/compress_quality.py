"""Compression on a trained model, every pass against the dense model in the same run.

For each plan: parameters, nonzero parameters, bytes of the stored tensors, held-out bits per byte and decode
tokens/s at batch 1 — the dense row is measured in the same process each time, so ratios are like for like.
Then KD recovery: the 50% Wanda-pruned model is distilled from the dense one (zeros stay zero) and scored again.

    python benchmarks/compress_quality.py --ckpt runs/quickstart/teacher --data runs/quickstart/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from slmkit.checkpoint import load_checkpoint
from slmkit.compress.run import compress, parse_pass
from slmkit.data import open_dataset, token_byte_lengths
from slmkit.distill import KDConfig
from slmkit.distill.run import distill
from slmkit.evaluate.lm import evaluate_lm
from slmkit.train import TrainConfig

PLANS = [
    "prune.magnitude:sparsity=0.5",
    "prune.wanda:sparsity=0.5",
    "prune.sparsegpt:sparsity=0.5",
    "prune.sparsegpt:pattern=2:4",
    "quant.int8",
    "quant.int4:group_size=128",
    "quant.gptq:bits=4,group_size=128",
    "quant.gptq:bits=4,group_size=128,act_order=true",
    "lowrank.svd:ratio=0.8",
    "lowrank.asvd:ratio=0.8",
    "prune.width:mlp_ratio=0.5,heads_ratio=0.5",
    "prune.depth:drop=1",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--plans", default=";".join(PLANS), help="';'-separated passes (a plan may chain with '>')")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--recover-steps", type=int, default=150)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slm-compress-bench-"))

    results = []
    for i, plan in enumerate(p for p in args.plans.split(";") if p.strip()):
        specs = [parse_pass(p) for p in plan.split(">")]
        rows = compress(args.ckpt, work / f"plan{i}", specs, data=args.data, calib_samples=args.calib_samples,
                        calib_seq_len=args.seq_len, eval_tokens=args.eval_tokens, speed=not args.no_speed)
        results.append((plan, rows[0], rows[-1], work / f"plan{i}"))
        print(f"done: {plan}", flush=True)

    dense = results[0][1]
    print(f"\n{'plan':48s} {'params':>10s} {'nonzero':>10s} {'bytes':>7s} {'bits/byte':>10s} {'vs dense':>9s} "
          f"{'decode':>8s} {'seconds':>8s}")
    print(f"{'(dense)':48s} {dense['parameters']:10,d} {dense['nonzero']:10,d} {'100%':>7s} "
          f"{dense['bits_per_byte']:10.4f} {'':>9s} {'1.00x' if 'decode_tok_s' in dense else '-':>8s}")
    for plan, before, after, _ in results:
        speed = (f"{after['decode_tok_s'] / before['decode_tok_s']:.2f}x" if "decode_tok_s" in after else "-")
        print(f"{plan:48s} {after['parameters']:10,d} {after['nonzero']:10,d} "
              f"{after['bytes'] / before['bytes']:7.1%} {after['bits_per_byte']:10.4f} "
              f"{after['bits_per_byte'] / before['bits_per_byte'] - 1:+9.1%} {speed:>8s} {after['seconds']:8.1f}")

    wanda = next((r for r in results if r[0] == "prune.wanda:sparsity=0.5"), None)
    if wanda is not None and args.recover_steps > 0:
        out = work / "wanda-recovered"
        cfg = TrainConfig(steps=args.recover_steps, batch_size=16, seq_len=args.seq_len, lr=5e-4, warmup_steps=10,
                          eval_every=0, save_every=0)
        distill(args.ckpt, wanda[3], args.data, out, cfg, KDConfig(alpha=0.5), quiet=True)
        ds = open_dataset(args.data)
        ck = load_checkpoint(out)
        m = evaluate_lm(ck.model, ds.split("val"), token_byte_lengths(ds.tokenizer()), seq_len=args.seq_len,
                        max_tokens=args.eval_tokens)
        from slmkit.compress.base import count_parameters

        total, nonzero = count_parameters(ck.model)
        print(f"\nKD recovery of 50% Wanda ({args.recover_steps} steps, teacher = dense): bits/byte "
              f"{wanda[2]['bits_per_byte']:.4f} -> {m['bits_per_byte']:.4f} ({m['bits_per_byte'] / dense['bits_per_byte'] - 1:+.1%} "
              f"vs dense, target <= +5%); nonzero {nonzero:,} of {total:,} (sparsity kept)")
    (work / "compress_bench.json").write_text(json.dumps(
        [{"plan": p, "before": b, "after": a} for p, b, a, _ in results], indent=2))


if __name__ == "__main__":
    main()
