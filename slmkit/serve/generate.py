"""Text generation: batched prefill, KV-cached decoding, sampling, stop handling and streaming.

Features:
- Sampling (`sample_next`): greedy (temperature 0), temperature, top-k, nucleus/top-p (Holtzman et al.,
  2020, "The Curious Case of Neural Text Degeneration"; at least one token is always kept) and the
  CTRL repetition penalty (Keskar et al., 2019) applied over prompt and generated tokens.
- Batches of prompts with different lengths are left-padded into one tensor. An attention mask covers
  every past and current position and `position_ids = cumsum(mask) - 1`, so each row sees exactly what
  it would see alone (its positions start at 0 and padding is never attended). The whole batch is
  prefilled in one forward; then every unfinished row decodes one token per step through the
  preallocated KV cache. Finished rows are dropped from the batch (`KVCache.select_rows`).
- A batch without padding passes `attention_mask=None` and `position_ids=None`, so a decode step
  builds no mask at all (plain attention over the cache); this is the batch-1 fast path.
- Stop conditions: stop token ids (default: the model's eos), stop strings matched on the decoded text
  (the stop string itself is not part of the output), and `max_new_tokens`.
- Structured output: `constraint` (a compiled `response_format`, see constrained.py) masks every row's logits to
  what its grammar allows, allows the stop tokens only where the grammar accepts, and ends a row ("stop") when
  its grammar is complete. The same matcher the serving engine uses.
- Streaming: `on_token(row_index, text_delta)` receives text as soon as it is final. A row's generated
  ids are decoded whole each step and only the new suffix is sent, and only when the text does not end
  in U+FFFD (a multi-byte UTF-8 character split across tokens is sent once complete). Text that could
  be the start of a stop string is held back until it is resolved. The deltas of a row always
  concatenate to its final `GenerationResult.text`.

Length policy: the longest prompt plus `max_new_tokens` must fit `max_position_embeddings`; otherwise
`generate` raises a ValueError naming both numbers (it never truncates a prompt silently).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..compress.fuse import fuse_projections
from ..compress.qlinear import prompt_prefill

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output
    seed: int | None = None  # None: torch's global generator
    stop_token_ids: list[int] | None = None  # None: the model's eos_token_id; []: never stop on a token
    repetition_penalty: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64):
            # torch.Generator.manual_seed accepts an int64 or a uint64, and raises a bare RuntimeError otherwise
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.stop_token_ids is not None and any(not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # sampled tokens, without a terminating stop token
    finish_reason: str  # "stop" (stop token or stop string) | "length" (max_new_tokens)
    prompt_tokens: int  # including bos
    completion_tokens: int  # tokens sampled, including a terminating stop token
    prefill_seconds: float  # the batch's prompt forward and first sample (time to first token)
    decode_seconds: float  # from the first token to this row's last


# -- sampling ------------------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (B, V) -> (B,) token ids. Pure: `logits` is not modified."""
    if params.temperature == 0 or params.top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= params.top_p  # the top token has mass_before 0, so it is kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: the logits of tokens already seen (bool (B, V)) move towards "less likely"."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# -- batching ------------------------------------------------------------------------------------

def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Left-pad token lists into (input_ids (B, S), attention_mask (B, S), position_ids (B, S)).
    Mask and positions are None when every row has the same length (no padding to hide)."""
    S = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (S - len(r)) + r for r in rows], dtype=torch.long, device=device)
    if all(len(r) == S for r in rows):
        return ids, None, None
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # every row's first real token is at position 0
    return ids, mask, positions


def encode_prompts(tokenizer, prompts: list[str], bos_id: int | None) -> list[list[int]]:
    rows = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p, add_special_tokens=False).ids
        rows.append(([bos_id] if bos_id is not None else []) + ids)
        if not rows[-1]:
            raise ValueError(f"prompt {i} encodes to no tokens (empty prompt and no bos token); "
                             "give some text or keep bos=True with a model that has bos_token_id")
    return rows


def stop_token_ids(params: SamplingParams, config) -> set[int]:
    """The token ids that end a row: `params.stop_token_ids`, or the model's eos when that is None."""
    if params.stop_token_ids is not None:
        return set(params.stop_token_ids)
    return {config.eos_token_id} if config.eos_token_id is not None else set()


