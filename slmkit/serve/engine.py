"""Continuous-batching generation engine: one scheduler thread owns the model, requests join and leave
the running batch between decode steps.

Scheduling is iteration-level (Yu et al., 2022, "Orca: A Distributed Serving System for Transformer-Based
Generative Models"): every iteration of the scheduler thread
  1. admits waiting requests while fewer than `max_concurrent` sequences run and no prefill is under way:
     the newcomers are prefilled together as one left-padded batch;
  2. runs the next chunk of that prefill, at most `prefill_chunk` prompt tokens (chunked prefill, as in
     Agrawal et al., 2024, "Sarathi-Serve"); after the last chunk their first token is sampled and they
     are merged into the running batch;
  3. decodes one token for every running sequence in one forward pass;
  4. retires the sequences that finished (stop token, stop string, `max_new_tokens`) or were cancelled,
     which frees their slots for the next iteration's admissions.
A request therefore waits for at most one decode step before its prefill starts, never for a whole batch to
end, and a long prompt delays the running sequences by one chunk per step instead of its whole prefill.

Batch layout: one KV cache shared by all running rows, left-padded as in `generate.py`. Row r's n_r
tokens sit at the right end of the cache, columns [L - n_r, L) with L = `cache.length`; an attention mask
(B, L) marks the real columns and each row has its own position ids, so a row computes exactly what it
would compute alone. Merging two batches left-pads the shorter cache to the longer one's length and
concatenates along the batch axis (one copy of the running cache per admission, not per step). When rows
leave, the columns that are padding for every remaining row are cut from the left, so a long request that
finished leaves no padding behind. While no row is padded, decode steps pass no mask at all (the
batch-1 fast path of `generate`).

Sampling and stop handling are `generate.py`'s (`sample_next`, `RowOutput`), per row: rows with equal
(temperature, top_k, top_p) and no seed are sampled together; a request with a `seed` samples from its
own `torch.Generator`, so its tokens do not depend on what else shares the batch (and equal
`generate(..., seed=s)` for one prompt). Log-probabilities are the log-softmax of the model's raw logits
(before temperature, top-k/top-p and repetition penalty), which is what OpenAI's API reports.

Structured output (constrained.py): a request with a `constraint` (a compiled `response_format`) gets its own
grammar matcher. Before sampling, every logit its grammar forbids is set to -inf in its row only (rows without a
constraint are untouched), on the greedy, grouped and seeded paths alike; its stop tokens are allowed only where
the grammar accepts, and the row finishes with "stop" as soon as the grammar is complete. For such a row the
reported logprobs are those of the masked distribution (the log-softmax over the tokens the grammar allowed,
before temperature etc.), so `top_logprobs` only lists tokens that could have been chosen. A row whose matcher
fails fails alone (`Failed`), and its slot is freed like any finished row's. Stop strings and `max_new_tokens` still end
a constrained row where they hit ("stop" / "length"), so its text can then be incomplete JSON.

Identical prompts admitted together (the `n` choices of one request, queued at once by `submit_all`) are
prefilled once and their cache rows copied.

Prompt-prefix reuse across requests (prefix_cache.py): after a prefill, the K/V of every complete block of
`prefix_block` prompt tokens is kept in an LRU store keyed by the hash chain of the block tokens, within
`prefix_cache_mb`. A newcomer takes the longest run of its leading blocks found there (always leaving its last
prompt token to compute): in the left-padded prefill batch the columns before the first one that some row
still has to compute are copied in from the store instead of computed, and the prefill (chunked as usual)
starts at that column: the earliest column some row still needs, so a row whose cached run reaches further
recomputes the rest of it (as a short row computes padding). So that a prompt with nothing cached does not make
the others recompute theirs, newcomers that found a cached prefix are admitted first and the rest wait for
that (short) prefill, each at most once. Rows that want prompt logprobs (`echo`) need the logits of every prompt position, which
stored K/V cannot give, so they never read from the store (they still add their blocks to it). A prefill's blocks
are stored after its rows' first tokens are sampled. Models whose cache is not a plain KV cache (Linformer,
Transformer-XL memory) bypass the store, as the log says at start.

Limits of this design: newcomers arriving during a chunked prefill wait for it to end; chunks of one
prefill run in sequence with the decode steps, not fused with them into one forward pass; prompts admitted
together that share a prefix nobody has prefilled yet each compute it (the store fills when their prefill
ends), and generated tokens are not stored, only prompts. Linformer models compress the cache in fixed blocks of
cache columns, so under padding their batched outputs match the unbatched ones only approximately (see
slmkit/model/linformer.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..compress.fuse import fuse_projections
from ..compress.qlinear import prompt_prefill
from ..model.cache import KVCache
from .constrained import CompiledConstraint, ConstraintError, mask_logits_
from .generate import RowOutput, SamplingParams, apply_repetition_penalty, left_pad, sample_next, stop_token_ids
from .prefix_cache import PrefixCache, unsupported_reason

log = logging.getLogger("slmkit.serve.engine")

PREFIX_CACHE_MB = 256.0  # default store for prompt-prefix K/V; the SLM_PREFIX_CACHE_MB variable overrides it
PREFIX_BLOCK = 64  # prompt tokens per stored block: the granularity of reuse


class EngineBusy(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


# -- requests and events -----------------------------------------------------------------------------

@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # per generated token: its logprob and the `logprobs` most likely tokens
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (OpenAI `echo`)
    score_only: bool = False  # prefill only: no token is generated (OpenAI `max_tokens=0` with `echo`)
    constraint: CompiledConstraint | None = None  # enforced response_format (constrained.compile_response_format)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, most likely first


@dataclass
class Delta:
    """What one decode step added to a request: text that is now final (may be empty while a stop string
    or a split multi-byte character is unresolved), the sampled token and, when asked for, its logprob."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a row's first Delta, when requested


