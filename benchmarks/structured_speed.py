"""Decode speed at batch 1 after structured pruning and quantization, against the same dense model in the
same run (random weights of a preset: speed does not depend on what the weights learned).

    python benchmarks/structured_speed.py --data runs/quickstart/data --preset small
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from slmkit.checkpoint import save_checkpoint
from slmkit.compress.run import compress, parse_pass
from slmkit.data import open_dataset
from slmkit.model import CausalLM, resolve_model_config

PLANS = ["prune.width:mlp_ratio=0.5,heads_ratio=0.5", "quant.int8", "quant.int4:group_size=128",
         "quant.int8:embeddings=true", "quant.int4:group_size=128,embeddings=true",
         "prune.width:mlp_ratio=0.5,heads_ratio=0.5>quant.int8:embeddings=true"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset (calibration; its tokenizer sets the vocab)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plans", default=";".join(PLANS), help="';'-separated plans; '>' chains passes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_dataset(args.data)
    work = Path(tempfile.mkdtemp(prefix="slm-speed-"))
    torch.manual_seed(0)
    model = CausalLM(resolve_model_config(args.preset, vocab_size=ds.vocab_size))
    save_checkpoint(model, work / "dense", tokenizer_from=ds.path)
    print(f"preset {args.preset}, threads {torch.get_num_threads()}")
    print(f"{'plan':56s} {'params':>11s} {'bytes':>7s} {'decode tok/s':>13s} {'vs dense':>9s}")
    for i, plan in enumerate(p for p in args.plans.split(";") if p):
        rows = compress(work / "dense", work / f"p{i}", [parse_pass(p) for p in plan.split(">")], data=args.data,
                        calib_samples=16, calib_seq_len=128, eval_tokens=2048)
        d, c = rows[0], rows[-1]
        if i == 0:
            print(f"{'(dense)':56s} {d['parameters']:11,d} {'100%':>7s} {d['decode_tok_s']:13.1f} {'1.00x':>9s}")
        print(f"{plan:56s} {c['parameters']:11,d} {c['bytes'] / d['bytes']:7.1%} {c['decode_tok_s']:13.1f} "
              f"{c['decode_tok_s'] / d['decode_tok_s']:8.2f}x")


if __name__ == "__main__":
    main()