# -- one row's output ----------------------------------------------------------------------------

class RowOutput:
    """Collects one row's tokens and decides, token by token, what text is final and whether it ends.
    Shared by `generate` and the continuous-batching engine (engine.py)."""

    def __init__(self, index: int, prompt_tokens: int, tokenizer, params: SamplingParams,
                 stop_ids: set[int], on_token: Callable[[int, str], None] | None):
        self.index, self.prompt_tokens, self.tokenizer = index, prompt_tokens, tokenizer
        self.params, self.stop_ids, self.on_token = params, stop_ids, on_token
        self.track_text = bool(params.stop) or on_token is not None
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.ids: list[int] = []
        self.text, self.emitted, self.search_from = "", 0, 0
        self.finish_reason: str | None = None
        self.ended_by_token = False
        self.decode_seconds = 0.0
        self.matcher = None  # a ConstraintMatcher when the output must follow a grammar

    def push(self, token: int) -> bool:
        """Add a sampled token; True when the row has finished."""
        if token in self.stop_ids:
            self.ended_by_token = True
            return self._finish("stop")
        self.ids.append(token)
        if self.track_text:
            text = self.tokenizer.decode(self.ids)
            if not text.endswith(REPLACEMENT_CHAR):  # else: wait for the rest of a multi-byte character
                cut = self._find_stop(text)
                if cut >= 0:
                    return self._finish("stop", text[:cut])
                self._emit(text, len(text) - self._held_back(text))
        if len(self.ids) >= self.params.max_new_tokens:
            return self._finish("length")
        return False

    def _find_stop(self, text: str) -> int:
        hits = [i for i in (text.find(s, self.search_from) for s in self.params.stop) if i >= 0]
        # An occurrence not found now must end past the current text, so it starts after this point.
        self.search_from = max(0, len(text) - self.max_stop + 1)
        return min(hits, default=-1)

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(self.max_stop - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.params.stop):
                return k
        return 0

    def _emit(self, text: str, upto: int) -> None:
        if upto > self.emitted:
            if self.on_token is not None:
                self.on_token(self.index, text[self.emitted:upto])
            self.emitted = upto

    def finish(self, reason: str) -> bool:
        """End the row now (e.g. its grammar is complete); always True."""
        return self._finish(reason)

    def _finish(self, reason: str, text: str | None = None) -> bool:
        self.finish_reason = reason
        self.text = text if text is not None else self.tokenizer.decode(self.ids)
        self._emit(self.text, len(self.text))
        return True

    def result(self, prefill_seconds: float) -> GenerationResult:
        return GenerationResult(text=self.text, token_ids=self.ids, finish_reason=self.finish_reason,
                                prompt_tokens=self.prompt_tokens,
                                completion_tokens=len(self.ids) + int(self.ended_by_token),
                                prefill_seconds=prefill_seconds, decode_seconds=self.decode_seconds)


# -- the engine ----------------------------------------------------------------------------------

def generate(model, tokenizer, prompts: list[str] | str, params: SamplingParams | None = None, *,
             on_token: Callable[[int, str], None] | None = None, bos: bool = True,
             dtype: torch.dtype | None = None, compile: bool = False, constraint=None) -> list[GenerationResult]:
    """Generate a continuation for each prompt (a `tokenizers.Tokenizer` encodes and decodes).

    Returns one `GenerationResult` per prompt, in order (a list even for a single string). `on_token`
    streams `(prompt_index, text_delta)`. `dtype` (e.g. torch.bfloat16) runs the model under autocast
    with a cache of that dtype; None runs in the model's own dtype. `compile=True` runs decode steps
    through `torch.compile` (dynamic shapes; compiled once per model class and reused): the first
    call pays the compilation (tens of seconds on a CPU), later calls decode faster. `constraint` (from
    `constrained.compile_response_format`) enforces a JSON grammar on every row."""
    params = params or SamplingParams()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        return []
    cfg = model.config
    rows = encode_prompts(tokenizer, prompts, cfg.bos_token_id if bos else None)
    longest = max(len(r) for r in rows)
    if longest + params.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                         f"model's context of {cfg.max_position_embeddings} (max_position_embeddings); "
                         "shorten the prompt or lower max_new_tokens")
    stop_ids = stop_token_ids(params, cfg)
    outputs = [RowOutput(i, len(r), tokenizer, params, stop_ids, on_token) for i, r in enumerate(rows)]
    if constraint is not None:
        if constraint.vocab_size > cfg.vocab_size:
            raise ValueError(f"the constraint was compiled for a tokenizer of {constraint.vocab_size} tokens; the "
                             f"model has {cfg.vocab_size}")
        for out in outputs:
            out.matcher = constraint.matcher(stop_ids)
    fuse_projections(model)  # quantized q/k/v and gate/up as one matmul each (compress/fuse.py)
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    autocast = dtype is not None and dtype != model_dtype
    amp = torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        prefill_seconds = _run(model, rows, outputs, params, device, dtype if autocast else None, compile)
    return [o.result(prefill_seconds) for o in outputs]


