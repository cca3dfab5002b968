"""Preference optimisation on self-generated, verifier-judged pairs: DPO vs IPO vs SimPO against the base model.

On the default domain (Python standard library source): held-out function prompts (signature + docstring from
files no model here trained on) are split by hash into pair prompts and evaluation prompts. The base model samples
K bodies per pair prompt; `python-syntax` judges them; best passing vs a failing body make a pair (`slm pairs`).
Each loss then trains from the same base on the same pairs (`slm dpo`), and every model is measured in the same
run:

- syntax pass rate of *greedy* completions on the evaluation prompts (the verifier's criterion, on prompts the
  pairs never used),
- held-out bits per byte of the dataset's val split (does the model still model the domain?),
- held-out preference accuracy on pairs the optimiser did not see (start -> end).

    python benchmarks/dpo_quality.py --ckpt runs/quickstart/student --data runs/quickstart/data
    python benchmarks/dpo_quality.py --quick            # trains a tiny model first; a smoke run of minutes

Without --ckpt a model is pretrained here first (`--pretrain-steps`) on a default-domain dataset built with
val_fraction 0.05, so that enough files are held out for prompts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from slmkit.align.dpo import dpo
from slmkit.align.pairs import PromptItem, make_pairs, write_pairs
from slmkit.align.preference_losses import PreferenceConfig
from slmkit.align.verifiers import build_verifier
from slmkit.checkpoint import load_checkpoint
from slmkit.data import build_dataset, open_dataset, token_byte_lengths
from slmkit.data.default_tasks import function_prompts
from slmkit.evaluate.lm import evaluate_lm
from slmkit.serve.generate import SamplingParams, generate
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain


def greedy_pass_rate(model, tok, items: list[PromptItem], verifier, *, max_new_tokens: int, batch: int = 16) -> float:
    """Fraction of greedy completions that the verifier passes."""
    passed = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        outs = generate(model, tok, [p.text for p in chunk], SamplingParams(max_new_tokens=max_new_tokens,
                                                                             temperature=0))
        passed += sum(r.passed for r in verifier.score_batch([p.text for p in chunk], [o.text for o in outs]))
    return passed / max(len(items), 1)


def measure(ckpt: Path, ds, items, verifier, args) -> dict:
    ck = load_checkpoint(ckpt)
    tok = ck.tokenizer()
    t0 = time.perf_counter()
    rate = greedy_pass_rate(ck.model, tok, items, verifier, max_new_tokens=args.max_new_tokens)
    bpb = evaluate_lm(ck.model, ds.split("val"), token_byte_lengths(ds.tokenizer()), seq_len=args.seq_len,
                      max_tokens=args.eval_tokens)["bits_per_byte"]
    return {"pass_rate": rate, "bits_per_byte": bpb, "measure_seconds": time.perf_counter() - t0}


def base_model(args, work: Path) -> tuple[Path, Path]:
    if args.ckpt is not None:
        if args.data is None:
            raise SystemExit("--ckpt needs --data (the dataset it was trained on, for bits per byte and the split)")
        return args.ckpt, args.data
    data = args.data or work / "data"
    if not (data / "meta.json").exists():
        build_dataset([], data, vocab_size=args.vocab_size, val_fraction=0.05, max_bytes=args.max_bytes,
                      progress=False)
    ckpt = work / "base"
    if not (ckpt / "model.safetensors").exists():
        cfg = TrainConfig(steps=args.pretrain_steps, batch_size=16, seq_len=args.seq_len, lr=3e-3,
                          warmup_steps=min(50, args.pretrain_steps // 10), eval_every=0, save_every=0)
        pretrain(data, args.preset, ckpt, cfg, quiet=True)
    return ckpt, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="Base checkpoint (default: pretrain one here).")
    ap.add_argument("--data", type=Path, default=None, help="Its dataset directory (held-out split and bpb).")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="Tiny sizes everywhere: a smoke run.")
    ap.add_argument("--losses", default="dpo,ipo,simpo")
    ap.add_argument("--verifier", default="python-syntax", help="Judge of samples and of greedy completions "
                    "(NAME[:k=v]); a smoke run of an untrained model may need an easier one to get pairs.")
    ap.add_argument("--pair-prompts", type=int, default=160)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-bytes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.pair_prompts, args.eval_prompts, args.k, args.max_new_tokens = 24, 12, 4, 32
        args.dpo_steps, args.batch_size, args.seq_len, args.eval_tokens = 6, 4, 128, 4096
        args.preset, args.pretrain_steps, args.vocab_size, args.max_bytes = "micro", 120, 512, 400_000
    work = args.work or Path(tempfile.mkdtemp(prefix="slm-dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    ckpt, data = base_model(args, work)
    ds = open_dataset(data)
    vf = ds.meta["val_fraction"]
    tasks = function_prompts(limit=args.eval_prompts + args.pair_prompts, seed=args.seed, val_fraction=vf,
                             require_docstring=False)
    items = [PromptItem(t.id, t.prompt, t.prompt) for t in tasks]
    eval_items, pair_items = items[:args.eval_prompts], items[args.eval_prompts:]
    print(f"base {ckpt} ({time.perf_counter() - t0:.0f}s); held-out function prompts at val_fraction={vf}: "
          f"{len(pair_items)} for pairs, {len(eval_items)} for evaluation")
    verifier = build_verifier(args.verifier)
    rows = {"base": measure(ckpt, ds, eval_items, verifier, args)}

    base = load_checkpoint(ckpt)
    t0 = time.perf_counter()
    records, stats = make_pairs(base.model, base.tokenizer(), pair_items, verifier, k=args.k,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    pairs = write_pairs(records, work / "pairs.jsonl")
    s = stats.to_dict()
    print(f"pairs: {s['pairs']} from {s['prompts']} prompts x {args.k} samples in {time.perf_counter() - t0:.0f}s "
          f"(sampled pass rate {s['pass_rate']:.1%}; all passed {s['skipped_all_passed']}, "
          f"all failed {s['skipped_all_failed']}) -> {pairs}")
    if s["pairs"] < 4:
        print("too few pairs to train on: the base model passes (or fails) every sample; train it longer or raise -k")
    else:
        for loss in [x.strip() for x in args.losses.split(",") if x.strip()]:
            out = work / loss
            cfg = TrainConfig(steps=args.dpo_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.dpo_lr,
                              warmup_steps=min(10, args.dpo_steps // 5), weight_decay=0.0, eval_every=0, save_every=0,
                              seed=args.seed)
            t1 = time.perf_counter()
            dpo(ckpt, pairs, out, cfg, PreferenceConfig(loss=loss), val_fraction=0.2, quiet=True)
            m = json.loads((out / "slmkit.json").read_text())["stages"][-1]["metrics"]
            rows[loss] = {**measure(out, ds, eval_items, verifier, args), "train_seconds": time.perf_counter() - t1,
                          "pref_start": m.get("start_preference_accuracy"),
                          "pref_end": m.get("val_preference_accuracy")}

    print()
    print(f"verifier {args.verifier}; pass rate of greedy completions on {len(eval_items)} held-out prompts")
    print(f"{'model':<8} {'pass (greedy)':>14} {'val bits/byte':>14} {'held-out pref acc':>18} {'train s':>8}")
    for name, r in rows.items():
        pref = (f"{r['pref_start']:.3f} -> {r['pref_end']:.3f}" if r.get("pref_end") is not None else "-")
        print(f"{name:<8} {r['pass_rate']:>14.1%} {r['bits_per_byte']:>14.4f} {pref:>18} "
              f"{r.get('train_seconds', 0):>8.0f}")
    (work / "results.json").write_text(json.dumps({"pairs": s, "rows": rows, "args": {k: str(v) for k, v in
                                                                                        vars(args).items()}}, indent=2))
    print(f"\nresults -> {work / 'results.json'}")


if __name__ == "__main__":
    main()