@dataclass
class Finished:
    text: str
    token_ids: list[int]  # without a terminating stop token
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int  # including a terminating stop token
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token; the first is None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids
    time_to_first_token: float = 0.0  # seconds from submit to the first sampled token
    seconds: float = 0.0  # from submit to finish


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


class RequestHandle:
    """Returned by `Engine.submit`; `cancel()` frees the request's slot at the next scheduler step, and a
    request still waiting leaves the queue at once (it no longer counts against `max_waiting`)."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self._row: "_Row | None" = None
        self.cancelled = False

    def cancel(self) -> None:
        self._engine._cancel(self)


# -- one running sequence ----------------------------------------------------------------------------

class _Row:
    def __init__(self, request: EngineRequest, on_event: Callable[[Event], None], handle: RequestHandle,
                 tokenizer, config, device: torch.device):
        self.request, self.params, self.on_event, self.handle = request, request.params, on_event, handle
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._pending = ""  # text the RowOutput released during the current push
        stop_ids = stop_token_ids(self.params, config)
        self.output = RowOutput(0, len(request.prompt_ids), tokenizer, self.params, stop_ids, self._collect)
        self.matcher = None  # the row's place in its grammar, when its output is constrained
        if request.constraint is not None and not request.score_only:
            self.matcher = request.constraint.matcher(stop_ids)
        self.generator = None
        if self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        self.seen = None  # (V,) tokens already in the row, for the repetition penalty
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(config.vocab_size, dtype=torch.bool, device=device)
            self.seen[request.prompt_ids] = True
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.ended = False  # Finished or Failed was sent: a listener gets exactly one of them
        self.deferred = False  # held back once so that newcomers reusing a cached prefix prefill without it
        handle._row = self

    def _collect(self, _index: int, text: str) -> None:
        self._pending += text

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output.ids)

    def emit(self, event: Event) -> None:
        if self.ended:
            return
        self.ended = isinstance(event, (Finished, Failed))
        try:
            self.on_event(event)
        except Exception:  # a listener that went away (closed event loop) only loses its own request
            log.exception("event listener failed; cancelling its request")
            self.handle.cancelled = True

    def push(self, token: int, lp: TokenLogprob | None, now: float) -> bool:
        """Add a sampled token, send what became final; True when the row has finished."""
        if self.first_token_at is None:
            self.first_token_at = now
        if self.seen is not None:
            self.seen[token] = True
        if self.matcher is not None:
            self.matcher.advance(token)  # ConstraintError if the grammar refuses it: the caller fails this row
        done = self.output.push(token)
        if not done and self.matcher is not None and self.matcher.is_done():
            done = self.output.finish("stop")  # the grammar is complete: nothing but eos could follow
        kept = not self.output.ended_by_token  # a stop token is not part of the output
        if lp is not None and kept:
            self.logprobs.append(lp)
        text, self._pending = self._pending, ""
        if text or kept:
            first = len(self.output.ids) <= 1
            self.emit(Delta(text, [token] if kept else [], [lp] if lp is not None and kept else [],
                            self.prompt_logprobs if first else None))
        if done:
            self.finish()
        return done

    def finish(self, reason: str | None = None) -> None:
        out, now = self.output, time.perf_counter()
        want_lp = self.request.logprobs is not None
        self.emit(Finished(text=out.text, token_ids=out.ids, finish_reason=reason or out.finish_reason,
                           prompt_tokens=out.prompt_tokens,
                           completion_tokens=len(out.ids) + int(out.ended_by_token),
                           prompt_logprobs=self.prompt_logprobs, logprobs=self.logprobs if want_lp else None,
                           time_to_first_token=(self.first_token_at or now) - self.submitted,
                           seconds=now - self.submitted))


def _token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs: (T, V) log-softmax; chosen: (T,) ids -> one TokenLogprob per position with its top k."""
    picked = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
    if k > 0:
        top_v, top_i = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (T, k)
        tops = [[(t, x) for t, x in zip(i, v) if x != float("-inf")] for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(chosen.tolist(), picked, tops)]


