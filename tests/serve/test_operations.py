"""The server's operational surface and evaluation endpoints, against a real uvicorn server on loopback:
`/metrics` (Prometheus text format, parsed here line by line; counters that move with requests), `X-Request-Id`
on every response and in log lines, `/tokenizer_info`, `/tokenize`, `/detokenize`, token-id prompts and the
one-token scoring request lm-eval sends, and hostile input to all of them (4xx with a reason, no slot leaks)."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time

import httpx
import pytest
import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.model import CausalLM
from slmkit.serve.chat_template import load_chat_template
from slmkit.serve.engine import Engine
from slmkit.serve.metrics import Histogram, MetricsRegistry, request_id
from slmkit.serve.server import BackgroundServer, ServerConfig, create_app
from slmkit.serve.tokenize_api import MAX_DETOKENIZE_TOKENS, MAX_TOKENIZE_CHARS
from tests.serve.test_server import KEY, MODEL, make_checkpoint

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ck = load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ops") / "ckpt"))
    return ck, ck.tokenizer()


@pytest.fixture(scope="module")
def server(ckpt):
    ck, tok = ckpt
    engine = Engine(ck.model, tok, max_concurrent=4, max_waiting=16).start()
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=1 << 20, max_n=4, log_requests=True)
    with BackgroundServer(create_app(engine, config, load_chat_template(ck.path))) as srv:
        srv.engine = engine
        yield srv
    engine.close()


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)


def wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(server.url + "/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"slots not freed: {stats}")


# -- the Prometheus text format ------------------------------------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")


def parse_exposition(text: str) -> dict:
    """{family: {"type", "help", "samples": {(name, ((label, value), ...)): float}}}; asserts the format: HELP and
    TYPE before a family's samples, every sample line `name{labels} value`, a value that parses as a float."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and help_, line
            families[name] = current = {"help": help_, "type": None, "samples": {}}
            current_name = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current_name and kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.group(1), m.group(2), m.group(3)
            assert current is not None and current["type"] is not None, line
            suffixes = ("_bucket", "_sum", "_count") if current["type"] == "histogram" else ("",)
            assert any(name == current_name + s for s in suffixes), (name, current_name)
            pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
            current["samples"][(name, pairs)] = float(value)
    return families


def value(families: dict, name: str, **labels) -> float:
    family = next(f for n, f in families.items() if name.startswith(n))
    want = set(labels.items())
    return sum(v for (n, pairs), v in family["samples"].items() if n == name and want <= set(pairs))


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_exposition(r.text)


def test_metrics_need_the_key_and_health_does_not(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_parse_and_histograms_are_cumulative(server):
    post(server, "/v1/completions", {"model": MODEL, "prompt": "def add", "max_tokens": 4, "temperature": 0})
    fams = scrape(server)
    for name in ("slmkit_http_requests_total", "slmkit_http_errors_total", "slmkit_prompt_tokens_total",
                 "slmkit_completion_tokens_total", "slmkit_requests_running", "slmkit_requests_waiting",
                 "slmkit_batch_occupancy_ratio", "slmkit_time_to_first_token_seconds",
                 "slmkit_time_per_output_token_seconds", "slmkit_http_request_duration_seconds"):
        assert name in fams, name
    assert fams["slmkit_requests_waiting"]["type"] == "gauge"
    assert fams["slmkit_time_to_first_token_seconds"]["type"] == "histogram"
    for name, fam in fams.items():
        if fam["type"] != "histogram":
            continue
        series: dict = {}
        for (n, pairs), v in fam["samples"].items():
            if n.endswith("_bucket"):
                key = tuple(p for p in pairs if p[0] != "le")
                le = dict(pairs)["le"]
                series.setdefault(key, []).append((math.inf if le == "+Inf" else float(le), v))
        for key, buckets in series.items():
            counts = [c for _, c in buckets]
            assert [b for b, _ in buckets] == sorted(b for b, _ in buckets) and buckets[-1][0] == math.inf
            assert counts == sorted(counts), (name, key)  # cumulative
            assert counts[-1] == fam["samples"][(name + "_count", key)]


def test_counters_move_after_requests(server):
    before = scrape(server)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "class Point:", "max_tokens": 6,
                                         "temperature": 0}).json()
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": ""}).status_code == 400
    assert post(server, "/v1/completions", {"model": "nope", "prompt": "x"}).status_code == 404
    deadline = time.monotonic() + 5
    while True:  # the middleware counts a request just after its last byte went out
        after = scrape(server)
        ok = value(after, "slmkit_http_requests_total", endpoint="/v1/completions", status="200") == \
            value(before, "slmkit_http_requests_total", endpoint="/v1/completions", status="200") + 1
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ok
    assert value(after, "slmkit_http_errors_total", status="400") == value(before, "slmkit_http_errors_total",
                                                                         status="400") + 1
    assert value(after, "slmkit_http_requests_total", endpoint="/v1/completions", status="404") == \
        value(before, "slmkit_http_requests_total", endpoint="/v1/completions", status="404") + 1
    usage = r["usage"]
    assert value(after, "slmkit_prompt_tokens_total") - value(before, "slmkit_prompt_tokens_total") == \
        usage["prompt_tokens"]
    assert value(after, "slmkit_completion_tokens_total") - value(before, "slmkit_completion_tokens_total") == \
        usage["completion_tokens"]
    assert value(after, "slmkit_time_to_first_token_seconds_count") == \
        value(before, "slmkit_time_to_first_token_seconds_count") + 1
    if usage["completion_tokens"] > 1:
        assert value(after, "slmkit_time_per_output_token_seconds_count") == \
            value(before, "slmkit_time_per_output_token_seconds_count") + 1
    # an unknown path is counted as "other": a client cannot add series
    httpx.get(server.url + "/no/such/path/12345", headers=AUTH)
    time.sleep(0.05)
    fams = scrape(server)
    assert all("12345" not in str(k) for k in fams["slmkit_http_requests_total"]["samples"])
    assert value(fams, "slmkit_http_requests_total", endpoint="other", status="404") >= 1


