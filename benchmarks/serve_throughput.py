"""Serving throughput: the HTTP server (`slm serve`) against the engine called directly, in one run.

Builds a random-weight model from a preset (default `small`) with a byte-level BPE tokenizer trained on a
slice of the standard library, saves it as a checkpoint, starts `slm serve` on it in a child process
(the product path: its own interpreter, uvicorn, the engine thread), and measures from this process:

- single-stream decode tokens/s: a streaming request, tokens after the first / time from the first to
  the last chunk, against the same measure on `Engine` called directly here (first to last Delta);
  target: HTTP overhead <= 10%;
- aggregate decode tokens/s with 8 concurrent streaming clients against 1 (all tokens / wall time from
  the first request to the last finish); target: >= 4x (continuous batching);
- time to first token at batch 1 for a 256-token prompt, over HTTP and direct;
- stall: the longest gap between two tokens of a running stream while a 768-token prompt is admitted
  (direct), prefilled in chunks of 256 tokens (the default) against all at once (`prefill_chunk=None`);
- `n` choices of one 256-token prompt (direct, 16 tokens each): wall time with the prompt prefilled once
  for all choices against prefilled once per choice (`Engine.share_prefill` off).

Medians of `--repeats`. Both sides run with the same torch thread count (`--threads`).

    python benchmarks/serve_throughput.py --preset small --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data.tokenizer import special_token_ids, tokenizer_config, train_tokenizer
from slmkit.model import CausalLM, resolve_model_config
from slmkit.serve.engine import Delta, Engine, EngineRequest, Finished
from slmkit.serve.generate import SamplingParams


def stdlib_texts(max_bytes: int = 400_000) -> list[str]:
    texts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(f.read_text(errors="replace"))
        total += len(texts[-1])
        if total > max_bytes:
            break
    return texts


def build_checkpoint(preset: str, out: Path) -> Path:
    tok = train_tokenizer(stdlib_texts(), vocab_size=4096)
    tok_dir = out.parent / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, special_token_ids(tok))))
    torch.manual_seed(0)
    model = CausalLM(resolve_model_config(preset, vocab_size=tok.get_vocab_size(), max_position_embeddings=1024))
    return save_checkpoint(model, out, tokenizer_from=tok_dir)


def start_server(ckpt: Path, threads: int, max_concurrent: int, device: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(ckpt), "--port", str(port),
                             "--model-name", "bench", "--max-concurrent", str(max_concurrent), "--device", device],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.ConnectError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("slm serve did not start")
            time.sleep(0.1)


def http_stream(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion: times of the request, first and last token chunks, and the token count."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:  # text chunks, then the one that carries finish_reason
                last = time.perf_counter()
                first = first or last
    return {"start": t0, "first": first, "last": last, "tokens": tokens}


def direct_stream(engine: Engine, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    req = EngineRequest(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0))
    for ev in engine.stream(req):
        if isinstance(ev, (Delta, Finished)):
            last = time.perf_counter()
            first = first or last
        if isinstance(ev, Finished):
            tokens = ev.completion_tokens
    return {"start": t0, "first": first, "last": last, "tokens": tokens}


def n_choices(engine: Engine, prompt: list[int], n: int, share: bool) -> float:
    """Seconds until all n sampled choices of one prompt (16 tokens each), queued together, are finished."""
    engine.share_prefill = share
    done = threading.Semaphore(0)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    t0 = time.perf_counter()
    engine.submit_all([(EngineRequest(prompt, params), lambda ev: isinstance(ev, Finished) and done.release())
                       for _ in range(n)])
    for _ in range(n):
        done.acquire()
    engine.share_prefill = True
    return time.perf_counter() - t0


def stall(engine: Engine, prompt: list[int], long_prompt: list[int], chunk: int | None) -> float:
    """Longest gap (s) between consecutive tokens of a running stream while `long_prompt` is admitted: from
    the token before it arrives to two tokens after its own first token."""
    engine.prefill_chunk = chunk
    times: list[float] = []
    after_long = threading.Semaphore(0)
    state = {"long_done": False}

    def on_long(ev):
        if isinstance(ev, Finished):
            state["long_done"] = True

    def on_event(ev):
        if isinstance(ev, Delta):
            times.append(time.perf_counter())
            if len(times) == 8:  # the stream is running: the long prompt arrives
                engine.submit(EngineRequest(long_prompt, SamplingParams(max_new_tokens=1, temperature=0)), on_long)
            elif state["long_done"]:
                after_long.release()

    handle = engine.submit(EngineRequest(prompt, SamplingParams(max_new_tokens=400, temperature=0,
                                                                stop_token_ids=[])), on_event)
    for _ in range(2):
        after_long.acquire(timeout=120)
    handle.cancel()
    engine.prefill_chunk = 256
    after = times[7:]
    return max(b - a for a, b in zip(after, after[1:]))


def decode_rate(run: dict) -> float:
    return (run["tokens"] - 1) / (run["last"] - run["first"])


def concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> float:
    """Aggregate decode tokens/s of len(prompts) streaming clients started together."""
    runs: list[dict] = [None] * len(prompts)

    def worker(i):
        with httpx.Client() as c:
            runs[i] = http_stream(c, url, prompts[i], max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["first"] for r in runs)
    end = max(r["last"] for r in runs)
    return sum(r["tokens"] - 1 for r in runs) / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side (server, direct)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the server then runs bf16 autocast, as here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.preset, Path(tmp) / args.preset)
        ck = load_checkpoint(ckpt, device=args.device)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else None  # what `slm serve --dtype auto` picks
        tok = ck.tokenizer()
        words = " ".join(stdlib_texts(60_000))
        ids = tok.encode(words).ids
        bos = ck.config.bos_token_id
        prompt = [bos] + ids[:31]  # 32 tokens
        prompts = [[bos] + ids[i * 40:i * 40 + 31] for i in range(args.clients)]
        long_prompt = [bos] + ids[1000:1255]  # 256 tokens
        very_long = [bos] + ids[2000:2767]  # 768 tokens
        proc, url = start_server(ckpt, args.threads, args.clients, args.device)
        rows = {}
        try:
            with Engine(ck.model, tok, max_concurrent=args.clients, dtype=dtype) as engine, httpx.Client() as client:
                http_stream(client, url, prompt, 8)  # warm-up both sides
                direct_stream(engine, prompt, 8)
                single_http, single_direct, ttft_http, ttft_direct, agg_1, agg_n = [], [], [], [], [], []
                n_each, n_shared, stall_whole, stall_chunked = [], [], [], []
                for _ in range(args.repeats):  # the two sides take turns inside each repeat
                    single_direct.append(decode_rate(direct_stream(engine, prompt, args.tokens)))
                    single_http.append(decode_rate(http_stream(client, url, prompt, args.tokens)))
                    r = direct_stream(engine, long_prompt, 1)
                    ttft_direct.append(r["first"] - r["start"])
                    r = http_stream(client, url, long_prompt, 1)
                    ttft_http.append(r["first"] - r["start"])
                    agg_1.append(concurrent(url, prompts[:1], args.tokens))
                    agg_n.append(concurrent(url, prompts, args.tokens))
                    n_each.append(n_choices(engine, long_prompt, args.clients, share=False))
                    n_shared.append(n_choices(engine, long_prompt, args.clients, share=True))
                    stall_whole.append(stall(engine, prompt, very_long, None))
                    stall_chunked.append(stall(engine, prompt, very_long, 256))
            med = statistics.median
            rows = {
                "decode tok/s, 1 stream: HTTP vs engine direct": (med(single_http), med(single_direct)),
                f"aggregate decode tok/s, HTTP: {args.clients} streams vs 1": (med(agg_n), med(agg_1)),
                "time to first token, 256-token prompt (ms): HTTP vs direct": (1000 * med(ttft_http),
                                                                               1000 * med(ttft_direct)),
                "longest token gap of a stream while a 768-token prompt joins (ms): whole vs 256-chunks": (
                    1000 * med(stall_whole), 1000 * med(stall_chunked)),
                f"n={args.clients} choices of a 256-token prompt (ms): each prefilled vs shared": (
                    1000 * med(n_each), 1000 * med(n_shared)),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    print(f"\npreset {args.preset}, {ck.model.num_parameters():,} parameters, {where}, "
          f"{args.tokens} tokens per request, medians of {args.repeats}")
    print(f"{'measure':<84} {'value':>10} {'baseline':>10} {'ratio':>7}")
    for name, (value, base) in rows.items():
        print(f"{name:<84} {value:>10.1f} {base:>10.1f} {value / base:>6.2f}x")


if __name__ == "__main__":
    main()
