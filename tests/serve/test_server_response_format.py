"""`response_format` over HTTP: json_object and json_schema are enforced on chat and completions (streamed or
not, n > 1), a schema that cannot be enforced is a 400 naming the problem (never an unenforced 200), and the
server keeps serving with no slot leaked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from slmkit.align.json_schema import validate
from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data.tokenizer import special_token_ids, tokenizer_config, train_tokenizer
from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.chat_template import load_chat_template
from slmkit.serve.engine import Engine
from slmkit.serve.server import BackgroundServer, ServerConfig, create_app


KEY = "test-key-rf"
MODEL = "tiny-json"
CORPUS = ['{"name": "Ada", "age": 36, "tags": ["a", "b"]}', "def add(a, b):\n    return a + b\n",
          '[1, 2, 3, {"ok": true, "value": null}]', "The quick brown fox jumps over the lazy dog.",
          '{"color": "red", "size": 10, "items": [{"id": 1}, {"id": 2}]}'] * 6
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "color"], "additionalProperties": False}
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("rf")
    tok = train_tokenizer(CORPUS, vocab_size=330, min_frequency=1)
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, special_token_ids(tok))))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    ck = load_checkpoint(save_checkpoint(model, root / "ck", tokenizer_from=root / "tok"))
    engine = Engine(ck.model, ck.tokenizer(), max_concurrent=4, max_waiting=64).start()
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=64 * 1024, max_n=4)
    with BackgroundServer(create_app(engine, config, load_chat_template(ck.path))) as srv:
        yield srv
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(server.url + "/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"slots not freed: {stats}")


def conforms(text: str, schema: dict) -> None:
    value = json.loads(text)
    assert validate(value, schema) is None, (text, validate(value, schema))


def test_chat_json_schema_is_enforced(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}], max_tokens=120,
                                       temperature=0.8, seed=1, n=3, response_format=schema_format(PERSON))
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        conforms(c.message.content, PERSON)


def test_completions_json_object_and_json_schema(client):
    r = client.completions.create(model=MODEL, prompt=["The quick", "def add"], max_tokens=150, temperature=0,
                                  extra_body={"response_format": schema_format(PERSON)})
    for c in r.choices:
        conforms(c.text, PERSON)
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=300, temperature=0.7, seed=3,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":  # an unbounded object may run out of tokens: finish_reason says so
        assert isinstance(json.loads(text), dict)


def test_streamed_output_is_enforced_too(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                            max_tokens=120, temperature=0, stream=True,
                                            response_format=schema_format(PERSON))
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    conforms(text, PERSON)


def test_text_format_is_unconstrained(client):
    plain = client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, temperature=0)
    text = client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, temperature=0,
                                     extra_body={"response_format": {"type": "text"}})
    assert text.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("response_format, words", [
    (schema_format({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), ["not"]),
    (schema_format({"type": "array", "uniqueItems": True}), ["uniqueItems"]),
    (schema_format({"type": "strin"}), ["strin"]),
    (schema_format({"type": "object", "requird": ["a"]}), ["requird"]),
    (schema_format({"type": "integer", "minimum": 3, "maximum": 1}), ["minimum"]),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, ["schema"]),
    ({"type": "regex", "regex": "a+"}, ["json_schema"]),
    ("json", ["response_format"]),
])
def test_unenforceable_formats_are_400_naming_the_problem(server, path, response_format, words):
    body = {"model": MODEL, "max_tokens": 8, "response_format": response_format}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    r = httpx.post(server.url + path, json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "response_format", err
    for w in words:
        assert w in err["message"], err["message"]
    wait_idle(server)


def test_server_lives_after_refusals_and_no_slot_leaks(server, client):
    for _ in range(3):
        httpx.post(server.url + "/v1/completions", headers=AUTH,
                   json={"model": MODEL, "prompt": "x", "response_format": schema_format({"not": {}})})
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=120, temperature=0,
                                  extra_body={"response_format": schema_format(PERSON)})
    conforms(r.choices[0].text, PERSON)
    wait_idle(server)