def test_gauges_follow_a_running_stream(ckpt):
    ck, tok = ckpt
    cfg = dataclasses.replace(ck.config, eos_token_id=None, max_position_embeddings=4096)  # never stops early
    torch.manual_seed(0)
    with Engine(CausalLM(cfg).eval(), tok, max_concurrent=2) as engine, \
            BackgroundServer(create_app(engine, ServerConfig(model_name=MODEL), None)) as srv:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: a discarded iterator closes the connection
            next(lines)
            fams = parse_exposition(httpx.get(srv.url + "/metrics").text)
        assert value(fams, "slmkit_requests_running") == 1 and value(fams, "slmkit_requests_waiting") == 0
        assert value(fams, "slmkit_batch_occupancy_ratio") == 0.5 and value(fams, "slmkit_max_concurrent") == 2
        assert value(fams, "slmkit_engine_decode_steps_total") >= 1
        deadline = time.monotonic() + 10
        while value(parse_exposition(httpx.get(srv.url + "/metrics").text), "slmkit_requests_running"):
            assert time.monotonic() < deadline, "the closed stream kept its slot"
            time.sleep(0.02)


def test_exposition_escapes_label_values():
    reg = MetricsRegistry()
    c = reg.counter("x_total", "help", ("path",))
    c.inc(path='a"b\\c\nd')
    h = reg.histogram("lat_seconds", "latency", (0.1, 1.0))
    h.observe(0.5)
    h.observe(7.0)
    text = reg.render()
    fams = parse_exposition(text)
    assert 'x_total{path="a\\"b\\\\c\\nd"} 1' in text
    assert value(fams, "lat_seconds_bucket", le="0.1") == 0 and value(fams, "lat_seconds_bucket", le="1") == 1
    assert value(fams, "lat_seconds_bucket", le="+Inf") == 2 and value(fams, "lat_seconds_sum") == 7.5
    assert isinstance(h, Histogram) and h.count() == 2


# -- request ids ---------------------------------------------------------------------------------------

