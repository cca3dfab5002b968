"""Distillation quality and cost on the default domain, all in one run.

1. A teacher is trained (or given with --teacher).
2. A student with at most a quarter of the teacher's parameters is trained twice on the same data, steps and
   batch: from scratch (next-token loss) and distilled from the teacher (logit KD, online).
3. Teacher, scratch student and distilled student are scored on the held-out split: bits per byte and top-1
   next-token accuracy. Targets: distilled >= 5% better bits/byte than scratch; >= 90% of teacher's top-1.
4. Per-token cost of one training step: plain LM step vs KD from the teacher logit cache vs online KD
   (target: cached <= 1.3x plain), timed in this process on the same batch shape.

    python benchmarks/distill_quality.py --data runs/quickstart/data --teacher-preset small --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.data import build_dataset, open_dataset, token_byte_lengths
from slmkit.distill import KDConfig
from slmkit.distill.run import distill
from slmkit.distill.steps import KDStep
from slmkit.distill.teacher_cache import CachedKDBatches, build_teacher_cache, open_teacher_cache
from slmkit.evaluate.lm import evaluate_lm
from slmkit.model import CausalLM, resolve_model_config
from slmkit.train import LMBatches, Trainer, TrainConfig, lm_step
from slmkit.train.loop import autocast_dtype, resolve_device
from slmkit.train.pretrain import pretrain


def step_seconds(model, step_fn, batches, cfg, out, repeats=5) -> float:
    trainer = Trainer(model, step_fn, batches, cfg, out, quiet=True)
    trainer.model.train()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        trainer._train_step()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        trainer._train_step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="dataset dir (default: build the default domain)")
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--teacher", type=Path, default=None, help="an existing teacher checkpoint")
    ap.add_argument("--teacher-preset", default="small")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student", default="hidden_size=96,intermediate_size=256,num_hidden_layers=4,"
                    "num_attention_heads=4,num_key_value_heads=2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--alpha", default="0.5", help="KD weight; a comma list trains one distilled student each")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="slm-distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or work / "data"
    if not (Path(data) / "meta.json").exists():
        build_dataset([], data, vocab_size=8192, val_fraction=0.02)
    ds = open_dataset(data)
    base = dict(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=30, eval_every=0,
                save_every=0, log_every=10, eval_tokens=args.eval_tokens, device=args.device)

    timings = {}
    teacher = args.teacher
    if teacher is None:
        teacher = work / "teacher"
        t0 = time.perf_counter()
        pretrain(data, args.teacher_preset, teacher, TrainConfig(steps=args.teacher_steps, **base), quiet=True)
        timings["teacher_train_s"] = time.perf_counter() - t0
    student_yaml = work / "student.yaml"
    if "=" in args.student:
        student_yaml.write_text("".join(f"{kv.split('=')[0]}: {kv.split('=')[1]}\n" for kv in args.student.split(",")))
    else:
        student_yaml.write_text(f"preset: {args.student}\n")

    cfg = TrainConfig(steps=args.steps, **base)
    t0 = time.perf_counter()
    pretrain(data, student_yaml, work / "scratch", cfg, quiet=True)
    timings["scratch_train_s"] = time.perf_counter() - t0
    alphas = [float(a) for a in args.alpha.split(",")]
    for alpha in alphas:
        t0 = time.perf_counter()
        distill(teacher, student_yaml, data, work / f"distilled-a{alpha:g}", cfg,
                KDConfig(loss=args.loss, alpha=alpha, temperature=args.temperature), quiet=True)
        timings[f"distill_a{alpha:g}_train_s"] = time.perf_counter() - t0
    kd = KDConfig(loss=args.loss, alpha=alphas[0], temperature=args.temperature)

    device = resolve_device(args.device)
    lengths = token_byte_lengths(ds.tokenizer())
    amp = autocast_dtype(cfg, device)
    rows = {}
    for name, path in [("teacher", teacher), ("student, scratch", work / "scratch"),
                       *((f"student, KD alpha={a:g}", work / f"distilled-a{a:g}") for a in alphas)]:
        ck = load_checkpoint(path)
        ck.model.to(device)
        m = evaluate_lm(ck.model, ds.split("val"), lengths, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                        autocast_dtype=amp)
        rows[name] = {"parameters": ck.model.num_parameters(), **m}

    # Per-token cost of a training step: plain LM vs KD from the cache vs online KD, same batch shape.
    cost_cfg = TrainConfig(steps=1000, **base)
    n_chunks = cost_cfg.batch_size * 8
    cache = build_teacher_cache(teacher, data, work / "cache", k=16, seq_len=args.seq_len, max_chunks=n_chunks,
                                device=device, autocast_dtype=amp, progress=False)
    tc = open_teacher_cache(cache)
    train = ds.split("train")
    student_cfg = resolve_model_config(student_yaml, vocab_size=ds.vocab_size)
    t_model = load_checkpoint(teacher).model.to(device)
    cost = {
        "plain LM step": step_seconds(CausalLM(student_cfg), lm_step, LMBatches(train, args.seq_len,
                                      args.batch_size, 0), cost_cfg, work / "c1"),
        "KD from cache (top-16)": step_seconds(CausalLM(student_cfg), KDStep(kd, None),
                                               CachedKDBatches(tc, train, args.batch_size, 0), cost_cfg, work / "c2"),
        "KD online (teacher forward)": step_seconds(CausalLM(student_cfg), KDStep(kd, t_model),
                                                    LMBatches(train, args.seq_len, args.batch_size, 0), cost_cfg,
                                                    work / "c3"),
    }

    print(f"\ndevice {device}; student {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
          f"loss {args.loss}, alpha {args.alpha}, T {args.temperature}")
    print(f"{'model':26s} {'params':>11s} {'bits/byte':>10s} {'top-1':>7s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['parameters']:11,d} {r['bits_per_byte']:10.4f} {r['accuracy']:7.3f}")
    s, t = rows["student, scratch"], rows["teacher"]
    print(f"student/teacher parameters: {s['parameters'] / t['parameters']:.1%} (target <= 25%)")
    for a in alphas:
        d = rows[f"student, KD alpha={a:g}"]
        print(f"KD alpha={a:g}: bits/byte {1 - d['bits_per_byte'] / s['bits_per_byte']:+.1%} vs scratch "
              f"(target >= +5%); top-1 {d['accuracy'] / t['accuracy']:.1%} of the teacher's (target >= 90%)")
    tokens = args.batch_size * args.seq_len
    print(f"{'step':30s} {'s/step':>8s} {'us/token':>9s} {'vs plain':>9s}")
    for name, sec in cost.items():
        print(f"{name:30s} {sec:8.4f} {sec / tokens * 1e6:9.2f} {sec / cost['plain LM step']:8.2f}x")
    print(f"teacher cache: {tc.meta['bytes'] / 1e6:.2f} MB for {tc.meta['tokens']:,} tokens "
          f"({tc.meta['bytes'] / tc.meta['tokens']:.0f} bytes/token), built in {tc.meta['seconds']:.1f}s")
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    (work / "distill_bench.json").write_text(json.dumps({"rows": rows, "cost_s": cost, "timings": timings}, indent=2))


if __name__ == "__main__":
    main()
