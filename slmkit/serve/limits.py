"""What the HTTP server refuses before a request reaches the engine: the API key, the body size, the model name,
the number of prompts and samples, the prompt length and its token ids.

Every refusal is an `ApiError` (OpenAI's error object, a 4xx status) naming the parameter and the limit, and
the server option that sets it. Nothing here knows about routes or the engine's threads: `RequestGuard` is
built from the server's `ServerConfig` and three numbers of the model and engine, so it is tested directly.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass

from .openai_schema import ApiError

log = logging.getLogger("slmkit.serve")

MAX_PROMPTS_PER_REQUEST = 64


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: `localhost`, 127.0.0.0/8, ::1."""
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse (ValueError) to serve beyond this machine without an API key unless `insecure`: anyone who can
    reach the port could otherwise read the model and use the machine's compute."""
    if api_key or insecure or is_loopback(host):
        return
    raise ValueError(f"refusing to serve on {host!r} without an API key: every machine that can reach it could "
                     "use the model. Pass --api-key KEY (or set SLM_API_KEY), bind a loopback address "
                     "(127.0.0.1, ::1, localhost), or pass --insecure if the network is trusted")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context window
    max_n: int = 8
    log_requests: bool = False


class RequestGuard:
    """The checks of one server. `context` is the model's window in tokens, `vocab_size` its vocabulary and
    `capacity` the sequences the engine holds at once (running + waiting)."""

    def __init__(self, config: ServerConfig, *, context: int, vocab_size: int, capacity: int):
        self.config, self.context, self.vocab_size, self.capacity = config, context, vocab_size, capacity

    def authorize(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>' "
                                "with the key the server was started with", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request) -> bytes:
        """The body, refused (413) as soon as it is known to be too large: from Content-Length before reading,
        else while reading, so a client cannot make the server buffer more than the limit."""
        limit = self.config.max_body_bytes
        too_big = ApiError(413, f"request body exceeds {limit} bytes (the server's --max-body-bytes)",
                           code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length header", code="invalid_request")
            if int(declared) > limit:
                raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        if self.config.log_requests:
            log.info("%s %s %s", request.method, request.url.path, body.decode("utf-8", "replace"))
        return body

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def check_prompt_count(self, prompts: int) -> None:
        if not prompts:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        if prompts > MAX_PROMPTS_PER_REQUEST:
            raise ApiError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {prompts}",
                           param="prompt", code="invalid_value")

    def check_n(self, n: int, prompts: int) -> None:
        if n > self.config.max_n:
            raise ApiError(400, f"n={n} exceeds this server's limit of {self.config.max_n} (--max-n)",
                           param="n", code="invalid_value")
        if n * prompts > self.capacity:
            raise ApiError(400, f"{prompts} prompt(s) x n={n} = {n * prompts} sequences exceed what this server "
                                f"can hold at once ({self.capacity}); send fewer per request", param="n",
                           code="invalid_value")

    def check_prompt(self, ids: list[int], max_tokens: int, param: str) -> None:
        limit = min(self.config.max_prompt_tokens or self.context, self.context)
        if len(ids) > limit:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the limit of {limit}",
                           param=param, code="context_length_exceeded")
        if len(ids) + max_tokens > self.context:
            raise ApiError(400, f"the prompt's {len(ids)} tokens + max_tokens={max_tokens} exceed the model's context "
                                f"of {self.context} tokens; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        V = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {V})", param=param, code="invalid_value")
