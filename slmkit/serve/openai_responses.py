"""Response objects of the OpenAI-compatible API: completion and chat choices, logprobs, usage, chunks.

Shapes follow OpenAI's API reference. Completion logprobs are the legacy object
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` that lm-evaluation-harness reads (with
`echo`, the prompt's tokens come first and the first has a null logprob); chat logprobs are
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.

`text_offset` needs each token's share of the decoded text. Decoding tokens one by one does not give it
(a multi-byte character split across tokens, decoders that strip a leading space), so `TokenTexts`
detokenizes incrementally: each token's piece is the new text that decoding a short window ending at it
adds to decoding the window without it, and a piece is only released once it does not end in a
partial character. The pieces concatenate to the text of all the tokens.
"""

from __future__ import annotations

import secrets
import time

from .engine import TokenLogprob
from .generate import REPLACEMENT_CHAR


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenTexts:
    """Incremental detokenizer: `add(id)` returns the text that token adds (possibly "")."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class CompletionLogprobs:
    """Builds the legacy completion `logprobs` object token by token, tracking `text_offset`."""

    def __init__(self, tokenizer, start_offset: int = 0):
        self.tokenizer, self.texts, self.offset = tokenizer, TokenTexts(tokenizer), start_offset

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def block(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(ids, entries):
            out["tokens"].append(self.token(t))
            out["token_logprobs"].append(e.logprob if e is not None else None)
            out["top_logprobs"].append({self.token(i): lp for i, lp in e.top} if e is not None else None)
            out["text_offset"].append(self.offset)
            self.offset += len(self.texts.add(t))
        return out


def merge_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tokenizer, entries: list[TokenLogprob], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top[:top]]}
                        for e in entries]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, *,
                     logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, *,
               logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
