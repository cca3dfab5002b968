"""`slm generate` and `slm serve`: sampling from a checkpoint, in the terminal or over an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import err_console, out_console

app = typer.Typer()


@app.command()
def generate(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    prompts: List[str] = typer.Argument(..., help="One or more prompts (batched together)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass."),
    stop: List[str] = typer.Option([], help="Stop string (repeatable)."),
    seed: Optional[int] = typer.Option(None),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come (single prompt)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step: about 2x faster "
                                 "decoding after a one-off compile of a minute or more; worth it for long runs."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Enforce this JSON Schema file on every "
                                               "output, token by token (needs llguidance); a schema that cannot be "
                                               "enforced is refused."),
    json_object: bool = typer.Option(False, "--json", help="Enforce a JSON object (any keys) on every output."),
):
    """Sample continuations with a KV cache.

    Examples:

        slm generate runs/small "def parse_header(line):" -n 64 --temperature 0
        slm generate runs/small "import os" "class Queue:" --seed 0 --stop "\\n\\n"
        slm generate runs/small "A user record:" --json-schema user.schema.json --temperature 0
    """
    from ..checkpoint import load_checkpoint
    from ..serve.generate import SamplingParams, generate as run_generate

    response_format = _response_format(json_schema, json_object)
    ck = load_checkpoint(ckpt)
    tokenizer = ck.tokenizer()
    constraint = None
    if response_format is not None:
        from ..serve.constrained import ConstraintError, compile_response_format

        try:
            constraint = compile_response_format(response_format, tokenizer)
        except ConstraintError as e:
            _fail(f"{json_schema or '--json'}: {e}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop=list(stop), seed=seed)
    streaming = stream and len(prompts) == 1
    if streaming:
        out_console.print(prompts[0], end="", style="bold", markup=False, highlight=False)

    def on_token(row: int, delta: str) -> None:
        out_console.print(delta, end="", markup=False, highlight=False)

    results = run_generate(ck.model, tokenizer, list(prompts), params, on_token=on_token if streaming else None,
                           compile=compile, constraint=constraint)
    if streaming:
        out_console.print()
    else:
        for p, r in zip(prompts, results):
            out_console.rule(p[:60], style="dim")
            out_console.print(p + r.text, markup=False, highlight=False)
    rows = f" over {len(results)} rows" if len(results) > 1 else ""
    err_console.print(f"[dim]{sum(x.completion_tokens for x in results)} tokens, "
                      f"{decode_tokens_per_second(results):.1f} tok/s decode{rows}, "
                      f"finish: {', '.join(x.finish_reason for x in results)}[/]")


def _response_format(json_schema: Path | None, json_object: bool) -> dict | None:
    """--json-schema FILE / --json as an OpenAI response_format (checked before the checkpoint loads)."""
    import json

    if json_schema is not None and json_object:
        _fail("give --json-schema FILE or --json, not both")
    if json_object:
        return {"type": "json_object"}
    if json_schema is None:
        return None
    try:
        schema = json.loads(json_schema.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _fail(f"{json_schema}: schema file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(f"{json_schema}: not valid JSON: {e}")
    return {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}


def _fail(message: str):
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


def decode_tokens_per_second(results) -> float:
    """Decode throughput of one batched `generate` call. The rows decode together, so the decode lasts as
    long as its longest row (rows that finish early do not shorten it), and each row's first token comes
    from the prefill, not from a decode step. 0.0 when nothing was decoded."""
    seconds = max((r.decode_seconds for r in results), default=0.0)
    tokens = sum(max(r.completion_tokens - 1, 0) for r in results)
    return tokens / seconds if seconds > 0 else 0.0


@app.command()
def serve(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default serves this machine only; "
                             "any other address (0.0.0.0: the network) needs --api-key, or --insecure."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SLM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every /v1 request "
                                               "(or set SLM_API_KEY)."),
    max_concurrent: int = typer.Option(8, help="Sequences decoded together (continuous batching)."),
    max_queue: int = typer.Option(64, help="Sequences that may wait for a slot; beyond that requests get 503."),
    prefill_chunk: int = typer.Option(256, help="Prompt tokens prefilled per step; running streams decode "
                                      "between chunks, so a long prompt never stalls them for its whole prefill "
                                      "(0: whole prompts at once)."),
    prefix_cache_mb: float = typer.Option(256.0, "--prefix-cache-mb", envvar="SLM_PREFIX_CACHE_MB",
                                          help="Memory for the K/V of prompt prefixes reused across requests "
                                               "(system prompts, few-shot examples), in MB; 0 turns it off."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt accepted (default: the context)."),
    max_n: int = typer.Option(8, help="Largest `n` (samples per prompt) accepted."),
    log_requests: bool = typer.Option(False, "--log-requests", help="Log request bodies (prompts) and an access "
                                      "log. Off by default: prompts and completions are never logged."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16. "
                              "bfloat16 casts a float checkpoint's weights once at load; compressed checkpoints "
                              "and float16 run under autocast."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the checkpoint "
                                             "directory's name)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve a non-loopback --host without an API key "
                                  "(only on a network where everyone who can reach the port may use it)."),
):
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health), with continuous batching and streaming. Private by default: binds 127.0.0.1,
    makes no outbound connections, logs no request text. `response_format` (json_object, json_schema) is
    enforced token by token (needs llguidance); a schema that cannot be enforced is answered 400.

    Examples:

        slm serve runs/small                     # http://127.0.0.1:8000/v1, model "small"
        SLM_API_KEY=s3cret slm serve runs/small --port 9000 --max-concurrent 16
        slm serve runs/small --host 0.0.0.0 --api-key s3cret --model-name domain
        slm serve runs/small --host 0.0.0.0 --insecure    # a trusted network only: no key asked

    Then, from any OpenAI client (base_url http://127.0.0.1:8000/v1):

        curl -s localhost:8000/v1/completions -H 'Content-Type: application/json'
             -d '{"model": "small", "prompt": "def main():", "max_tokens": 32}'
    """
    from ..serve.limits import check_exposure
    from ..serve.server import serve as run_server

    try:
        check_exposure(host, api_key, insecure)  # refused before the checkpoint is loaded or a port bound
    except ValueError as e:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    if prefix_cache_mb < 0:
        err_console.print(f"[bold red]error:[/] --prefix-cache-mb must be >= 0 (0 turns it off), got {prefix_cache_mb}",
                          highlight=False)
        raise typer.Exit(2)
    run_server(ckpt, host=host, port=port, api_key=api_key, max_concurrent=max_concurrent, max_waiting=max_queue,
               prefill_chunk=prefill_chunk or None, max_body_bytes=max_body_bytes,
               max_prompt_tokens=max_prompt_tokens, max_n=max_n, log_requests=log_requests, dtype=dtype,
               device=device, model_name=model_name, insecure=insecure, prefix_cache_mb=prefix_cache_mb)
