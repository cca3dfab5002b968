"""Structured output that is enforced or refused: OpenAI's `response_format` compiled to a token grammar.

`compile_response_format(response_format, tokenizer)` turns `{"type": "json_object"}` or
`{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}` into a `CompiledConstraint` (None for
`{"type": "text"}` or no format). Each generated sequence gets its own `ConstraintMatcher`
(`constraint.matcher(stop_ids)`); at every step the engine asks it for the tokens the grammar allows
(`allowed_mask`), sets every other logit to -inf before sampling, feeds it the sampled token (`advance`) and
ends the sequence when the grammar is complete (`is_done`). A stop token (eos) is allowed only where the grammar
accepts, so a sequence never ends on half an object; only `max_tokens` can cut one short (finish_reason
"length", as with OpenAI). Output is JSON with `", "` and `": "` separators and no other whitespace: a small
model given free whitespace can spend its whole budget on newlines.

A schema that cannot be enforced is refused with a `ConstraintError` (HTTP 400 in the server) naming the problem
and where it is: malformed JSON Schema, a keyword the grammar engine does not implement (`not`, `uniqueItems`,
`if`/`then`, `contains`, `propertyNames`, `dependentRequired`, unknown `format`s, ...), and any keyword that is
not JSON Schema at all (a typo such as `requird` is ignored by a JSON Schema validator; here it is refused,
because ignoring it would be an unenforced answer). Extension keywords starting with `x-` are ignored, and
`x-guidance` cannot switch refusals off.

Grammar engine: llguidance (Microsoft's Rust Earley parser with a token trie, `pip install llguidance`). Measured
against xgrammar 0.2.9 on SmolLM2's vocabulary of 49,152 tokens and on a 7,744-token slmkit tokenizer trained on the
standard library (four schemas, forced decoding of a valid instance, two runs each, 2 busy CPU cores):
  - compile per schema: llguidance 0.4-20 ms (its lexer is built lazily); xgrammar 8-540 ms (it precomputes
    masks), which a server pays on the request path for every new schema;
  - mask per token, median: llguidance 6-39 us, xgrammar 3-11 us; worst case 1-13 ms for either (a schema's
    first steps). Both are far below a 135M model's decode step on a CPU (tens of ms);
  - tokenizer setup, once per tokenizer (cached here): 0.1-0.5 s for either;
  - dependencies: llguidance has none (one 8 MB wheel, no torch import); xgrammar requires torch, transformers,
    apache-tvm-ffi and triton (a GPU compiler, useless on a CPU server; `pip install --dry-run xgrammar` adds it
    here) and wants a `transformers` tokenizer object.
Compile latency and the dependency footprint decide it; the per-token difference is noise next to the forward.
llguidance reads slmkit's `tokenizer.json` as it is, and refuses keywords it does not implement by itself.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

INSTALL_HINT = "pip install 'llguidance>=1.9'"

# JSON output style: fixed separators, no free whitespace (see the module docstring).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False,
                 "coerce_one_of": False}

# Every keyword of JSON Schema 2020-12 and draft-07 (core, applicator, validation, unevaluated, format, content,
# meta-data). Whether llguidance *implements* one is its own check; this list only catches words that are not
# JSON Schema at all.
_KEYWORDS = frozenset("""
$schema $id $ref $defs $anchor $dynamicRef $dynamicAnchor $recursiveRef $recursiveAnchor $vocabulary $comment
definitions allOf anyOf oneOf not if then else dependentSchemas dependencies prefixItems items additionalItems
contains properties patternProperties additionalProperties propertyNames unevaluatedItems unevaluatedProperties
type enum const multipleOf maximum exclusiveMaximum minimum exclusiveMinimum maxLength minLength pattern maxItems
minItems uniqueItems maxContains minContains maxProperties minProperties required dependentRequired format
contentEncoding contentMediaType contentSchema title description default deprecated readOnly writeOnly examples
""".split())
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("not", "if", "then", "else", "contains", "additionalProperties", "additionalItems", "propertyNames",
               "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|end|>", "<eos>")


class ConstraintError(ValueError):
    """A response_format that cannot be enforced (bad schema, unsupported keyword, not compilable, the grammar
    engine missing), or a sequence that left its grammar. The message says what and where."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("response_format needs the grammar engine llguidance, which is not installed; "
                              f"install it with: {INSTALL_HINT}  (or pip install 'slmkit[serve]')") from None
    return llguidance


# -- the compiled grammar ------------------------------------------------------------------------------

