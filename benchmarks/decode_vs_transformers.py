"""Decode speed at batch 1: slmkit's `generate` against transformers' `generate`, same weights, one run.

Builds a random slmkit model from a preset, saves it as a checkpoint, exports it to Hugging Face format
(`slmkit.export.export_hf`; the checkpoint directory itself where that is unavailable) and loads it
with `transformers.LlamaForCausalLM`. Both engines decode greedily from the same 32-token prompt for
exactly N new tokens (no stop token), on the same thread count.

Decode tokens/s = (N - 1) / (t(N) - t(1)): the time of a full generation minus the time of a
generation of one token (prompt forward + first token), so prompt processing and per-call setup
cancel out the same way for both engines. The engines take turns: after a warm-up of each, every one of
`--repeats` rounds times a full and a one-token generation of each engine (the order rotating per round),
so a slow phase of a shared machine falls on both alike; medians over the rounds.

    python benchmarks/decode_vs_transformers.py --preset small --new-tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from slmkit.checkpoint import save_checkpoint
from slmkit.model import CausalLM, resolve_model_config
from slmkit.serve.generate import SamplingParams, generate

PROMPT_TOKENS = 32


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over `w0 .. w{V-1}`: every model id is one token, so a prompt is exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins with spaces
    return tok


def to_hf_dir(ckpt: Path, work: Path) -> Path:
    try:
        from slmkit.export import export_hf
    except ImportError:
        return ckpt  # config.json is HF-compatible; transformers reads the checkpoint directly
    with warnings.catch_warnings():  # the random model has no tokenizer, which the export points out
        warnings.simplefilter("ignore")
        return export_hf(ckpt, work / "hf")


def interleaved_times(engines: dict, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of an n-token and of a 1-token generation per engine, the engines taking turns."""
    for fn in engines.values():  # warm-up
        fn(n), fn(1)
    names = list(engines)
    times = {name: ([], []) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for lengths, k in zip(times[name], (n, 1)):
                t0 = time.perf_counter()
                engines[name](k)
                lengths.append(time.perf_counter() - t0)
    return {name: (statistics.median(full), statistics.median(one)) for name, (full, one) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and compute dtype for both engines")
    ap.add_argument("--compile", action="store_true", help="also time slmkit with generate(compile=True)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    N = args.new_tokens

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = resolve_model_config(args.preset, vocab_size=args.vocab,
                                  max_position_embeddings=max(2048, PROMPT_TOKENS + N))
    model = CausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(model, Path(tmp) / "ckpt")
        hf = LlamaForCausalLM.from_pretrained(to_hf_dir(ckpt, Path(tmp)), dtype=torch.float32).eval()
    model.to(dtype)
    hf.to(dtype)

    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, args.vocab, (1, PROMPT_TOKENS), generator=g)
    tok = word_tokenizer(args.vocab)
    prompt = " ".join(f"w{i}" for i in prompt_ids[0].tolist())
    assert tok.encode(prompt).ids == prompt_ids[0].tolist()

    def slm(n: int, compile: bool = False):
        p = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=[])
        return generate(model, tok, prompt, p, bos=False, compile=compile)[0]

    def hf_gen(n: int):
        with torch.inference_mode():
            return hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[0, PROMPT_TOKENS:]

    ours, theirs = slm(N), hf_gen(N)
    assert len(ours.token_ids) == N and len(theirs) == N, (len(ours.token_ids), len(theirs))
    agree = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.tolist())) if a != b), N)

    engines = {"slmkit": slm}
    if args.compile:
        t0 = time.perf_counter()
        assert slm(N, compile=True).token_ids == ours.token_ids
        print(f"slmkit compile=True: first call (compiles) {time.perf_counter() - t0:.1f} s")
        engines["slmkit+compile"] = lambda n: slm(n, compile=True)
    engines["transformers"] = hf_gen  # last: the baseline row
    rows = [(name, (N - 1) / (t_full - t_one), N / t_full, t_one * 1e3)
            for name, (t_full, t_one) in interleaved_times(engines, N, args.repeats).items()]

    print(f"preset={args.preset} vocab={args.vocab} params={model.num_parameters():,} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} prompt={PROMPT_TOKENS} new_tokens={N} repeats={args.repeats} "
          f"(engines interleaved, median of the rounds after warm-up)")
    print(f"greedy tokens identical for the first {agree}/{N} positions")
    print(f"{'engine':<14}{'decode tok/s':>14}{'end-to-end tok/s':>18}{'first token ms':>16}")
    for name, decode, e2e, first in rows:
        print(f"{name:<14}{decode:>14.1f}{e2e:>18.1f}{first:>16.2f}")
    base = rows[-1]
    for name, decode, e2e, _ in rows[:-1]:
        print(f"ratio {name} / transformers: decode {decode / base[1]:.2f}x, end-to-end {e2e / base[2]:.2f}x")


if __name__ == "__main__":
    main()