def test_every_response_carries_a_request_id(server):
    responses = [httpx.get(server.url + "/health"), httpx.get(server.url + "/metrics"),
                 httpx.get(server.url + "/v1/models", headers=AUTH), httpx.get(server.url + "/nothing"),
                 post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}),
                 httpx.post(server.url + "/v1/completions", content=b"{", headers=AUTH),
                 post(server, "/tokenize", {"prompt": "x"})]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
             headers={"X-Request-Id": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    for bad in ("x" * 200, "has space", "semi;colon", ""):
        r = httpx.get(server.url + "/health", headers={"X-Request-Id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
    assert request_id("ok-1") == "ok-1" and request_id(None) != request_id(None)


def test_request_id_is_in_the_log_lines(server, caplog):
    with caplog.at_level(logging.INFO, logger="slmkit.serve"):
        post(server, "/v1/completions", {"model": MODEL, "prompt": "def", "max_tokens": 2},
             headers={"X-Request-Id": "log-me-7"})
        post(server, "/v1/completions", {"model": MODEL, "prompt": "the", "max_tokens": 2})
        time.sleep(0.1)
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == "log-me-7"]
    assert mine, [r.getMessage() for r in caplog.records]
    assert any(r.getMessage().startswith("[log-me-7] ") and "/v1/completions" in r.getMessage() and " 200 " in
               r.getMessage() for r in mine)


# -- tokenizer endpoints -------------------------------------------------------------------------------

def test_tokenizer_info(server, ckpt):
    ck, tok = ckpt
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401
    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == tok.id_to_token(ck.config.eos_token_id) == "<|eos|>"
    assert info["bos_token"] == "<|bos|>" and info["pad_token"] == tok.id_to_token(ck.config.pad_token_id)
    assert info["chat_template"] == load_chat_template(ck.path).source
    assert info["max_model_len"] == ck.config.max_position_embeddings


def test_tokenize_and_detokenize(server, ckpt):
    ck, tok = ckpt
    text = "def add(a, b): café 🙂"
    plain = tok.encode(text, add_special_tokens=False).ids
    r = post(server, "/tokenize", {"prompt": text}).json()
    assert r["tokens"] == [ck.config.bos_token_id] + plain and r["count"] == len(plain) + 1
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True,
                                   "model": MODEL}).json()
    assert r["tokens"] == plain and r["token_strs"] == [tok.id_to_token(i) for i in plain]
    assert post(server, "/tokenize", {"prompt": "<|eos|>", "add_special_tokens": False}).json()["tokens"] == \
        [ck.config.eos_token_id]
    assert post(server, "/detokenize", {"tokens": plain}).json()["prompt"] == text
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    rendered = load_chat_template(ck.path).render([{"role": "user", "content": "hi"}])
    assert chat == [ck.config.bos_token_id] + tok.encode(rendered).ids


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "x" * (MAX_TOKENIZE_CHARS + 1)}, 413, "prompt"),
    ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [1] * (MAX_DETOKENIZE_TOKENS + 1)}, 413, "tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3, 10 ** 6]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [-5]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], "x"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [2 ** 70]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1]] * 65}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1] * 300], "echo": True, "max_tokens": 1, "logprobs": 1},
     400, "prompt"),
])
def test_hostile_input_is_refused_and_frees_nothing(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert r.headers["x-request-id"]
    wait_idle(server)


def test_token_id_prompts_score_like_text(server, ckpt):
    ck, tok = ckpt
    a = [ck.config.bos_token_id] + tok.encode("def add(a, b):").ids
    b = tok.encode("The quick brown fox").ids
    body = {"model": MODEL, "prompt": [a, b], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
    r = post(server, "/v1/completions", body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip((a, b), r["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        with torch.inference_mode():
            ref = ck.model(torch.tensor([ids])).float().log_softmax(-1)[0]  # (T, V)
        for t in range(1, len(ids)):
            assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
            assert max(lp["top_logprobs"][t].values()) == pytest.approx(ref[t - 1].max().item(), abs=1e-4)
        assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)  # the greedy next token
        assert len(lp["text_offset"]) == len(lp["tokens"]) == len(ids) + 1
    assert r["usage"]["prompt_tokens"] == len(a) + len(b)


def test_one_scored_token_is_reported_when_it_ends_the_sequence(ckpt):
    """lm-eval slices `token_logprobs[ctxlen:-1]`: the one generated token must be there even when it is the end
    token. Here every logit is equal, so greedy picks id 0, which this model's config calls its eos."""
    ck, tok = ckpt
    cfg = dataclasses.replace(ck.config, eos_token_id=0)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = [1] + tok.encode("def add").ids
    with Engine(model, tok, max_concurrent=2) as engine, \
            BackgroundServer(create_app(engine, ServerConfig(model_name=MODEL), None)) as srv:
        body = {"model": MODEL, "prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()
        choice = r["choices"][0]
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
        assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(-math.log(cfg.vocab_size), abs=1e-4)
        assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
        # without logprobs, the end token still ends the completion unreported, as before
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3,
                                                          "temperature": 0}, timeout=30).json()
        assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"
