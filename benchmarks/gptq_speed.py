"""quant.gptq wall time on a SmolLM2-shaped model (hidden 576, MLP 1536, 9 query / 3 KV heads, random weights), this
checkout against a baseline checkout of slmkit, in one run, and whether they give the same codes.

Each arm runs in its own subprocess (`--threads` torch threads) on the same random model and calibration ids;
the arms alternate over `--rounds`, so a slow phase of a shared machine falls on both. The baseline is any other
slmkit source tree, e.g. the commit before a change:

    git archive <commit> slmkit | tar -x -C /tmp/gptq-before
    python benchmarks/gptq_speed.py --baseline /tmp/gptq-before --layers 4 --threads 2

Without `--baseline`, only this checkout is timed. The codes are compared by a digest of every quantized tensor.
Compare them at `--threads 1`: before the column loop and the Hessian factorisation were pinned to one thread,
multi-threaded LAPACK made the last bits of the factor, and so a few codes, depend on the thread count.

Measured on a shared 2-core AMD EPYC (load ~4), bits=4 group_size=64, 8x256 calibration tokens, against the
commit before: 4 layers on 2 threads 82.0 s -> 28.2 s (2.9x); 2 layers on 1 thread 7.8 s -> 4.6 s (1.7x), the
same codes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARM = r"""
import hashlib, json, sys, time, torch
from slmkit.compress.base import Calibration, get_pass, make_config
from slmkit.model import CausalLM, ModelConfig
layers, samples, seq, threads, options = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
torch.set_num_threads(threads)
config = ModelConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
torch.manual_seed(0)
model = CausalLM(config).eval()
calib = Calibration(torch.randint(0, 2048, (samples, seq), generator=torch.Generator().manual_seed(1)))
t0 = time.perf_counter()
model, report = get_pass("quant.gptq").apply(model, make_config("quant.gptq", options), calib)
seconds = time.perf_counter() - t0
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    if name.endswith(("weight_int4", "weight_int8", "scales", "zeros")):
        digest.update(name.encode()); digest.update(t.contiguous().numpy().tobytes())
print(json.dumps({"seconds": seconds, "digest": digest.hexdigest()}))
"""


def run_arm(source: Path, args: argparse.Namespace, options: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run([sys.executable, "-c", ARM, str(args.layers), str(args.samples), str(args.seq_len),
                          str(args.threads), json.dumps(options)], env=env, capture_output=True, text=True,
                         check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another slmkit source tree (the directory holding slmkit/)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--options", default='{"bits": 4, "group_size": 64}', help="quant.gptq options as JSON")
    args = ap.parse_args()
    options = json.loads(args.options)
    arms = {"this checkout": ROOT}
    if args.baseline is not None:
        arms["baseline"] = args.baseline.resolve()
    times: dict[str, list[float]] = {a: [] for a in arms}
    digests: dict[str, set[str]] = {a: set() for a in arms}
    for _ in range(args.rounds):
        for arm, source in arms.items():
            r = run_arm(source, args, options)
            times[arm].append(r["seconds"])
            digests[arm].add(r["digest"])
    print(f"quant.gptq {options}, {args.layers} layers of 576/1536, {args.samples}x{args.seq_len} calibration "
          f"tokens, {args.threads} threads, median of {args.rounds}")
    print(f"{'arm':<16}{'seconds':>10}{'per layer':>11}  codes")
    base = statistics.median(times["baseline"]) if "baseline" in times else None
    for arm in arms:
        t = statistics.median(times[arm])
        same = "" if base is None else ("same as baseline" if digests[arm] == digests["baseline"] else "DIFFERENT")
        ratio = f" ({base / t:.1f}x)" if base is not None and arm != "baseline" else ""
        print(f"{arm:<16}{t:>10.1f}{t / args.layers:>11.2f}  {same}{ratio}")


if __name__ == "__main__":
    main()
