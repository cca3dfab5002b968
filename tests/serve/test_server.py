"""OpenAI-compatible server: the official `openai` client against a real uvicorn server on loopback, serving
a tiny checkpoint saved here with a real tokenizer and chat template. Covers completions, chat, streaming,
logprobs/echo, n, seeds, stop strings, a concurrent load, and hostile input."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data.tokenizer import special_token_ids, tokenizer_config, train_tokenizer
from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.chat_template import load_chat_template
from slmkit.serve.engine import Delta, Engine, EngineRequest
from slmkit.serve.generate import SamplingParams, generate
from slmkit.serve.server import BackgroundServer, ServerConfig, create_app

KEY = "test-key-123"
MODEL = "tiny-test"
CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
          "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
          "Un café crème, s'il vous plaît. Déjà vu à Zürich. 日本語 🙂"] * 8


def make_checkpoint(out: Path) -> Path:
    tok_dir = out.parent / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, vocab_size=320, min_frequency=1)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, special_token_ids(tok))))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = CausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: outputs vary and greedy logits are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return save_checkpoint(model, out, tokenizer_from=tok_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ck = load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt"))
    return ck, ck.tokenizer()


@pytest.fixture(scope="module")
def server(ckpt):
    ck, tok = ckpt
    engine = Engine(ck.model, tok, max_concurrent=4, max_waiting=64).start()
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=64 * 1024, max_n=4)
    with BackgroundServer(create_app(engine, config, load_chat_template(ck.path))) as srv:
        srv.engine = engine
        yield srv
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def greedy_text(ckpt, prompt: str, n: int, **kw) -> str:
    ck, tok = ckpt
    return generate(ck.model, tok, prompt, SamplingParams(max_new_tokens=n, temperature=0, **kw))[0].text


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(server.url + "/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"slots not freed: {stats}")


# -- the openai client -------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_generate_and_stream_equals_whole(client, ckpt):
    prompt = "def add(a, b):"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == greedy_text(ckpt, prompt, 12)
    assert r.usage.prompt_tokens == len(ckpt[1].encode(prompt).ids) + 1  # + bos
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_uses_the_template_and_streams(client, ckpt):
    ck, tok = ckpt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two numbers."}]
    rendered = load_chat_template(ck.path).render(messages)
    assert rendered.endswith("<|assistant|>\n")
    stops = [tok.token_to_id("<|end|>"), tok.token_to_id("<|eos|>")]
    expected = greedy_text(ckpt, rendered, 10, stop_token_ids=stops)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(tok.encode(rendered).ids) + 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_template_errors_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    assert e.value.body["param"] == "messages.0.role"


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_logprobs_equal_a_direct_forward(client, ckpt, as_ids):
    ck, tok = ckpt
    text = "The quick brown fox, s'il vous plaît 🙂"
    ids = [ck.config.bos_token_id] + tok.encode(text).ids
    r = client.completions.create(model=MODEL, prompt=ids if as_ids else text, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        ref = ck.model(torch.tensor([ids])).float().log_softmax(-1)[0]  # (T, V)
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - ref[t - 1, ids[t]].item()) < 1e-4
        assert abs(max(lp.top_logprobs[t].values()) - ref[t - 1].max().item()) < 1e-4
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    pieces = [text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:] + [len(text)])]
    assert "".join(pieces) == text and pieces[2] == tok.decode([ids[2]])


def test_logprobs_of_generated_tokens_in_stream_and_whole(client):
    kw = dict(model=MODEL, prompt="class Point:", max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices[0].logprobs]
    assert sum((c.token_logprobs for c in chunks), []) == whole.token_logprobs
    assert sum((c.text_offset for c in chunks), []) == whole.text_offset
    assert all(len(t) == 2 for t in whole.top_logprobs[1:])


def test_n_and_seed(client):
    kw = dict(model=MODEL, prompt=["The quick", "def add"], max_tokens=8, temperature=1.0, n=3, seed=123)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices[:3]}) > 1  # the n samples of one prompt differ
    c = client.completions.create(**{**kw, "seed": 124})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_seeds_at_the_ends_of_int64_are_served(client):
    for seed in (2**63 - 1, -2**63):  # n samples use seed, seed + 1, ...
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=1.0, n=3, seed=seed)
        assert len(r.choices) == 3 and all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_stop_strings(client, ckpt):
    full = greedy_text(ckpt, "def add(a, b):", 16, stop_token_ids=[])
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1)
                if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)  # first occurs at i
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0,
                                  stop=[stop, "@@@"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


# -- load ------------------------------------------------------------------------------------------

def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def run_clients(server, clients: int, per_client: int) -> list[str]:
    errors: list[str] = []

    def worker(w: int):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for k in range(per_client):
            try:
                kind = (w + k) % 4
                if kind == 0:
                    r = c.completions.create(model=MODEL, prompt=f"def f{k}(", max_tokens=4)
                    ok = r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens > 0
                elif kind == 1:
                    chunks = list(c.completions.create(model=MODEL, prompt="The quick", max_tokens=4, stream=True))
                    ok = chunks[-1].choices[0].finish_reason in ("stop", "length")
                elif kind == 2:
                    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {k}"}],
                                                  max_tokens=4)
                    ok = r.choices[0].finish_reason in ("stop", "length")
                else:
                    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                            max_tokens=4, stream=True))
                    ok = chunks[-1].choices[0].finish_reason in ("stop", "length")
                if not ok:
                    errors.append(f"client {w} request {k}: incomplete response")
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                errors.append(f"client {w} request {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_concurrent_load_no_errors_no_leaks(server):
    assert run_clients(server, 4, 4) == []  # warm-up: allocator pools, caches of every shape class
    wait_idle(server)
    before = rss_kib()
    start = time.perf_counter()
    errors = run_clients(server, 16, 20)
    seconds = time.perf_counter() - start
    assert errors == [], errors[:5]
    stats = wait_idle(server)
    assert stats["running"] == 0 and stats["waiting"] == 0
    grown_mib = (rss_kib() - before) / 1024
    assert grown_mib < 64, f"RSS grew {grown_mib:.1f} MiB over 320 requests"
    assert seconds < 120


# -- hostile input ---------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x"', 400, None),  # malformed JSON
    ("/v1/completions", b'[1, 2]', 400, None),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "n": true}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "max_tokens": 1000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "temperature": -0.5}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "n": 99}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": []}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": [1, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "stop": [""]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "x"}', 400, "model"),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": 3}]}', 400,
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}],'
                             b' "temperature": 1e400}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "seed": 18446744073709551616}', 400, "seed"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "x", "seed": 100000000000000000000000000000}', 400, "seed"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}],'
                             b' "seed": -9223372036854775809}', 400, "seed"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    r = httpx.post(server.url + path, content=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_is_required(server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, server.url + path, headers=headers, content=b'{"model": "tiny-test", "prompt": "x"}')
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_oversized_bodies_are_rejected_declared_or_chunked(server):
    big = b'{"model": "tiny-test", "prompt": "' + b"x" * 100_000 + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", content=iter([big[:40_000], big[40_000:]]), headers=AUTH)
    assert "content-length" not in r.request.headers and r.status_code == 413


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH).json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/completions", headers=AUTH).status_code == 405


def raw_request(server, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_abrupt_disconnect_frees_the_slot(server, client, stream):
    sock = raw_request(server, {"model": MODEL, "prompt": "x", "max_tokens": 240, "stream": stream,
                                "temperature": 1.0})
    if stream:
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # streaming has begun
    else:
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["running"] == 0:  # running
            assert time.monotonic() < deadline
            time.sleep(0.005)
    sock.close()
    wait_idle(server)
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=2)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_non_streaming_client_leaving_while_tokens_flow_frees_its_slot_at_once(ckpt):
    # Tokens flow without a pause (a long completion, no stop token), so only a disconnect check on the clock
    # notices the client is gone before the request ends by itself.
    _, tok = ckpt
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=None)
    max_tokens = 4000  # seconds of decoding on any CPU
    with Engine(CausalLM(cfg).eval(), tok, max_concurrent=2) as engine, \
            BackgroundServer(create_app(engine, ServerConfig(model_name=MODEL), None)) as srv:
        sock = raw_request(srv, {"model": MODEL, "prompt": "x", "max_tokens": max_tokens, "temperature": 1.0})
        deadline = time.monotonic() + 20
        while engine.steps < 20:  # generating
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.005)
        sock.close()
        left = time.monotonic()
        while engine.stats()["running"] and time.monotonic() - left < 60:
            time.sleep(0.005)
        freed_after = time.monotonic() - left
        assert engine.steps < max_tokens - 1, "the request ran to its end: the disconnect went unnoticed"
        assert freed_after < 2.0, f"the slot was freed {freed_after:.2f} s after the client left"


def test_a_full_queue_answers_503(ckpt):
    ck, tok = ckpt
    with Engine(ck.model, tok, max_concurrent=1, max_waiting=0) as engine, \
            BackgroundServer(create_app(engine, ServerConfig(model_name=MODEL), None)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        # The only slot is held by a request whose listener blocks the engine at its first token, so the slot
        # stays taken however fast the model decodes (a streamed request of a tiny model can finish before the
        # next request arrives on a busy machine).
        started, release = threading.Event(), threading.Event()

        def hold(ev):
            if isinstance(ev, Delta) and not started.is_set():
                started.set()
                release.wait(30)

        engine.submit(EngineRequest(engine.encode("x"), SamplingParams(max_new_tokens=8, temperature=0)), hold)
        assert started.wait(30)
        try:
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        finally:
            release.set()
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.BadRequestError):  # no chat template given to this server
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)


@pytest.mark.slow  # starts a fresh interpreter (torch import): 10-30 s on a busy 2-core machine
def test_slm_serve_command(ckpt, tmp_path):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SLM_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(ckpt[0].path), "--port", str(port),
                             "--model-name", "m", "--max-concurrent", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "slm serve did not come up"
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "secret prompt"}], max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "secret prompt" not in out  # request text is never logged by default
    assert f"127.0.0.1:{port}" in out


# -- the commands ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host, args, env, refused", [
    ("0.0.0.0", [], {}, True),
    ("::", [], {}, True),
    ("192.168.1.10", [], {}, True),
    ("models.example.internal", [], {}, True),
    ("0.0.0.0", ["--insecure"], {}, False),
    ("0.0.0.0", ["--api-key", "k"], {}, False),
    ("0.0.0.0", [], {"SLM_API_KEY": "k"}, False),
    ("127.0.0.1", [], {}, False),
    ("::1", [], {}, False),
    ("localhost", [], {}, False),
])
def test_slm_serve_refuses_a_public_host_without_an_api_key(tmp_path, host, args, env, refused):
    from typer.testing import CliRunner

    from slmkit.checkpoint import CheckpointError
    from slmkit.cli import app

    # A checkpoint that does not exist: a host that passes the check fails at loading, before any port is bound.
    missing = tmp_path / "no-checkpoint"
    r = CliRunner().invoke(app, ["serve", str(missing), "--host", host, "--port", "1", *args],
                           env={"SLM_API_KEY": None, "COLUMNS": "200", **env})
    if refused:
        assert r.exit_code == 2, (r.exit_code, r.output)
        assert "without an API key" in r.output and "--api-key" in r.output and "--insecure" in r.output
    else:
        assert "without an API key" not in r.output
        assert isinstance(r.exception, (CheckpointError, FileNotFoundError)), (r.exit_code, r.output, r.exception)


def test_generate_reports_the_batch_decode_rate():
    from slmkit.commands.serve import decode_tokens_per_second
    from slmkit.serve.generate import GenerationResult

    def row(tokens: int, seconds: float) -> GenerationResult:
        return GenerationResult("", [], "length", 3, tokens, prefill_seconds=0.01, decode_seconds=seconds)

    # Row 0 stopped at its first token while row 1 decoded 40 more in 4 s: the batch decoded 10 tok/s.
    assert decode_tokens_per_second([row(1, 0.0), row(41, 4.0)]) == pytest.approx(10.0)
    assert decode_tokens_per_second([row(5, 0.5), row(41, 4.0)]) == pytest.approx(11.0)
    assert decode_tokens_per_second([row(41, 4.0), row(5, 0.5)]) == pytest.approx(11.0)  # any row order
    assert decode_tokens_per_second([row(1, 0.0)]) == 0.0  # nothing decoded


def test_slm_generate_batched(ckpt):
    from typer.testing import CliRunner

    from slmkit.cli import app

    r = CliRunner().invoke(app, ["generate", str(ckpt[0].path), "def add", "The quick", "--no-stream", "-n", "6",
                                 "--temperature", "0"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "tok/s decode over 2 rows" in r.output
