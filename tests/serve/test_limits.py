"""The server's request checks on their own: real starlette Requests built from ASGI scopes, no server.
(tests/serve/test_server.py drives the same refusals over HTTP with the openai client.)"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from slmkit.serve.limits import MAX_PROMPTS_PER_REQUEST, RequestGuard, ServerConfig
from slmkit.serve.openai_schema import ApiError


def guard(**config) -> RequestGuard:
    return RequestGuard(ServerConfig(model_name="m", **config), context=64, vocab_size=100, capacity=12)


def request(headers: dict[str, str] | None = None, chunks: list[bytes] | None = None) -> Request:
    """A POST whose body arrives in `chunks`; with `chunks=None` reading the body fails the test."""
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    pending = list(chunks or [])

    async def receive():
        assert chunks is not None, "the body was read although its Content-Length already refused it"
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    return Request(scope, receive)


def refused(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return e.value


def test_api_key():
    guard().authorize(request())  # no key configured: every request passes
    g = guard(api_key="s3cret")
    g.authorize(request({"Authorization": "Bearer s3cret"}))
    g.authorize(request({"Authorization": "bearer  s3cret "}))  # scheme is case-insensitive, spaces trimmed
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                   {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cre"}):
        e = refused(g.authorize, request(header))
        assert e.status == 401 and e.code == "invalid_api_key" and e.headers == {"WWW-Authenticate": "Bearer"}
        assert "s3cret" not in e.message


def test_body_size_is_refused_before_and_while_reading():
    g = guard(max_body_bytes=10)
    assert asyncio.run(g.read_body(request({"Content-Length": "10"}, [b"01234", b"56789"]))) == b"0123456789"
    assert asyncio.run(g.read_body(request(chunks=[b"0123", b"4567"]))) == b"01234567"
    e = refused(g.read_body, request({"Content-Length": "11"}))  # refused from the header, body never read
    assert e.status == 413 and e.code == "request_too_large" and "--max-body-bytes" in e.message
    e = refused(g.read_body, request(chunks=[b"012345", b"678901"]))  # no Content-Length: counted while reading
    assert e.status == 413
    e = refused(g.read_body, request({"Content-Length": "-1"}))
    assert e.status == 400 and "Content-Length" in e.message


def test_model_name_prompt_count_and_n():
    g = guard(max_n=4)
    g.check_model("m")
    e = refused(g.check_model, "gpt-4")
    assert e.status == 404 and e.param == "model" and "'m'" in e.message
    g.check_prompt_count(MAX_PROMPTS_PER_REQUEST)
    assert refused(g.check_prompt_count, 0).message == "prompt is empty"
    assert f"got {MAX_PROMPTS_PER_REQUEST + 1}" in refused(g.check_prompt_count, MAX_PROMPTS_PER_REQUEST + 1).message
    g.check_n(4, 3)  # 12 sequences: exactly the engine's capacity
    e = refused(g.check_n, 5, 1)
    assert e.param == "n" and "--max-n" in e.message
    e = refused(g.check_n, 4, 4)
    assert "16 sequences exceed" in e.message and "(12)" in e.message


def test_prompt_length_context_and_token_ids():
    g = guard()
    g.check_prompt(list(range(60)), 4, "prompt")  # 60 + 4 = the whole 64-token context
    e = refused(g.check_prompt, list(range(60)), 5, "prompt")
    assert e.param == "max_tokens" and e.code == "context_length_exceeded" and "context of 64" in e.message
    e = refused(g.check_prompt, [1] * 65, 1, "messages")
    assert e.param == "messages" and "limit of 64" in e.message
    e = refused(guard(max_prompt_tokens=8).check_prompt, [1] * 9, 1, "prompt")
    assert "9 tokens, more than the limit of 8" in e.message
    guard(max_prompt_tokens=1000).check_prompt([1] * 60, 1, "prompt")  # a limit above the context is the context
    e = refused(g.check_prompt, [5, 100, 7], 1, "prompt")
    assert e.code == "invalid_value" and "token id 100 is outside the vocabulary [0, 100)" in e.message
    assert "token id -1" in refused(g.check_prompt, [-1], 1, "prompt").message