@dataclass(eq=False)
class CompiledConstraint:
    """One response_format compiled for one tokenizer. Immutable and shared by every sequence that uses it."""

    kind: str  # "json_object" | "json_schema"
    name: str | None  # json_schema.name
    schema: Any  # the JSON Schema enforced ({"type": "object"} for json_object)
    vocab_size: int  # the tokenizer's vocabulary (mask bits beyond it are never set)
    _ll_tokenizer: Any = field(repr=False)
    _template: Any = field(repr=False)  # a fresh matcher, deep-copied for every sequence (~10 us)
    _engine_eos: int = field(repr=False)  # the token llguidance treats as its eos (replaced by the row's stop ids)

    def matcher(self, stop_token_ids: set[int] | frozenset[int] | list[int] = ()) -> "ConstraintMatcher":
        """A matcher for one sequence; `stop_token_ids` (the row's eos) are allowed only where the grammar
        accepts."""
        return ConstraintMatcher(self, self._template.deep_copy(), frozenset(stop_token_ids))


class ConstraintMatcher:
    """Where one sequence is in its grammar. Not thread-safe: one sequence, one thread (the engine's)."""

    def __init__(self, compiled: CompiledConstraint, matcher, stop_ids: frozenset[int]):
        self.compiled, self._m, self.stop_ids = compiled, matcher, stop_ids
        self.tokens = 0  # tokens consumed

    def fill_bitmask(self, words: np.ndarray) -> None:
        """Write the allowed-token bitmask into `words` (int32 (ceil(V / 32),), bit t % 32 of word t // 32),
        the row's stop tokens included where the grammar accepts."""
        m = self._m
        if m.is_error():
            raise ConstraintError(f"the output left its grammar: {m.get_error()}")
        n = _words(self.compiled.vocab_size)
        if words.size < n or not words.flags.c_contiguous:
            raise ValueError(f"the bitmask needs {n} contiguous int32 words, got {words.size}")
        m.unsafe_compute_mask_ptr(words.ctypes.data, 4 * n)
        bits = words.view(np.uint32)
        eos = self.compiled._engine_eos
        bits[eos >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (eos & 31)))
        if self.stop_ids and m.is_accepting():
            for t in self.stop_ids:
                if 0 <= t < 32 * bits.size:
                    bits[t >> 5] |= np.uint32(1 << (t & 31))

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: True where the grammar allows the token next (ids past the tokenizer's vocabulary
        are never allowed)."""
        words = np.zeros(_words(max(vocab_size, self.compiled.vocab_size)), dtype=np.int32)
        self.fill_bitmask(words)
        return _unpack(words[None], vocab_size)[0]

    def advance(self, token: int) -> None:
        """Feed the sampled token. A stop token ends the sequence and is not fed. Raises ConstraintError if the
        grammar does not allow `token` (the mask was not applied)."""
        if token in self.stop_ids:
            if not self._m.is_accepting():
                raise ConstraintError(f"stop token {token} sampled before the output was complete")
            return
        if not self._m.consume_token(token):
            raise ConstraintError(f"token {token} is not allowed by the grammar after {self.tokens} tokens: "
                                  f"{self._m.get_error() or 'rejected'}")
        self.tokens += 1

    def is_done(self) -> bool:
        """True when the grammar is complete and nothing but a stop token could follow: the sequence ends here
        (finish_reason "stop")."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        return self._m.is_accepting()


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _unpack(words: np.ndarray, vocab_size: int) -> torch.Tensor:
    """(n, W) int32 bitmasks -> (n, vocab_size) bool."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")  # (n, 32 W)
    out = np.zeros((words.shape[0], vocab_size), dtype=bool)
    n = min(vocab_size, bits.shape[1])
    out[:, :n] = bits[:, :n]
    return torch.from_numpy(out)


def mask_logits_(logits: torch.Tensor, rows: list[int], matchers: list[ConstraintMatcher]) -> dict[int, str]:
    """Set to -inf, in place, every logit that `matchers[j]`'s grammar forbids in row `rows[j]` of `logits`
    (B, V); other rows are untouched. Returns {row: error message} for rows whose matcher failed or that allow no
    token at all (their logits are left as they were; the caller fails those rows).

    For 49k tokens on a CPU: ~40 us per row when the grammar's data is in cache, ~200-500 us per row inside a
    decode loop (the forward evicts it; measured on a busy 2-core machine). The bitmask is unpacked with numpy
    and written through a numpy view of the logits: a handful of small torch ops per row cost more than that."""
    V = logits.shape[-1]
    W = _words(max([V] + [m.compiled.vocab_size for m in matchers]))
    words = np.zeros((len(rows), W), dtype=np.int32)
    failed: dict[int, str] = {}
    for j, (r, m) in enumerate(zip(rows, matchers)):
        try:
            m.fill_bitmask(words[j])
        except Exception as e:
            failed[r] = str(e) if isinstance(e, ConstraintError) else f"{type(e).__name__}: {e}"
    for j, r in enumerate(rows):
        if r not in failed and not words[j].any():
            failed[r] = "the grammar allows no next token (complete, and this request has no stop token)"
    forbidden = np.unpackbits(np.invert(words).view(np.uint8), axis=-1, bitorder="little")[:, :V].view(bool)  # (n, V)
    numpy_view = logits.numpy() if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float16) \
        and not logits.requires_grad else None
    for j, r in enumerate(rows):
        if r in failed:
            continue
        if numpy_view is not None:
            np.copyto(numpy_view[r], -np.inf, where=forbidden[j])
        else:
            logits[r].masked_fill_(torch.from_numpy(forbidden[j]).to(logits.device), float("-inf"))
    return failed


# -- compiling a response_format -----------------------------------------------------------------------

_LOCK = threading.Lock()
_TOKENIZERS: "OrderedDict[int, tuple[Any, Any, int, int]]" = OrderedDict()  # id -> (tokenizer, LLTokenizer, V, eos)
_COMPILED: "OrderedDict[tuple[int, str], CompiledConstraint]" = OrderedDict()
_MAX_TOKENIZERS, _MAX_COMPILED = 4, 256


def compile_response_format(response_format: dict | None, tokenizer) -> CompiledConstraint | None:
    """OpenAI `response_format` -> a compiled grammar for `tokenizer` (a `tokenizers.Tokenizer`), or None for
    no format / `{"type": "text"}`. Raises ConstraintError for anything that cannot be enforced. Cached per
    (format, tokenizer): a repeated schema costs a dictionary lookup."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got "
                              f"{_short(response_format)}")
    kind = response_format.get("type")
    if kind not in _RESPONSE_FORMAT_TYPES:
        raise ConstraintError(f"response_format.type must be one of {', '.join(_RESPONSE_FORMAT_TYPES)}; got "
                              f"{_short(kind)}")
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        raise ConstraintError(f"response_format has unexpected field(s) {sorted(extra or {'json_schema'})} for "
                              f"type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        name, schema = None, {"type": "object"}
    else:
        name, schema = _json_schema_field(response_format.get("json_schema"))
    try:
        key_text = json.dumps([kind, name, schema], sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"response_format.json_schema.schema is not JSON: {e}") from None
    ll_tok, V, eos = _ll_tokenizer(tokenizer)
    key = (id(tokenizer), key_text)
    with _LOCK:
        hit = _COMPILED.get(key)
        if hit is not None:
            _COMPILED.move_to_end(key)
            return hit
    compiled = _compile(kind, name, schema, ll_tok, V, eos)
    with _LOCK:
        _COMPILED[key] = compiled
        while len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    return compiled


def warm_up(tokenizer) -> str | None:
    """Build the grammar engine's view of `tokenizer` now (0.2-1 s for a 50k vocabulary) rather than on the first
    request that has a response_format. None when ready; otherwise why structured output is unavailable."""
    try:
        _ll_tokenizer(tokenizer)
    except ConstraintError as e:
        return str(e)
    return None


def _json_schema_field(spec) -> tuple[str | None, Any]:
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ConstraintError(f"{where} must be an object {{\"name\": ..., \"schema\": {{...}}}}; got {_short(spec)}")
    extra = set(spec) - {"name", "schema", "strict", "description"}
    if extra:
        raise ConstraintError(f"{where} has unexpected field(s) {sorted(extra)}; expected name, schema, strict, "
                              "description")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ConstraintError(f"{where}.name must be a string, got {_short(name)}")
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise ConstraintError(f"{where}.strict must be true or false, got {_short(spec['strict'])}")
    if "schema" not in spec:
        raise ConstraintError(f"{where}.schema is missing: give the JSON Schema the output must follow")
    schema = spec["schema"]
    if schema is True:
        schema = {}
    if schema is False:
        raise ConstraintError(f"{where}.schema is false: no output can satisfy it")
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where}.schema must be a JSON Schema object, got {_short(schema)}")
    check_keywords(schema, f"{where}.schema")
    return name, schema


