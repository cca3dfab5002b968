"""One GGUF file in llama.cpp: tokenize, score, decode greedily, and time prefill and decoding.

`LlamaCpp(path)` names the file and how to run it (threads, context size, KV cache type, flash attention); the file
is loaded by the node process on the first request and kept while requests name it. The defaults are the exact
ones the parity checks need (F32 KV cache, no flash attention: no f16 rounding enters the logits); speed
measurements of llama.cpp as its users run it pass `kv_type="f16", flash_attention="auto"` (llama.cpp's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .process import LlamaCppProcess, shared_process

KV_TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class TokenScores:
    """What llama.cpp predicts after each prefix of n tokens, for the n - 1 next tokens."""

    log_probs: np.ndarray  # (n - 1,) float64: log p(ids[i + 1] | ids[: i + 1]); -inf where float32 underflows
    argmax: np.ndarray  # (n - 1,) int64: llama.cpp's most likely token after ids[: i + 1]
    second_pass: int  # positions scored by the top-k pass (target not the argmax)
    full_pass: int  # positions that needed the whole distribution


@dataclass(frozen=True)
class DecodeTiming:
    """Greedy decoding of one or more prompts together, with the time each stream had each token.

    Times are milliseconds from the start of the prompts' evaluation (the engine's own clock: no inter-process
    time). With several streams, decoding is the phase after every stream has its first token."""

    tokens: list[list[int]]  # per stream
    times_ms: list[list[float]]  # per stream, per token

    @property
    def time_to_first_token_ms(self) -> float:
        """Prefill and the first sampled token (of the last stream to get one)."""
        return max(t[0] for t in self.times_ms)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after every stream had its first, per second of that phase (all streams together)."""
        start = self.time_to_first_token_ms
        end = max(t[-1] for t in self.times_ms)
        produced = sum(1 for stream in self.times_ms for t in stream if t > start)
        return 1000.0 * produced / (end - start) if end > start else float("nan")


class LlamaCpp:
    """One GGUF file in llama.cpp (see the module docstring). `context` is the smallest context size; requests
    that need more get a larger context. `process`: the node process to use (default: one shared by all)."""

    def __init__(self, model: str | Path, *, vocab_only: bool = False, threads: int = 1, context: int = 512,
                 kv_type: str = "f32", flash_attention: bool | str = False, process: LlamaCppProcess | None = None):
        path = Path(model).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
        if flash_attention not in (True, False, "auto"):
            raise ValueError(f"flash_attention must be true, false or 'auto', not {flash_attention!r}")
        if threads < 1 or context < 1:
            raise ValueError(f"threads and context must be >= 1, got {threads} and {context}")
        stat = path.stat()
        self.path = path
        self.model_options = {"path": str(path), "vocab_only": vocab_only,
                              "stamp": [stat.st_mtime_ns, stat.st_size]}  # a rewritten file is loaded again
        self.context_options = {"threads": threads, "size": context, "sequences": 1, "kv_type": kv_type.upper(),
                                "flash_attention": flash_attention}
        self.process = process

    @property
    def options(self) -> dict:
        return {**self.model_options, **self.context_options}

    def _call(self, op: str, needed: int = 0, **task):
        context = {**self.context_options, "size": max(self.context_options["size"], needed)}
        return (self.process or shared_process()).call({"model": self.model_options, "context": context, "op": op,
                                                        **task})

    def tokenize(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        """Token ids of each text, without bos; `special` parses control-token text as those tokens."""
        return self._call("tokenize", texts=texts, special=special)

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """`steps` argmax tokens after each prompt (no penalties; end-of-generation tokens do not stop it)."""
        return [self._call("greedy", len(p) + steps, prompt=p, steps=steps) for p in prompts]

    def log_probs(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) log-softmax of llama.cpp's logits after each prefix of `ids` (-inf where float32
        probability underflows). Costly on a large vocabulary (see `score` for one token per position)."""
        rows = self._call("probs", len(ids), tokens=ids)
        out = np.full((len(rows), len(rows[0][0])), -np.inf)
        for r, (tokens, probs) in enumerate(rows):
            with np.errstate(divide="ignore"):
                out[r, tokens] = np.log(np.asarray(probs, dtype=np.float64))
        return out

    def score(self, ids: list[int], *, top_k: int | None = None, bias: float | None = None) -> TokenScores:
        """log p(ids[i + 1] | ids[: i + 1]) and the argmax for every prefix, from one evaluation that samples the
        argmax with its probability and a second one for the positions where the next token is not the argmax
        (llama_cpp.mjs explains how; `top_k` and `bias` tune that pass, for tests)."""
        if len(ids) < 2:
            raise ValueError("scoring needs at least 2 tokens (a prefix and the token after it)")
        options = {k: v for k, v in (("top_k", top_k), ("bias", bias)) if v is not None}
        r = self._call("score", len(ids), tokens=[int(i) for i in ids], **options)
        log_probs = np.array([-np.inf if v is None else v for v in r["log_probs"]], dtype=np.float64)
        return TokenScores(log_probs, np.asarray(r["argmax"], dtype=np.int64), r["second"], r["full"])

    def timed_decode(self, prompt: list[int], steps: int) -> DecodeTiming:
        """Greedy decoding of `steps` tokens after `prompt` (end-of-generation tokens do not stop it), timed."""
        return self.timed_batch_decode([prompt], steps)

    def timed_batch_decode(self, prompts: list[list[int]], steps: int) -> DecodeTiming:
        """Greedy decoding of `steps` tokens after each prompt, all prompts at once: one sequence each in one
        context, which llama.cpp evaluates as one batch per step."""
        if steps < 1 or not prompts or not all(prompts):
            raise ValueError("timed decoding needs steps >= 1 and non-empty prompts")
        r = self._call("timed_decode", max(len(p) for p in prompts) + steps,
                       prompts=[[int(i) for i in p] for p in prompts], steps=steps)
        return DecodeTiming(r["tokens"], r["times_ms"])
