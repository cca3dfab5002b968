"""A real teacher's student: pruned and distilled, against the same architecture trained from scratch.

Minitron's recipe at the quickstart's scale: the student is the teacher with its `--drop` lowest-block-influence
layers removed (`prune.depth`), healed on the domain with the same wall time under each arm:

- distilled: pruned init, logit KD from the full teacher (forward KL, alpha 0.5) — what the quickstart does;
- healed (CE only): pruned init, plain next-token loss — what KD adds over the teacher's weights alone;
- scratch: the same architecture (and tokenizer) from random init, plain next-token loss.

All are scored on the same held-out tokens (bits per byte, top-1), beside the teacher and the untrained
pruned model. Target (issue: real pretrained teachers): scratch >= 20% worse bits per byte than distilled.

    python benchmarks/distill_vs_scratch.py --teacher runs/quickstart/teacher --data runs/quickstart/data
    python benchmarks/distill_vs_scratch.py --teacher T --data D --drop 6 --seconds 240 --arms distilled,scratch

The teacher is any slmkit checkpoint (`slm import gguf` of SmolLM2 is the honest one: the quickstart's
`teacher` stage); the dataset must be built with its tokenizer (the quickstart's `data` stage).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.compress.run import compress, parse_pass
from slmkit.data import open_dataset, token_byte_lengths
from slmkit.distill import KDConfig
from slmkit.distill.run import distill
from slmkit.evaluate.lm import evaluate_lm
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain

ARMS = ("distilled", "healed", "scratch")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (e.g. runs/quickstart/teacher)")
    ap.add_argument("--data", type=Path, required=True, help="dataset built with the teacher's tokenizer")
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temp dir); arms "
                    "already finished there are reused")
    ap.add_argument("--drop", type=int, default=6, help="teacher layers removed by block influence")
    ap.add_argument("--seconds", type=float, default=240, help="training wall time of each arm")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of the arms that start from the teacher")
    ap.add_argument("--scratch-lr", type=float, default=1e-3, help="learning rate of the scratch arm")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        ap.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="slm-distill-vs-scratch-"))
    work.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(args.data)
    pruned = work / "pruned"
    if not (pruned / "model.safetensors").exists():
        compress(args.teacher, pruned, [parse_pass(f"prune.depth:drop={args.drop}")], data=args.data,
                 calib_samples=16, eval_tokens=1024, speed=False)

    def cfg(lr: float) -> TrainConfig:
        return TrainConfig(steps=100_000, time_budget_s=args.seconds, batch_size=args.batch_size,
                           seq_len=args.seq_len, lr=lr, warmup_steps=2, eval_every=0, save_every=0, log_every=1,
                           eval_tokens=1024)

    timings, tokens = {}, {}
    for arm in arms:
        out = work / arm
        done = out / "slmkit.json"
        if done.exists():  # a finished arm of an earlier run in the same --work: reused, with its figures
            stage = json.loads(done.read_text())["stages"][-1]
            timings[arm], tokens[arm] = stage.get("seconds", 0.0), stage.get("tokens_seen", 0)
            continue
        t0 = time.perf_counter()
        if arm == "distilled":
            r = distill(args.teacher, pruned, args.data, out, cfg(args.lr),
                        KDConfig(loss="forward_kl", alpha=0.5, temperature=1.0), quiet=True)
        elif arm == "healed":
            r = pretrain(args.data, pruned, out, cfg(args.lr), quiet=True)
        else:
            r = pretrain(args.data, pruned / "config.json", out, cfg(args.scratch_lr), quiet=True)
        timings[arm], tokens[arm] = time.perf_counter() - t0, r.tokens

    lengths = token_byte_lengths(ds.tokenizer())
    val = ds.split("val")
    rows = {}
    for name, path in [("teacher", args.teacher), (f"pruned (drop {args.drop}, untrained)", pruned),
                       *((a, work / a) for a in arms)]:
        model = load_checkpoint(path).model.eval()
        m = evaluate_lm(model, val, lengths, seq_len=args.seq_len, max_tokens=args.eval_tokens, batch_size=8)
        rows[name] = {"parameters": model.num_parameters(), "layers": model.config.num_hidden_layers, **m}

    print(f"\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.seconds:.0f} s of training per arm, batch {args.batch_size} x {args.seq_len}; "
          f"{args.eval_tokens:,} held-out tokens")
    print(f"{'model':32s} {'layers':>6s} {'params':>12s} {'train tokens':>12s} {'bits/byte':>10s} {'top-1':>7s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['layers']:6d} {r['parameters']:12,d} {tokens.get(name, 0):12,d} "
              f"{r['bits_per_byte']:10.4f} {r['accuracy']:7.3f}")
    t = rows["teacher"]["bits_per_byte"]
    for arm in arms:
        print(f"{arm}: {rows[arm]['bits_per_byte'] / t - 1:+.1%} bits/byte vs the teacher")
    if "distilled" in arms and "scratch" in arms:
        d, s = rows["distilled"]["bits_per_byte"], rows["scratch"]["bits_per_byte"]
        print(f"scratch vs distilled: {s / d - 1:+.1%} bits/byte (target: scratch >= 20% worse)")
    if "distilled" in arms and "healed" in arms:
        d, h = rows["distilled"]["bits_per_byte"], rows["healed"]["bits_per_byte"]
        print(f"healed (CE only) vs distilled: {h / d - 1:+.1%} bits/byte (what KD adds over the teacher's weights)")
    (work / "distill_vs_scratch.json").write_text(json.dumps(
        {"cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "tokens": tokens,
         "seconds": timings}, indent=2))
    print(f"written: {work / 'distill_vs_scratch.json'}")


if __name__ == "__main__":
    main()