def check_keywords(schema, where: str = "schema", pointer: str = "#") -> None:
    """Refuse words that are not JSON Schema keywords (typos), recursively through every subschema. Keys
    starting with `x-` are extensions and pass."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where}: {pointer} must be a schema (an object or a boolean), got {_short(schema)}")
    unknown = sorted(k for k in schema if k not in _KEYWORDS and not k.startswith("x-"))
    if unknown:
        what = "is not a JSON Schema keyword" if len(unknown) == 1 else "are not JSON Schema keywords"
        raise ConstraintError(f"{where} at {pointer}: {', '.join(map(repr, unknown))} {what}; a validator would "
                              "ignore it, so it cannot be enforced (a typo? extensions start with 'x-')")
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if sub is not None:
            if not isinstance(sub, dict):
                raise ConstraintError(f"{where}: {pointer}/{key} must be an object of schemas, got {_short(sub)}")
            for name, s in sub.items():
                check_keywords(s, where, f"{pointer}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if sub is not None:
            if not isinstance(sub, list):
                raise ConstraintError(f"{where}: {pointer}/{key} must be an array of schemas, got {_short(sub)}")
            for i, s in enumerate(sub):
                check_keywords(s, where, f"{pointer}/{key}/{i}")
    for key in _SCHEMA_ONE:
        if key in schema:
            check_keywords(schema[key], where, f"{pointer}/{key}")
    items = schema.get("items")
    for i, s in enumerate(items if isinstance(items, list) else [items] if items is not None else []):
        check_keywords(s, where, f"{pointer}/items" + (f"/{i}" if isinstance(items, list) else ""))
    for name, dep in (schema.get("dependencies") or {}).items():
        if not isinstance(dep, list):
            check_keywords(dep, where, f"{pointer}/dependencies/{name}")


def _compile(kind: str, name: str | None, schema: dict, ll_tok, V: int, eos: int) -> CompiledConstraint:
    llg = _llguidance()
    label = "response_format json_object" if kind == "json_object" else \
        f"response_format.json_schema{f' {name!r}' if name else ''}"
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"{label}: cannot be compiled: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, ll_tok)
    if is_error or messages:  # a warning means part of the schema would not be enforced
        why = "; ".join(messages) or "invalid schema"
        if "Unimplemented" in why or "Unknown format" in why:
            why += " (the grammar engine cannot enforce this; remove it or express it with other keywords)"
        raise ConstraintError(f"{label}: cannot be enforced: {why}")
    template = llg.LLMatcher(ll_tok, grammar, log_level=0)
    if template.is_error():
        raise ConstraintError(f"{label}: cannot be enforced: {template.get_error()}")
    return CompiledConstraint(kind, name, schema, V, ll_tok, template, eos)


def _ll_tokenizer(tokenizer) -> tuple[Any, int, int]:
    """llguidance's view of a `tokenizers.Tokenizer` (its token trie; ~0.2-0.5 s for 50k tokens), cached. The
    tokenizer object is kept alive with it, so its id() is not reused while cached."""
    with _LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            _TOKENIZERS.move_to_end(id(tokenizer))
            return hit[1:]
    llg = _llguidance()
    if not hasattr(tokenizer, "to_str"):
        raise ConstraintError(f"response_format needs a `tokenizers.Tokenizer` (tokenizer.json); got "
                              f"{type(tokenizer).__name__}")
    eos = _engine_eos(tokenizer)
    try:
        ll_tok = llg.LLTokenizer(tokenizer.to_str(), eos_token=eos)
    except Exception as e:  # an exotic tokenizer.json llguidance cannot read
        raise ConstraintError(f"response_format: the grammar engine cannot read this tokenizer: {e}") from None
    V = ll_tok.vocab_size
    entry = (tokenizer, ll_tok, V, ll_tok.eos_token)
    with _LOCK:
        _TOKENIZERS[id(tokenizer)] = entry
        while len(_TOKENIZERS) > _MAX_TOKENIZERS:
            _TOKENIZERS.popitem(last=False)
    return entry[1:]


def _engine_eos(tokenizer) -> int | None:
    """A special token for llguidance to call eos. The engine clears that bit and allows the sequence's own stop
    tokens instead, so any special token (never part of JSON) will do; None lets llguidance pick."""
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for name in _EOS_NAMES:
        if name in specials:
            return specials[name]
    return min(specials.values()) if specials else None


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
