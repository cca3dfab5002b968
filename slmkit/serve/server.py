"""OpenAI-compatible HTTP server for one checkpoint (FastAPI + uvicorn), private by default.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`;
`"stream": true` answers with server-sent events (`data: {chunk}` ... `data: [DONE]`). Requests become
`EngineRequest`s of the continuous-batching engine (engine.py); `n` samples and lists of prompts become
one engine sequence each. At the root, for evaluation harnesses: `GET /tokenizer_info`, `POST /tokenize`,
`POST /detokenize` (tokenize_api.py); prompts may be token ids, and `echo` with `logprobs` scores them.

Operations: `GET /metrics` (Prometheus text format, metrics.py); every response carries an `X-Request-Id`
(the client's, when sane, else a new one), which also prefixes the server's log lines for that request.

Private: binds 127.0.0.1 unless told otherwise, and refuses any other host without an API key (unless
`insecure`); with an API key every request but `/health` needs
`Authorization: Bearer KEY` (compared with `hmac.compare_digest`); prompts and completions are never
logged unless `log_requests`; nothing here opens an outbound connection.

Robust: the body size is checked before parsing (Content-Length, then while reading); every invalid
request gets a 4xx with OpenAI's error object, never a 500 (the checks and limits are in limits.py); a full
waiting queue answers 503 with Retry-After; a client that disconnects (streaming or not) has its sequences
cancelled, freeing their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import deque
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .engine import Delta, Engine, EngineBusy, EngineClosed, EngineRequest, Failed, Finished
from .generate import SamplingParams
from .limits import MAX_PROMPTS_PER_REQUEST, RequestGuard, ServerConfig, check_exposure, is_loopback
from .metrics import CONTENT_TYPE, RequestIdFilter, ServerMetrics, request_id, reset_request_id, set_request_id
from .openai_responses import (CompletionLogprobs, chat_chunk, chat_logprobs, completion_chunk, merge_logprobs,
                               new_id, now, usage)
from .openai_schema import ApiError, ChatRequest, CompletionRequest, parse_request
from .tokenize_api import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, tokenizer_info

log = logging.getLogger("slmkit.serve")

__all__ = ["MAX_PROMPTS_PER_REQUEST", "BackgroundServer", "ServerConfig", "create_app", "serve"]

CHAT_STOP_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")


class ClientGone(Exception):
    """The client closed its connection while its request was running."""


# -- one HTTP request's engine sequences ---------------------------------------------------------------

class _Job:
    """The engine sequences of one HTTP request. Their events, tagged with the choice index, are appended by
    the scheduler thread to a deque, and the event loop is woken at most once per batch of events: a
    wake-up per token per stream would keep the loop thread busy and, through the GIL, slow the scheduler
    thread down (the convoy effect) exactly when many streams run."""

    def __init__(self, engine: Engine, requests: list[EngineRequest], on_finished=None):
        self._loop = asyncio.get_running_loop()
        self._events: deque = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self._on_finished = on_finished
        self.handles = engine.submit_all([(r, lambda ev, i=i: self._push(i, ev)) for i, r in enumerate(requests)])

    def _push(self, index: int, event) -> None:  # scheduler thread
        self._events.append((index, event))
        if self._on_finished is not None and isinstance(event, Finished):
            self._on_finished(event)
        if not self._wake_pending:  # a wake-up already scheduled will see this event too
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # event loop
        self._wake_pending = False
        self._ready.set()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self, request=None, poll: float = 0.25) -> AsyncIterator[list[tuple[int, object]]]:
        """Lists of (choice index, event), in order, until every sequence ended; with `request`, checks
        for a disconnect every `poll` seconds of wall-clock time, whether or not events keep coming (a
        streaming response learns of it from the server when a write fails)."""
        open_ = len(self.handles)
        clock = self._loop.time
        next_check = clock() + poll
        while open_:
            self._ready.clear()
            # Checked on the clock, not only when no event came for a while: while tokens flow there is
            # never such a gap, and a client that left would keep its slots until its request ends.
            if request is not None and clock() >= next_check:
                if await request.is_disconnected():
                    raise ClientGone()
                next_check = clock() + poll
            if not self._events:
                if request is None:
                    await self._ready.wait()
                else:
                    try:
                        await asyncio.wait_for(self._ready.wait(), max(0.0, next_check - clock()))
                    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                        pass
                    continue
            batch = []
            while self._events:
                batch.append(self._events.popleft())
            open_ -= sum(isinstance(ev, (Finished, Failed)) for _, ev in batch)
            yield batch


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- the application ---------------------------------------------------------------------------------

def create_app(engine: Engine, config: ServerConfig, chat_template=None):
    """The FastAPI app serving `engine`; `chat_template` (a ChatTemplate) enables /v1/chat/completions.
    The caller starts and closes the engine."""
    app = _private_fastapi(title="slmkit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine.stats, lambda: engine.steps)
    api = _Api(engine, config, chat_template, metrics)
    app.state.metrics = metrics
    app.add_middleware(_RequestContext, metrics=metrics, log_requests=config.log_requests)
    if not any(isinstance(f, RequestIdFilter) for f in log.filters):
        log.addFilter(RequestIdFilter())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        err = ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        err = ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        api.guard.authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/tokenizer_info")
    async def get_tokenizer_info(request: Request):
        api.guard.authorize(request)
        return tokenizer_info(engine, chat_template)

    @app.post("/tokenize")
    async def post_tokenize(request: Request):
        api.guard.authorize(request)
        req = parse_request(TokenizeRequest, await api.guard.read_body(request))
        if req.model is not None:
            api.guard.check_model(req.model)
        # off the event loop: a text near the size limit takes tens of milliseconds to encode
        return await asyncio.to_thread(tokenize, engine, chat_template, req)

    @app.post("/detokenize")
    async def post_detokenize(request: Request):
        api.guard.authorize(request)
        req = parse_request(DetokenizeRequest, await api.guard.read_body(request))
        if req.model is not None:
            api.guard.check_model(req.model)
        return detokenize(engine, req)

    @app.get("/v1/models")
    async def models(request: Request):
        api.guard.authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": api.created,
                                            "owned_by": "slmkit"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        api.guard.authorize(request)
        req = parse_request(CompletionRequest, await api.guard.read_body(request))
        prompts, requests = api.completion_requests(req)
        job = api.submit(requests, sum(len(ids) for ids, _ in prompts))
        if req.stream:
            return _event_stream(api.stream_completion(job, req, prompts), job)
        return await api.finish_completion(job, req, prompts, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        api.guard.authorize(request)
        req = parse_request(ChatRequest, await api.guard.read_body(request))
        prompt, requests = api.chat_requests(req)
        job = api.submit(requests, len(prompt))
        if req.stream:
            return _event_stream(api.stream_chat(job, req, prompt), job)
        return await api.finish_chat(job, req, prompt, request)

    return app


ENDPOINTS = frozenset({"/health", "/metrics", "/tokenizer_info", "/tokenize", "/detokenize", "/v1/models",
                       "/v1/completions", "/v1/chat/completions"})


class _RequestContext:
    """ASGI middleware around every HTTP request: gives it a request id (the client's `X-Request-Id` when sane,
    else a new one) that goes into the response headers and, through a context variable, into the log lines
    written while it is served; counts it in the metrics by endpoint and status; answers an exception that
    escaped the handlers with a 500 that still carries the id. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which would run the endpoint in another task and delay disconnect detection."""

    def __init__(self, app, metrics: ServerMetrics, log_requests: bool = False):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = request_id(given.decode("latin-1") if given is not None else None)
        token = set_request_id(rid)
        start, status = time.perf_counter(), None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            if status is not None:  # the response has begun (a stream): it cannot become a 500 any more
                status = 500
                log.exception("error while sending a response")
                raise
            log.exception("unexpected error")
            err = ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send_with_id)
        finally:
            path, method = scope.get("path", ""), scope.get("method", "")
            seconds = time.perf_counter() - start
            code = status if status is not None else 499  # the handler ended without answering
            self.metrics.observe_http(path if path in ENDPOINTS else "other", method, code, seconds)
            if self.log_requests:
                client = scope.get("client") or ("-", 0)
                log.info('%s "%s %s" %d %.1f ms', client[0], method, path, code, 1000 * seconds)
            reset_request_id(token)


def _event_stream(chunks, job: _Job) -> StreamingResponse:
    # The generator cancels its job when it ends or is closed; the background task also covers a client
    # that left before the first chunk (a generator never started runs no cleanup).
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(job.cancel))


def _private_fastapi(**options) -> FastAPI:
    """FastAPI with its built-in OpenTelemetry off (recent versions record spans, metrics and exception logs,
    and export them over OTLP when FASTAPI_OTEL_AUTO_CONFIGURE=true): nothing about a request leaves the
    process, whatever the environment says."""
    import inspect

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                                "auto_configure": False}
    return FastAPI(**options)


class _Api:
    def __init__(self, engine: Engine, config: ServerConfig, chat_template, metrics: ServerMetrics):
        self.engine, self.config, self.chat_template, self.metrics = engine, config, chat_template, metrics
        self.tokenizer, self.context = engine.tokenizer, engine.config.max_position_embeddings
        self.guard = RequestGuard(config, context=self.context, vocab_size=engine.config.vocab_size,
                                  capacity=engine.max_concurrent + engine.max_waiting)
        self.created = now()
        ids = [engine.tokenizer.token_to_id(t) for t in CHAT_STOP_TOKENS]
        eos = engine.config.eos_token_id
        self.chat_stop_ids = sorted({i for i in ids if i is not None} | ({eos} if eos is not None else set()))
        self.end_ids = {eos} if eos is not None else set()  # what ends a completion by default

    def submit(self, requests: list[EngineRequest], prompt_tokens: int) -> _Job:
        """Queue the request's sequences; `prompt_tokens` is its usage.prompt_tokens, counted once accepted."""
        try:
            job = _Job(self.engine, requests, self.metrics.observe_sequence)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            return job
        except EngineBusy as e:
            raise ApiError(503, f"the server is busy ({e}); retry shortly", type="server_error",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None

    # -- completions -------------------------------------------------------------------------------

    def completion_requests(self, req: CompletionRequest):
        self.guard.check_model(req.model)
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        self.guard.check_prompt_count(len(p))
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens=0 generates nothing; it is only allowed with echo=true (scoring a prompt)",
                           param="max_tokens", code="invalid_value")
        self.guard.check_n(req.n, len(p))
        prompts = []  # (token ids, the prompt text echoed back)
        for i, item in enumerate(p):
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, f"prompt {i} is an empty string", param="prompt", code="invalid_value")
                ids, text = self.engine.encode(item), item
            else:
                if not item:
                    raise ApiError(400, f"prompt {i} is an empty token list", param="prompt", code="invalid_value")
                ids, text = list(item), None
            self.guard.check_prompt(ids, max_tokens, "prompt")
            if text is None:
                text = self.tokenizer.decode(ids)
            prompts.append((ids, text))
        score = req.echo and req.logprobs is not None
        # One token with its logprob (lm-eval's scoring request: echo, max_tokens=1, logprobs=1) is reported even
        # when it is the end-of-sequence token, which the engine otherwise drops with its logprob: clients slice
        # `token_logprobs[ctxlen:-1]`, so one entry per prompt token plus exactly one more.
        stop_ids = [] if self._one_scored_token(req) else None
        constraint = self._constraint(req)
        requests = [EngineRequest(ids, self._params(req, max(max_tokens, 1), j, stop_ids), logprobs=req.logprobs,
                                  prompt_logprobs=req.logprobs if score else None, score_only=max_tokens == 0,
                                  constraint=constraint)
                    for ids, _ in prompts for j in range(req.n)]
        return prompts, requests

    def _constraint(self, req):
        """The compiled `response_format` (None: unconstrained); one that cannot be enforced is a 400 naming why,
        never an unenforced answer."""
        if req.response_format is None:
            return None
        from .constrained import ConstraintError, compile_response_format

        try:
            return compile_response_format(req.response_format, self.tokenizer)
        except ConstraintError as e:
            raise ApiError(400, str(e), param="response_format", code="invalid_value") from None

    @staticmethod
    def _one_scored_token(req: CompletionRequest) -> bool:
        return req.max_tokens == 1 and req.logprobs is not None

    def _finish_reason(self, req: CompletionRequest, ev: Finished) -> str:
        if self._one_scored_token(req) and ev.token_ids and ev.token_ids[-1] in self.end_ids:
            return "stop"  # the one token was the end of the sequence
        return ev.finish_reason

    def _params(self, req, max_tokens: int, j: int, stop_ids: list[int] | None) -> SamplingParams:
        seed = None if req.seed is None else req.seed + j  # n samples of one seeded request differ
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=list(req.stop or []), seed=seed, stop_token_ids=stop_ids)

    def _choice_prompt(self, prompts, req, index: int):
        return prompts[index // req.n]

    async def finish_completion(self, job: _Job, req: CompletionRequest, prompts, request) -> dict:
        results = await self._collect(job, request)
        choices, completion_tokens = [], 0
        for i, f in sorted(results.items()):
            ids, text = self._choice_prompt(prompts, req, i)
            lp = None
            if req.logprobs is not None:
                fmt = CompletionLogprobs(self.tokenizer)
                if req.echo:
                    entries = f.prompt_logprobs or [None] * len(ids)
                    lp = merge_logprobs(fmt.block(ids, entries), fmt.block(f.token_ids, f.logprobs or []))
                else:
                    lp = fmt.block(f.token_ids, f.logprobs or [])
            choices.append({"index": i, "text": (text if req.echo else "") + f.text, "logprobs": lp,
                            "finish_reason": self._finish_reason(req, f)})
            completion_tokens += f.completion_tokens
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def stream_completion(self, job: _Job, req: CompletionRequest, prompts):
        rid, created, model = new_id("cmpl"), now(), req.model
        completion_tokens = 0
        fmts = {i: CompletionLogprobs(self.tokenizer) for i in range(len(job.handles))}
        echoed: set[int] = set()
        try:
            async for batch in job.events():
                out = []  # every chunk the batch makes goes out in one write
                for i, ev in batch:
                    if isinstance(ev, Failed):
                        yield "".join(out) + _sse(ApiError(500, ev.message, type="server_error").body())
                        return
                    if req.echo and i not in echoed:  # the prompt, before its continuation
                        echoed.add(i)
                        ids, text = self._choice_prompt(prompts, req, i)
                        lp = None
                        if req.logprobs is not None:
                            lp = fmts[i].block(ids, ev.prompt_logprobs or [None] * len(ids))
                        out.append(_sse(completion_chunk(rid, created, model, i, text, logprobs=lp)))
                    if isinstance(ev, Delta):
                        if ev.text or (req.logprobs is not None and ev.token_ids):
                            lp = fmts[i].block(ev.token_ids, ev.logprobs) if req.logprobs is not None else None
                            out.append(_sse(completion_chunk(rid, created, model, i, ev.text, logprobs=lp)))
                    else:
                        completion_tokens += ev.completion_tokens
                        out.append(_sse(completion_chunk(rid, created, model, i, "",
                                                         finish_reason=self._finish_reason(req, ev))))
                if out:
                    yield "".join(out)
            if req.include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                            "usage": usage(sum(len(ids) for ids, _ in prompts), completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    # -- chat --------------------------------------------------------------------------------------

    def chat_requests(self, req: ChatRequest):
        self.guard.check_model(req.model)
        if self.chat_template is None:
            raise ApiError(400, "this checkpoint has no chat template (tokenizer_config.json has no chat_template); "
                                "use /v1/completions", code="no_chat_template")
        from .chat_template import ChatTemplateError

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.chat_template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        ids = self.engine.encode(prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.context - len(ids))
        self.guard.check_n(req.n, 1)
        self.guard.check_prompt(ids, max_tokens, "messages")
        top = req.top_logprobs or 0
        constraint = self._constraint(req)
        requests = [EngineRequest(ids, self._params(req, max_tokens, j, self.chat_stop_ids),
                                  logprobs=top if req.logprobs else None, constraint=constraint)
                    for j in range(req.n)]
        return ids, requests

    async def finish_chat(self, job: _Job, req: ChatRequest, prompt_ids, request) -> dict:
        results = await self._collect(job, request)
        top = req.top_logprobs or 0
        choices = [{"index": i, "message": {"role": "assistant", "content": f.text},
                    "logprobs": chat_logprobs(self.tokenizer, f.logprobs, top) if req.logprobs else None,
                    "finish_reason": f.finish_reason} for i, f in sorted(results.items())]
        completion = sum(f.completion_tokens for f in results.values())
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
                "choices": choices, "usage": usage(len(prompt_ids), completion)}

    async def stream_chat(self, job: _Job, req: ChatRequest, prompt_ids):
        rid, created, model = new_id("chatcmpl"), now(), req.model
        completion_tokens, top = 0, req.top_logprobs or 0
        try:
            yield "".join(_sse(chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
                          for i in range(len(job.handles)))
            async for batch in job.events():
                out = []  # every chunk the batch makes goes out in one write
                for i, ev in batch:
                    if isinstance(ev, Failed):
                        yield "".join(out) + _sse(ApiError(500, ev.message, type="server_error").body())
                        return
                    if isinstance(ev, Delta):
                        if ev.text or (req.logprobs and ev.token_ids):
                            lp = chat_logprobs(self.tokenizer, ev.logprobs, top) if req.logprobs else None
                            out.append(_sse(chat_chunk(rid, created, model, i, {"content": ev.text}, logprobs=lp)))
                    else:
                        completion_tokens += ev.completion_tokens
                        out.append(_sse(chat_chunk(rid, created, model, i, {}, finish_reason=ev.finish_reason)))
                if out:
                    yield "".join(out)
            if req.include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage(len(prompt_ids), completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    async def _collect(self, job: _Job, request) -> dict[int, Finished]:
        results = {}
        try:
            async for batch in job.events(request):
                for i, ev in batch:
                    if isinstance(ev, Failed):
                        raise ApiError(500, ev.message, type="server_error")
                    if isinstance(ev, Finished):
                        results[i] = ev
        except ClientGone:
            job.cancel()
            raise ApiError(499, "client closed the connection", code="client_closed") from None
        finally:
            job.cancel()
        return results


# -- running it --------------------------------------------------------------------------------------

class BackgroundServer:
    """uvicorn serving `app` from a thread, on a socket bound before it starts (port 0: a free port).
    Used by tests and benchmarks; `slm serve` runs uvicorn in the foreground instead."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        options = {"log_level": "warning", "access_log": False, **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def inference_dtype(model, dtype):
    """How to run `model` in `dtype` (None: its own): bfloat16 casts a float model's weights once, in place, and
    the engine then runs without autocast (which casts every fp32 matrix again at every step); a compressed
    model, float16 (fp16's range can overflow the residual stream) and float32 run as they are, under autocast
    where `dtype` differs. Returns (the engine's `dtype`, a line saying which path runs, or None)."""
    import torch

    from ..checkpoint import cast_for_inference

    if dtype is torch.bfloat16 and cast_for_inference(model, dtype):
        return None, "running in bfloat16: the float weights were cast once at load"
    if dtype is None or dtype is next(model.parameters()).dtype:
        return dtype, None
    return dtype, f"running under {str(dtype).removeprefix('torch.')} autocast over the stored weights"


def serve(checkpoint, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrent: int = 8, max_waiting: int = 64, prefill_chunk: int | None = 256,
          max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None, max_n: int = 8,
          log_requests: bool = False, dtype: str = "auto", device: str = "auto", model_name: str | None = None,
          insecure: bool = False, prefix_cache_mb: float | None = None) -> None:
    """Load `checkpoint` and serve it until interrupted (the body of `slm serve`). A host other than loopback
    needs `api_key`, or `insecure=True` to serve it to the network without one."""
    from pathlib import Path

    import torch
    import uvicorn

    from ..checkpoint import load_checkpoint
    from .chat_template import load_chat_template

    check_exposure(host, api_key, insecure)  # before loading anything
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    run_dtype = dtypes[dtype]
    if dtype == "auto" and device.startswith("cuda"):
        run_dtype = torch.bfloat16
    ck = load_checkpoint(checkpoint, device=device)
    engine_dtype, how = inference_dtype(ck.model, run_dtype)
    if how:
        log.warning("%s", how)
    template = load_chat_template(ck.path)
    engine = Engine(ck.model, ck.tokenizer(), max_concurrent=max_concurrent, max_waiting=max_waiting,
                    dtype=engine_dtype, prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)
    config = ServerConfig(model_name=model_name or Path(checkpoint).resolve().name, api_key=api_key,
                          max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
                          log_requests=log_requests)
    if log_requests:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(engine, config, template)
    log.warning("serving %s as %r on http://%s:%d (API key %s, chat %s)", ck.path, config.model_name, host, port,
                "required" if api_key else "off", "on" if template else "off (no chat_template)")
    if not api_key and not is_loopback(host):
        log.warning("--insecure: %s is reachable beyond this machine and needs no API key", host)
    from .constrained import warm_up

    if why := warm_up(engine.tokenizer):  # the grammar engine's tokenizer view, built now, not on a request
        log.warning("response_format is unavailable (requests that ask for it get a 400): %s", why)
    with engine:
        uvicorn.run(app, host=host, port=port, log_level="info" if log_requests else "warning",
                    access_log=False, timeout_graceful_shutdown=5)  # the access lines are _RequestContext's