# -- the running batch -------------------------------------------------------------------------------

class _Batch:
    """Running rows with one left-padded KV cache. Every row has one sampled token (`next_ids`) that is
    not in the cache yet; it is the input of the next decode step."""

    def __init__(self, rows: list[_Row], cache, mask: torch.Tensor, lengths: list[int], next_ids: torch.Tensor):
        self.rows, self.cache, self.mask, self.lengths, self.next_ids = rows, cache, mask, lengths, next_ids

    @property
    def padded(self) -> bool:
        return any(n != self.cache.length for n in self.lengths)

    def keep(self, idx: list[int]) -> "_Batch | None":
        """Only the rows `idx`; columns that are padding for all of them are cut from the left."""
        if not idx:
            return None
        if len(idx) < len(self.rows):
            sel = torch.tensor(idx, device=self.mask.device)
            self.cache.select_rows(sel)
            self.rows = [self.rows[i] for i in idx]
            self.lengths = [self.lengths[i] for i in idx]
            self.mask, self.next_ids = self.mask[sel], self.next_ids[sel]
        cut = self.cache.length - max(self.lengths)
        if cut > 0:
            self.cache.drop_columns(cut)
            self.mask = self.mask[:, cut:]
        return self


def _env_prefix_cache_mb() -> float:
    raw = os.environ.get("SLM_PREFIX_CACHE_MB")
    if raw is None or not raw.strip():
        return PREFIX_CACHE_MB
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"SLM_PREFIX_CACHE_MB={raw!r} is not a number of megabytes (0 turns the prefix cache "
                         "off)") from None


def _merge(model, a: _Batch | None, b: _Batch) -> _Batch:
    """One batch holding a's rows then b's, both right-aligned in a cache with room for every row's
    remaining tokens."""
    if a is None:
        return b
    La, Lb = a.cache.length, b.cache.length
    L, Ba, Bb = max(La, Lb), len(a.rows), len(b.rows)
    room = max(r.remaining for r in a.rows + b.rows)
    cache = model.new_cache(Ba + Bb, L + room, dtype=a.cache.keys[0].dtype)
    for dst, src_a, src_b in ((cache.keys, a.cache.keys, b.cache.keys), (cache.values, a.cache.values, b.cache.values)):
        for layer in range(len(dst)):
            dst[layer][:Ba, :, L - La:L] = src_a[layer][:, :, :La]  # (Ba, n_kv, La, hd)
            dst[layer][Ba:, :, L - Lb:L] = src_b[layer][:, :, :Lb]  # (Bb, n_kv, Lb, hd)
    cache.length = L
    mask = a.mask.new_zeros(Ba + Bb, L)  # (B, L)
    mask[:Ba, L - La:], mask[Ba:, L - Lb:] = a.mask, b.mask
    return _Batch(a.rows + b.rows, cache, mask, a.lengths + b.lengths, torch.cat([a.next_ids, b.next_ids]))


