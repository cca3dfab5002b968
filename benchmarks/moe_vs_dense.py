"""Sparse mixture of experts vs a dense model with the same active parameters, trained on the same tokens.

The MoE model has E experts (default 8) of intermediate size f per layer and routes each token to k of them
(default 2); the dense baseline has one SwiGLU of intermediate size k·f, so a token touches the same number of
MLP weights in both (the MoE adds only its router, hidden × E per layer). Both train with the real `pretrain`
loop (same seed, so the same batches, steps and learning-rate schedule) and are scored on the same held-out
tokens. Reported: held-out bits per byte, training tokens/s (median step after warm-up), total and active
parameters, the final auxiliary (load-balancing + z) loss, and how evenly the MoE spreads tokens over experts
on held-out text.

    python benchmarks/moe_vs_dense.py                      # builds a 2 MB slice of the default domain
    python benchmarks/moe_vs_dense.py --data runs/ds --steps 400 --hidden 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.data import build_dataset, open_dataset
from slmkit.model.moe import SparseMoE, active_parameters, total_parameters
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain


def model_yaml(path: Path, args, *, experts: int, intermediate: int) -> Path:
    fields = {"hidden_size": args.hidden, "intermediate_size": intermediate, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
              "num_local_experts": experts, "num_experts_per_tok": args.top_k}
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def expert_balance(ckpt: Path, data: Path, seq_len: int) -> str:
    """Coefficient of variation of tokens per expert on held-out text (std/mean; 0 = perfectly even, as in
    Shazeer et al., 2017), averaged over layers, with the busiest expert's share of assignments (even: 1/E)."""
    model = load_checkpoint(ckpt).model
    val = open_dataset(data).split("val")
    ids = torch.stack([torch.as_tensor(val.window(i * seq_len, seq_len).astype("int64")) for i in range(8)])
    with torch.no_grad():
        model(ids)
    counts = [m.expert_counts.float() for m in model.modules() if isinstance(m, SparseMoE)]
    if not counts:
        return "-"
    cv = statistics.mean((c.std(correction=0) / c.mean()).item() for c in counts)
    busiest = statistics.mean((c.max() / c.sum()).item() for c in counts)
    return f"{cv:.2f} / {busiest:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="dataset dir (default: build a 2 MB slice of the default domain)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--expert-intermediate", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1 is fastest on a shared machine; 0 leaves torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="moe_vs_dense_"))
    data = args.data
    if data is None:
        t0 = time.perf_counter()
        data = work / "ds"
        build_dataset([], data, max_bytes=2_000_000, vocab_size=4096, val_fraction=0.05, progress=False)
        print(f"built {data} in {time.perf_counter() - t0:.0f}s")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_steps=max(1, args.steps // 10), eval_every=0, eval_tokens=args.eval_tokens,
                      save_every=0, log_every=max(1, args.steps // 10), precision=args.precision,
                      device=args.device)
    runs = {
        f"dense (intermediate {args.top_k * args.expert_intermediate})":
            model_yaml(work / "dense.yaml", args, experts=0, intermediate=args.top_k * args.expert_intermediate),
        f"MoE {args.experts} experts top-{args.top_k} (intermediate {args.expert_intermediate})":
            model_yaml(work / "moe.yaml", args, experts=args.experts, intermediate=args.expert_intermediate),
    }
    rows = []
    for name, spec in runs.items():
        out = work / spec.stem
        result = pretrain(data, spec, out, cfg, quiet=True)
        model = load_checkpoint(out).model
        steady = [r["tok_per_s"] for r in result.history[min(3, len(result.history) - 1):]]
        last = result.history[-1]
        rows.append({"model": name, "total": total_parameters(model), "active": active_parameters(model),
                     "bpb": result.evals[-1]["val_bits_per_byte"], "tok_s": statistics.median(steady),
                     "seconds": result.seconds, "tokens": result.tokens,
                     "aux": f"{last['aux_loss']:.4f}" if "aux_loss" in last else "-",
                     "balance": expert_balance(out, data, args.seq_len)})
        print(f"{name}: done in {result.seconds:.0f}s")

    print(f"\n{args.steps} steps x {args.batch_size} x {args.seq_len} = {rows[0]['tokens']:,} training tokens each; "
          f"hidden {args.hidden}, {args.layers} layers, {args.precision}, {torch.get_num_threads()} threads, "
          f"device {cfg.device}")
    head = (f"{'model':<44} {'total params':>12} {'active/token':>12} {'val bits/byte':>13} {'train tok/s':>11} "
            f"{'aux loss':>8} {'load CV / busiest':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<44} {r['total']:>12,} {r['active']:>12,} {r['bpb']:>13.4f} {r['tok_s']:>11,.0f} "
              f"{r['aux']:>8} {r['balance']:>17}")
    dense, moe = rows
    print(f"\nMoE / dense: total params x{moe['total'] / dense['total']:.2f}, active params "
          f"x{moe['active'] / dense['active']:.3f}, bits/byte {moe['bpb'] - dense['bpb']:+.4f}, "
          f"throughput x{moe['tok_s'] / dense['tok_s']:.2f}")


if __name__ == "__main__":
    main()