_COMPILED: dict[type, Callable] = {}


def _compiled_forward(cls: type) -> Callable:
    # Keyed by class, not instance: the compiled function takes the model as an argument, so no model
    # is kept alive here, and dynamo's guards tell models (and their shapes) apart.
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
    return _COMPILED[cls]


def _run(model, rows: list[list[int]], outputs: list[RowOutput], params: SamplingParams,
         device: torch.device, cache_dtype: torch.dtype | None, compile: bool) -> float:
    """Prefill then decode until every row finishes; fills `outputs`, returns the prefill seconds."""
    cfg = model.config
    decode_step = functools.partial(_compiled_forward(type(model)), model) if compile else model
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    input_ids, mask, positions = left_pad(rows, pad_id, device)  # (B, S0)
    B, S0 = input_ids.shape
    cache = model.new_cache(B, S0 + params.max_new_tokens, dtype=cache_dtype)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None  # (B, V) tokens already in each row, for the repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for r, ids in enumerate(rows):
            seen[r, ids] = True

    start = time.perf_counter()
    with prompt_prefill():  # quantized layers in bf16 where the CPU multiplies it natively
        logits = model(input_ids, position_ids=positions, attention_mask=mask, cache=cache, last_only=True)
    active = list(range(B))  # batch position -> prompt index
    prefill_seconds = decode_start = None
    while True:
        logits = logits[:, -1].float()  # (b, V)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        if outputs[0].matcher is not None:
            _constrain(logits, [outputs[i].matcher for i in active])
        next_ids = sample_next(logits, params, generator)  # (b,)
        tokens = next_ids.tolist()
        now = time.perf_counter()
        if prefill_seconds is None:
            prefill_seconds, decode_start = now - start, now
        still = []
        for j, tok in enumerate(tokens):
            out = outputs[active[j]]
            if out.matcher is not None:
                out.matcher.advance(tok)
            if out.push(tok) or (out.matcher is not None and out.matcher.is_done() and out.finish("stop")):
                out.decode_seconds = now - decode_start
            else:
                still.append(j)
        if not still:
            return prefill_seconds
        if seen is not None:
            seen[torch.arange(len(tokens), device=device), next_ids] = True
        if len(still) < len(active):  # drop finished rows from the batch and its cache
            keep = torch.tensor(still, device=device)
            cache.select_rows(keep)
            next_ids = next_ids[keep]
            mask = mask[keep] if mask is not None else None
            positions = positions[keep] if positions is not None else None
            seen = seen[keep] if seen is not None else None
            active = [active[j] for j in still]
        if mask is not None:  # the mask grows by one real column; positions move on by one
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (b, S + 1)
            positions = positions[:, -1:] + 1  # (b, 1)
        logits = decode_step(next_ids[:, None], position_ids=positions, attention_mask=mask,
                             cache=cache, last_only=True)


def _constrain(logits: torch.Tensor, matchers: list) -> None:
    """Mask `logits` (b, V) in place to what each row's grammar allows; raise if a grammar cannot go on."""
    from .constrained import ConstraintError, mask_logits_

    failed = mask_logits_(logits, list(range(len(matchers))), matchers)
    if failed:
        row, why = next(iter(failed.items()))
        raise ConstraintError(f"structured output failed in batch row {row}: {why}")