@dataclass
class _Prefill:
    """Newcomers being prefilled, possibly over several scheduler iterations (chunked prefill)."""
    rows: list[_Row]
    src: list[int] | None  # row i's prefill row (identical prompts share one), None: row i is prefill row i
    input_ids: torch.Tensor  # (u, S) left-padded
    mask: torch.Tensor | None
    positions: torch.Tensor | None
    cache: KVCache
    scoring: bool  # some row wants prompt logprobs: keep every position's logits
    done: int = 0  # columns prefilled so far (columns before `start` came from the prefix cache)
    start: int = 0  # first column computed; logits[:, 0] is that column's
    prompts: list[list[int]] = field(default_factory=list)  # prefill row i's prompt
    logits: list[torch.Tensor] = field(default_factory=list)


# -- the engine --------------------------------------------------------------------------------------

class Engine:
    """Serve many concurrent generation requests from one model.

    `submit(request, on_event)` queues a request; `on_event` is called from the scheduler thread with
    `Delta`s, then one `Finished` (or `Failed`). At most `max_concurrent` sequences decode together; up to
    `max_waiting` more wait, and `submit` raises `EngineBusy` beyond that. `dtype` (e.g. torch.bfloat16)
    runs the model under autocast with a KV cache of that dtype, as in `generate`. `prefix_cache_mb` bounds
    the store of prompt-prefix K/V reused across requests (None: $SLM_PREFIX_CACHE_MB or `PREFIX_CACHE_MB`;
    0 turns it off), kept in blocks of `prefix_block` tokens."""

    def __init__(self, model, tokenizer, *, max_concurrent: int = 8, max_waiting: int = 64,
                 dtype: torch.dtype | None = None, prefill_chunk: int | None = 256,
                 prefix_cache_mb: float | None = None, prefix_block: int = PREFIX_BLOCK):
        if max_concurrent < 1 or max_waiting < 0:
            raise ValueError(f"max_concurrent must be >= 1 and max_waiting >= 0, got {max_concurrent}, {max_waiting}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None: whole prompts), got {prefill_chunk}")
        if prefix_cache_mb is None:
            prefix_cache_mb = _env_prefix_cache_mb()
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 turns the prefix cache off), got {prefix_cache_mb}")
        if prefix_block < 1:
            raise ValueError(f"prefix_block must be >= 1, got {prefix_block}")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        fuse_projections(model)  # quantized q/k/v and gate/up as one matmul each (compress/fuse.py)
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self.device = next(model.parameters()).device
        model_dtype = next(model.parameters()).dtype
        self._autocast = dtype is not None and dtype != model_dtype
        self._cache_dtype = dtype if self._autocast else None
        self._amp_dtype = dtype
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._batch: _Batch | None = None
        self._prefill: _Prefill | None = None  # newcomers being prefilled, one chunk per iteration
        self._running = 0  # rows in the batch, read by other threads under the lock
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="slmkit-engine", daemon=True)
        self.steps = 0  # decode steps run (for tests and stats)
        self.prefill_rows = 0  # prompts prefilled (identical prompts admitted together count once)
        self.share_prefill = True  # prefill identical prompts once (off: for comparisons)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mb > 0:
            if why := unsupported_reason(model):
                log.warning("prefix cache off for this model: %s", why)
            else:
                self.prefix_cache = PrefixCache(prefix_block, int(prefix_cache_mb * 2**20))

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        pc = self.prefix_cache
        with self._cond:
            return {"running": self._running, "waiting": len(self._waiting),
                    "max_concurrent": self.max_concurrent, "max_waiting": self.max_waiting,
                    "prefix_cache_lookups": pc.lookups if pc else 0,  # prompts looked up
                    "prefix_cache_hits": pc.hits if pc else 0,  # prompts that reused at least one block
                    "prefix_cache_tokens_reused": pc.tokens_reused if pc else 0,  # prompt tokens not prefilled
                    "prefix_cache_bytes": pc.bytes if pc else 0,  # K/V bytes held
                    "prefix_cache_blocks": len(pc) if pc else 0,
                    "prefix_cache_evictions": pc.evictions if pc else 0}

    # -- submitting --------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos_id = self.config.bos_token_id
        if bos and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        return ids

    def check(self, request: EngineRequest) -> None:
        """Raise ValueError if the request cannot run on this model (empty, unknown ids, too long)."""
        ids, V = request.prompt_ids, self.config.vocab_size
        if not ids:
            raise ValueError("the prompt has no tokens")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {V})")
        new = 0 if request.score_only else request.params.max_new_tokens
        c = request.constraint
        if c is not None and not isinstance(c, CompiledConstraint):
            raise ValueError("constraint must come from constrained.compile_response_format, got "
                             f"{type(c).__name__}")
        if c is not None and c.vocab_size > V:
            raise ValueError(f"the constraint was compiled for a tokenizer of {c.vocab_size} tokens; this model "
                             f"has {V}: compile it with the engine's tokenizer")
        if len(ids) + new > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={new} exceeds the model's context of "
                             f"{self.config.max_position_embeddings} tokens; shorten the prompt or lower max_tokens")

    def submit(self, request: EngineRequest, on_event: Callable[[Event], None]) -> RequestHandle:
        return self.submit_all([(request, on_event)])[0]

    def submit_all(self, requests: list[tuple[EngineRequest, Callable[[Event], None]]]) -> list[RequestHandle]:
        """Queue several requests at once (e.g. the `n` choices of one API call): all are accepted or none
        (`EngineBusy`), and they wait side by side, so they are admitted, and identical prompts prefilled,
        together."""
        for request, _ in requests:
            self.check(request)
        rows = [_Row(request, on_event, RequestHandle(self), self.tokenizer, self.config, self.device)
                for request, on_event in requests]
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            free_slots = max(0, self.max_concurrent - self._running)
            if len(self._waiting) + len(rows) > self.max_waiting + free_slots:
                raise EngineBusy(f"{self._running} sequences running and {len(self._waiting)} waiting; "
                                 f"{len(rows)} more do not fit "
                                 f"(max_concurrent={self.max_concurrent}, max_waiting={self.max_waiting})")
            self._waiting.extend(rows)
            self._cond.notify_all()
        return [row.handle for row in rows]

    def stream(self, request: EngineRequest) -> Iterator[Event]:
        """Submit and yield the request's events in this thread; leaving the loop early cancels it."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.submit(request, events.put)  # now, not at the first next()
        return self._drain(events, handle)

    @staticmethod
    def _drain(events: queue.SimpleQueue, handle: RequestHandle) -> Iterator[Event]:
        try:
            while True:
                ev = events.get()
                yield ev
                if isinstance(ev, (Finished, Failed)):
                    return
        finally:
            handle.cancel()

    def run(self, request: EngineRequest) -> Finished:
        """Submit and wait for the result (blocking)."""
        for ev in self.stream(request):
            if isinstance(ev, Failed):
                raise RuntimeError(ev.message)
            if isinstance(ev, Finished):
                return ev
        raise EngineClosed("the engine stopped before the request finished")

    # -- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        amp = torch.autocast(self.device.type, dtype=self._amp_dtype) if self._autocast else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and self._batch is None and self._prefill is None:
                        self._cond.wait()
                    if self._closed:
                        break
                    newcomers = []
                    while self._prefill is None and self._waiting and \
                            self._running + len(newcomers) < self.max_concurrent:
                        row = self._waiting.popleft()
                        if not row.handle.cancelled:
                            newcomers.append(row)
                    if self.prefix_cache is not None and len(newcomers) > 1:
                        newcomers, later = self._hits_first(newcomers)
                        self._waiting.extendleft(reversed(later))  # first in line for the next admission
                    self._running += len(newcomers)
                # A failing forward (or sampling) fails the rows whose work it was, not the server and not the
                # other rows: the prefill's newcomers and the running batch are separate pieces of work.
                if newcomers:
                    try:
                        self._prefill = self._admit(newcomers)
                    except Exception as e:
                        self._fail(newcomers, e)
                p = self._prefill
                if p is not None and all(r.handle.cancelled for r in p.rows):
                    self._prefill = None  # nobody waits for it any more
                elif p is not None:
                    try:
                        if self._prefill_step(p):
                            self._prefill = None
                            self._finish_prefill(p)
                    except Exception as e:
                        # Its rows may already be out of `_prefill` (the last chunk ran, sampling or the merge
                        # failed): fail them from `p`, whichever iteration admitted them.
                        self._prefill = None
                        self._fail(p.rows, e)
                if self._batch is not None:
                    try:
                        self._step()
                    except Exception as e:  # one forward for the whole batch: every running row failed
                        rows, self._batch = self._batch.rows, None
                        self._fail(rows, e)
                self._set_running()
        self._shutdown()

    @staticmethod
    def _fail(rows: list[_Row], e: Exception) -> None:
        log.error("generation failed for %d sequence(s)", len(rows), exc_info=e)
        for row in rows:
            row.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            handle.cancelled = True
            row = handle._row
            # A request still waiting leaves the queue now: it must not hold a place against `max_waiting`
            # (spurious 503s) until a slot frees up for it.
            if row is not None and not row.ended:
                try:
                    self._waiting.remove(row)
                except ValueError:
                    pass  # already admitted: the scheduler drops it at its next step
            self._cond.notify_all()

    def _set_running(self) -> None:
        with self._cond:
            self._running = (len(self._batch.rows) if self._batch is not None else 0) + \
                (len(self._prefill.rows) if self._prefill is not None else 0)

    def _shutdown(self) -> None:
        with self._cond:
            rows = list(self._waiting) + (self._batch.rows if self._batch else []) + \
                (self._prefill.rows if self._prefill else [])
            self._waiting.clear()
            self._batch, self._prefill, self._running = None, None, 0
        for row in rows:
            row.emit(Failed("the server is shutting down"))

    def _hits_first(self, rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
        """Split newcomers into those to admit now and those to hold back for the next admission. In one padded
        prefill every row computes from the earliest column any row needs, so a prompt with nothing cached (or
        one that wants prompt logprobs) would make the rows that found their prefix cached recompute it. When
        both kinds arrive together, the rows with a cached prefix go first (their prefill is short) and the
        others wait for it, each at most once, so a stream of cache hits cannot starve them."""
        hit = [r.request.prompt_logprobs is None and self.prefix_cache.cached_blocks(r.request.prompt_ids) > 0
               for r in rows]
        if all(hit) or not any(hit):
            return rows, []
        now = [r for r, h in zip(rows, hit) if h or r.deferred]
        later = [r for r, h in zip(rows, hit) if not (h or r.deferred)]
        for r in later:
            r.deferred = True
        return now, later

    def _admit(self, rows: list[_Row]) -> "_Prefill":
        """Start prefilling `rows` together: one left-padded batch, identical prompts (the `n` choices of a
        request) prefilled once, their cache rows copied when the prefill ends."""
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        prompts = [r.request.prompt_ids for r in rows]
        slot: dict[tuple, int] = {}
        src = [slot.setdefault(tuple(p), len(slot)) for p in prompts] if self.share_prefill else []
        if not self.share_prefill or len(slot) == len(prompts):
            src = None  # row i is prefill row i
        prefill = prompts if src is None else [list(p) for p in slot]
        input_ids, mask, positions = left_pad(prefill, pad_id, self.device)  # (u, S)
        room = max(1, max(r.remaining for r in rows))
        cache = self.model.new_cache(len(prefill), input_ids.shape[1] + room, dtype=self._cache_dtype)
        self.prefill_rows += len(prefill)
        scores = [r.request.prompt_logprobs is not None for r in rows]
        if src is not None:  # a prefill row needs every position's logits if any of its copies does
            scores = [any(s for s, j in zip(scores, src) if j == i) for i in range(len(prefill))]
        start = self._reuse_prefixes(prefill, scores, cache) if self.prefix_cache is not None else 0
        return _Prefill(rows, src, input_ids, mask, positions, cache, scoring=any(scores), done=start, start=start,
                        prompts=prefill)

    def _reuse_prefixes(self, prompts: list[list[int]], scoring: list[bool], cache: KVCache) -> int:
        """Copy the cached leading blocks of left-padded `prompts` into `cache` and return the first column that
        must be computed: the earliest column whose row has no cached K/V for it (rows that want prompt logprobs
        compute all of theirs). The cache's length is set to that column."""
        store, S = self.prefix_cache, max(len(p) for p in prompts)
        found = [[] if wants else store.lookup(p) for p, wants in zip(prompts, scoring)]
        B = store.block_size
        start = min(S - len(p) + B * len(blocks) for p, blocks in zip(prompts, found))  # (S - n) + cached
        for i, (p, blocks) in enumerate(zip(prompts, found)):
            first = S - len(p)  # the row's first column
            store.count(max(0, start - first))
            need = start - first  # the row's columns before `start`: all of them cached
            if need <= 0:
                continue
            for j in range(-(-need // B)):  # the blocks reaching into them; later ones are recomputed anyway
                a, b = first + j * B, min(first + (j + 1) * B, start)
                kv = blocks[j]  # (2, layers, n_kv, B, hd)
                for layer in range(len(cache.keys)):
                    cache.keys[layer][i, :, a:b] = kv[0, layer, :, :b - a]
                    cache.values[layer][i, :, a:b] = kv[1, layer, :, :b - a]
        cache.length = start
        return start

    def _store_prefixes(self, p: "_Prefill", keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Offer every prompt of a finished prefill to the prefix cache. keys, values: the prefill's per-layer
        (u, n_kv, L, hd) tensors, prompt i right-aligned at column S."""
        S = p.input_ids.shape[1]
        for i, ids in enumerate(p.prompts):
            first = S - len(ids)

            def rows(a: int, b: int, i=i, first=first) -> torch.Tensor:  # (2, layers, n_kv, b - a, hd)
                return torch.stack([torch.stack([k[i, :, first + a:first + b] for k in keys]),
                                    torch.stack([v[i, :, first + a:first + b] for v in values])])
            self.prefix_cache.insert(ids, rows)

    def _prefill_step(self, p: "_Prefill") -> bool:
        """Run the next chunk of `p` (at most `prefill_chunk` tokens: running rows decode between chunks, so a
        long prompt delays them by one chunk at a time). True when the prefill is complete."""
        S = p.input_ids.shape[1]
        end = S if self.prefill_chunk is None else min(S, p.done + self.prefill_chunk)
        cols = slice(p.done, end)
        # A prompt to continue prefills quantized layers in bf16 where the CPU has it (qlinear.prompt_prefill);
        # a prompt to score (echo logprobs) keeps the exact product that `slm eval` computes.
        with contextlib.nullcontext() if p.scoring else prompt_prefill():
            logits = self.model(p.input_ids[:, cols],
                                position_ids=None if p.positions is None else p.positions[:, cols],
                                attention_mask=None if p.mask is None else p.mask[:, :end], cache=p.cache,
                                last_only=not p.scoring)  # (u, chunk or 1, V)
        p.done = end
        if p.scoring:
            p.logits.append(logits)
        else:
            p.logits = [logits]
        return end == S

    def _finish_prefill(self, p: "_Prefill") -> None:
        """Sample the first token of every row of a complete prefill and merge the survivors into the batch; then
        offer its prompts to the prefix cache (after the first tokens are out, so storing adds nothing to their
        time to first token). The prefill's per-layer tensors are taken first: the rows leave them untouched
        (select_rows and the merge copy, and no decode step runs in between)."""
        kv = (list(p.cache.keys), list(p.cache.values)) if self.prefix_cache is not None else None
        try:
            self._sample_first_tokens(p)
        finally:
            if kv is not None:
                try:
                    self._store_prefixes(p, *kv)
                except Exception:  # an optimisation that failed (out of memory?) must not fail the rows
                    log.exception("storing prompt prefixes in the prefix cache failed; they will be recomputed")

    def _sample_first_tokens(self, p: "_Prefill") -> None:
        rows, input_ids, mask, cache = p.rows, p.input_ids, p.mask, p.cache
        logits = torch.cat(p.logits, dim=1) if len(p.logits) > 1 else p.logits[0]  # (u, S - start or 1, V)
        if p.src is not None:  # every row gets its prompt's cache and logits: (b, ...)
            sel = torch.tensor(p.src, device=self.device)
            cache.select_rows(sel)
            logits, input_ids = logits[sel], input_ids[sel]
            mask = None if mask is None else mask[sel]
        b, S = input_ids.shape
        prompts = [r.request.prompt_ids for r in rows]
        for i, r in enumerate(rows):  # prompt logprobs: position t predicts token t + 1
            if r.request.prompt_logprobs is not None:
                n = len(prompts[i])
                lp = logits[i, S - n - p.start:S - 1 - p.start].float().log_softmax(-1)  # (n - 1, V)
                r.prompt_logprobs = [None] + _token_logprobs(lp, input_ids[i, S - n + 1:], r.request.prompt_logprobs)
        last = logits[:, -1].float()  # (b, V)
        live = []
        for i, r in enumerate(rows):
            if r.request.score_only:
                r.finish("length")
            elif not r.handle.cancelled:
                live.append(i)
        if not live:
            return
        if mask is None:
            mask = input_ids.new_ones(b, S)
        batch = _Batch(rows, cache, mask, [len(q) for q in prompts], input_ids[:, -1])
        joining = self._sample_and_push(batch.keep(live), last[live])  # None if all ended at their first token
        if joining is not None:
            self._batch = _merge(self.model, self._batch, joining)

    def _step(self) -> None:
        """One decode step for every running row."""
        batch = self._batch
        padded = batch.padded
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)  # (B, L + 1)
        mask = positions = None  # no padding: plain attention over the cache, positions = cache columns
        if padded:
            mask = batch.mask
            positions = torch.tensor(batch.lengths, device=self.device)[:, None]  # (B, 1)
        logits = self.model(batch.next_ids[:, None], position_ids=positions, attention_mask=mask,
                            cache=batch.cache, last_only=True)  # (B, 1, V)
        batch.lengths = [n + 1 for n in batch.lengths]
        self.steps += 1
        self._batch = self._sample_and_push(batch, logits[:, -1].float())

    def _sample_and_push(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """logits: (B, V) for the batch's rows. Samples, sends events, drops finished, failed and cancelled
        rows. A row whose logits are not finite (NaN, +inf, or all -inf: an overflow in the model, a broken
        quantized kernel) fails with its own error instead of sampling garbage (argmax of NaN) or raising in
        `multinomial` for the whole batch."""
        rows = batch.rows
        top = logits.amax(dim=-1)  # (B,) NaN if any logit is NaN
        broken = top.isnan() | top.isinf()  # (B,)
        broken_rows = broken.tolist()
        if any(broken_rows):
            logits = logits.masked_fill(broken[:, None], 0.0)  # sampled but never used: keeps the others' draw valid
        refused: dict[int, str] = {}  # row -> why its grammar could not give a mask
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None and not broken_rows[i]]
        if constrained:  # -inf where a row's grammar forbids the token; a failed row keeps its logits (never used)
            refused = mask_logits_(logits, constrained, [rows[i].matcher for i in constrained])
        tokens = self._sample(rows, logits)  # (B,)
        batch.next_ids = tokens
        ids = tokens.tolist()
        lps: list[TokenLogprob | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.request.logprobs is not None]
        if want:
            k = max(rows[i].request.logprobs for i in want)
            sel = torch.tensor(want, device=logits.device)
            found = _token_logprobs(logits[sel].log_softmax(-1), tokens[sel], k)
            for i, lp in zip(want, found):
                lp.top = lp.top[:rows[i].request.logprobs]
                lps[i] = lp
        now = time.perf_counter()
        keep = []
        for i, row in enumerate(rows):
            if row.handle.cancelled:
                continue
            if broken_rows[i]:
                row.emit(Failed("generation failed: the model produced non-finite logits (NaN or inf) for this "
                                "sequence; the checkpoint or its dtype (fp16 overflow?) is likely at fault"))
                continue
            if i in refused:
                row.emit(Failed(f"structured output failed: {refused[i]}"))
                continue
            try:
                done = row.push(ids[i], lps[i], now)
            except ConstraintError as e:  # only this row: the others' tokens are already pushed or still valid
                log.error("structured output failed for one sequence: %s", e)
                row.emit(Failed(f"structured output failed: {e}"))
                continue
            if not done and not row.handle.cancelled:
                keep.append(i)
        return batch.keep(keep)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One token per row, each with its own sampling parameters. logits: (B, V) -> (B,)."""
        if any(r.seen is not None for r in rows):
            logits = logits.clone()
            for i, r in enumerate(rows):
                if r.seen is not None:
                    logits[i] = apply_repetition_penalty(logits[i], r.seen, r.params.repetition_penalty)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if r.generator is not None:  # its own random stream: sampled alone
                out[i] = sample_next(logits[i:i + 1], r.params, r.generator)[0]
            else:
                p = r.params
                key = ("greedy",) if p.temperature == 0 or p.top_k == 1 else (p.temperature, p.top_k, p.top_p)
                groups.setdefault(key, []).append(i)
        for idx in groups.values():
            sel = torch.tensor(idx, device=logits.device) if len(idx) < len(rows) else None
            part = logits if sel is None else logits[sel]
            picked = sample_next(part, rows[idx[0]].params)
            if sel is None:
                out = picked
            else:
                out[sel] = picked
        return out
