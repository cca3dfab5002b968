"""Structured output (constrained.py): enforced outputs parse and validate, schemas that cannot be enforced are
refused with a clear ConstraintError, and the engine masks only the rows that ask for it, handles eos, and
survives a failing grammar."""

from __future__ import annotations

import json
import queue
import sys
import time

import pytest
import torch

from slmkit.align.json_schema import validate
from slmkit.data.tokenizer import train_tokenizer
from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.constrained import ConstraintError, ConstraintMatcher, compile_response_format, mask_logits_, warm_up
from slmkit.serve.engine import Engine, EngineRequest, Failed, Finished
from slmkit.serve.generate import SamplingParams, generate


CORPUS = ['{"name": "Ada", "age": 36, "tags": ["a", "b"]}', "def add(a, b):\n    return a + b\n",
          '[1, 2, 3, {"ok": true, "value": null}]', "The quick brown fox jumps over the lazy dog.",
          '{"color": "red", "size": 10, "items": [{"id": 1}, {"id": 2}]}'] * 6

SCHEMAS = {
    "required": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                 "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "ok": {"type": "boolean"}},
             "required": ["color", "ok"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                             "tag": {"enum": ["x", "y", None]}},
            "required": ["id", "tag"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "range": {"type": "integer", "minimum": 10, "maximum": 99},
    "negative": {"type": "object", "properties": {"t": {"type": "integer", "minimum": -40, "maximum": -10}},
                 "required": ["t"], "additionalProperties": False},
}


def rf(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=330, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tokenizer.token_to_id("<|eos|>"),
                      bos_token_id=tokenizer.token_to_id("<|bos|>"), pad_token_id=tokenizer.token_to_id("<|pad|>"))
    m = CausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: outputs vary and greedy logits are not near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture()
def engine(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=4, max_waiting=32) as eng:
        yield eng


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def run_all(engine: Engine, requests: list[EngineRequest], timeout: float = 60.0) -> list:
    """Submit together; the last event (Finished or Failed) of each."""
    qs = [queue.SimpleQueue() for _ in requests]
    engine.submit_all([(r, q.put) for r, q in zip(requests, qs)])
    out = []
    for q in qs:
        deadline = time.monotonic() + timeout
        while True:
            ev = q.get(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(ev, (Finished, Failed)):
                out.append(ev)
                break
    return out


def check(text: str, schema: dict) -> None:
    value = json.loads(text)
    assert validate(value, schema) is None, (text, validate(value, schema))
    if "maxItems" in schema:
        assert len(value) <= schema["maxItems"]


# -- enforced outputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_enforced_outputs_parse_and_validate(engine, tokenizer, name):
    schema = SCHEMAS[name]
    c = compile_response_format(rf(schema, name), tokenizer)
    prompts = ["def add(a, b):", "The quick", "{", "x"]
    reqs = [EngineRequest(engine.encode(p), SamplingParams(max_new_tokens=200, temperature=1.0, seed=s),
                          constraint=c) for s, p in enumerate(prompts)]
    reqs.append(EngineRequest(engine.encode("The"), SamplingParams(max_new_tokens=200, temperature=0), constraint=c))
    for fin in run_all(engine, reqs):
        assert isinstance(fin, Finished), fin
        assert fin.finish_reason == "stop", fin  # bounded schema: the grammar completes within the budget
        check(fin.text, schema)
    wait_idle(engine)


def test_the_unconstrained_model_fails_these_schemas(engine, tokenizer):
    """The contrast the mask makes: the same tiny model without it produces no valid output at all."""
    reqs = [EngineRequest(engine.encode(p), SamplingParams(max_new_tokens=40, temperature=1.0, seed=s))
            for s, p in enumerate(["{", "def add(a, b):", "The quick", "["])]
    for fin in run_all(engine, reqs):
        for schema in SCHEMAS.values():
            try:
                check(fin.text, schema)
            except (json.JSONDecodeError, AssertionError):
                continue
            raise AssertionError(f"unexpectedly valid: {fin.text!r}")


def test_json_object_mode(engine, tokenizer):
    c = compile_response_format({"type": "json_object"}, tokenizer)
    assert c.kind == "json_object"
    reqs = [EngineRequest(engine.encode(p), SamplingParams(max_new_tokens=300, temperature=0.7, seed=s), constraint=c)
            for s, p in enumerate(["{", "The quick", "def", "[1, 2]"])]
    finished = run_all(engine, reqs)
    done = [f for f in finished if f.finish_reason == "stop"]
    assert done, [f.text for f in finished]  # an unbounded grammar may run out of tokens; most do not
    for f in done:
        assert isinstance(json.loads(f.text), dict), f.text
    for f in finished:
        assert f.text.startswith("{")
        if f.finish_reason == "length":
            assert f.completion_tokens == 300


def test_generate_uses_the_same_matcher_and_equals_the_engine(engine, model, tokenizer):
    schema = SCHEMAS["nested"]
    c = compile_response_format(rf(schema), tokenizer)
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=7)
    alone = generate(model, tokenizer, "The quick", params, constraint=c)[0]
    check(alone.text, schema)
    assert alone.finish_reason == "stop"
    # A seeded engine row samples from its own generator: the same tokens as generate(seed) for one prompt.
    fin = run_all(engine, [EngineRequest(engine.encode("The quick"), params, constraint=c)])[0]
    assert fin.token_ids == alone.token_ids and fin.text == alone.text
    batch = generate(model, tokenizer, ["def add(a, b):", "{", "x"], SamplingParams(max_new_tokens=200, temperature=0),
                     constraint=c)
    for r in batch:
        check(r.text, schema)


# -- the engine: mixed batches, eos, logprobs, failures -------------------------------------------

def test_only_constrained_rows_are_masked(engine, model, tokenizer):
    c = compile_response_format(rf(SCHEMAS["enum"]), tokenizer)
    greedy = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[])
    prompts = ["def add(a, b):", "The quick", "{", "x"]
    reqs = [EngineRequest(engine.encode(p), greedy, constraint=c if i % 2 else None) for i, p in enumerate(prompts)]
    for i, fin in enumerate(run_all(engine, reqs)):
        if i % 2:
            check(fin.text, SCHEMAS["enum"])
            assert fin.finish_reason == "stop"
        else:  # untouched: exactly what the model generates alone
            assert fin.text == generate(model, tokenizer, prompts[i], greedy)[0].text
            assert fin.finish_reason == "length"
    wait_idle(engine)


class EosFirst(torch.nn.Module):
    """The tiny model with a huge eos logit: unconstrained, every sequence ends at once."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, *a, **k):
        logits = self.inner(*a, **k).clone()
        logits[..., self.config.eos_token_id] += 1000.0
        return logits


def test_eos_only_where_the_grammar_accepts(model, tokenizer):
    eos = model.config.eos_token_id
    with Engine(EosFirst(model), tokenizer, max_concurrent=4) as eng:
        free = run_all(eng, [EngineRequest(eng.encode("x"), SamplingParams(max_new_tokens=20, temperature=0))])[0]
        assert free.text == "" and free.completion_tokens == 1  # eos at once
        # An integer accepts after its first digit: eos comes right there, and is not part of the output.
        num = {"type": "integer", "minimum": 0, "maximum": 1000}
        obj = SCHEMAS["required"]
        reqs = [EngineRequest(eng.encode("x"), SamplingParams(max_new_tokens=60, temperature=0),
                              constraint=compile_response_format(rf(s), tokenizer), logprobs=2) for s in (num, obj)]
        f_num, f_obj = run_all(eng, reqs)
        check(f_num.text, num)
        assert f_num.finish_reason == "stop" and eos not in f_num.token_ids
        assert f_num.completion_tokens == len(f_num.token_ids) + 1  # ended by the eos token
        # An object is complete at its closing brace: the row ends there without sampling eos.
        check(f_obj.text, obj)
        assert f_obj.finish_reason == "stop" and f_obj.completion_tokens == len(f_obj.token_ids)
        # logprobs come from the masked distribution: finite, alternatives all allowed, summing to at most 1
        for lp in f_obj.logprobs:
            assert all(x > float("-inf") for _, x in lp.top) and lp.logprob > float("-inf")
            assert sum(torch.tensor([x for _, x in lp.top]).exp().tolist()) <= 1 + 1e-4
            assert eos not in [t for t, _ in lp.top]


def test_no_stop_token_ends_at_grammar_completion(engine, tokenizer):
    c = compile_response_format(rf(SCHEMAS["range"]), tokenizer)
    fin = run_all(engine, [EngineRequest(engine.encode("x"), SamplingParams(max_new_tokens=50, temperature=1.0,
                                                                             seed=3, stop_token_ids=[]),
                                         constraint=c)])[0]
    check(fin.text, SCHEMAS["range"])
    assert fin.finish_reason == "stop" and len(fin.text) == 2


@pytest.mark.parametrize("where", ["advance", "mask"])
def test_a_failing_grammar_fails_its_row_only_and_frees_the_slot(engine, tokenizer, monkeypatch, where):
    doomed = compile_response_format(rf(SCHEMAS["nested"], "doomed"), tokenizer)
    healthy = compile_response_format(rf(SCHEMAS["required"], "healthy"), tokenizer)
    real_advance, real_fill = ConstraintMatcher.advance, ConstraintMatcher.fill_bitmask

    def advance(self, token):
        if where == "advance" and self.compiled is doomed and self.tokens >= 2:
            raise ConstraintError("injected failure")
        real_advance(self, token)

    def fill_bitmask(self, words):
        if where == "mask" and self.compiled is doomed and self.tokens >= 2:
            raise RuntimeError("injected failure")
        real_fill(self, words)

    monkeypatch.setattr(ConstraintMatcher, "advance", advance)
    monkeypatch.setattr(ConstraintMatcher, "fill_bitmask", fill_bitmask)
    params = SamplingParams(max_new_tokens=100, temperature=0)
    reqs = [EngineRequest(engine.encode(p), params, constraint=c)
            for p, c in (("x", doomed), ("The quick", healthy), ("{", None), ("def", doomed))]
    out = run_all(engine, reqs)
    assert isinstance(out[0], Failed) and isinstance(out[3], Failed)
    assert "structured output failed" in out[0].message and "injected failure" in out[0].message
    assert isinstance(out[1], Finished) and isinstance(out[2], Finished)
    check(out[1].text, SCHEMAS["required"])
    wait_idle(engine)
    monkeypatch.undo()
    again = run_all(engine, [EngineRequest(engine.encode("x"), params, constraint=doomed)])[0]
    check(again.text, SCHEMAS["nested"])


def test_the_engine_refuses_a_constraint_that_was_not_compiled(engine):
    with pytest.raises(ValueError, match="compile_response_format"):
        engine.submit(EngineRequest(engine.encode("x"), SamplingParams(), constraint={"type": "json_object"}),
                      lambda ev: None)


# -- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "strin"}}}, ["strin"]),
    (rf({"type": "object", "required": "name"}), ["required"]),
    (rf({"type": "integer", "minimum": 5, "maximum": 2}), ["minimum", "maximum"]),
    (rf({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), ["missing"]),
    (rf({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), ["not"]),
    (rf({"type": "array", "uniqueItems": True}), ["uniqueItems"]),
    (rf({"type": "string", "format": "colour"}), ["colour"]),
    (rf({"type": "object", "properties": {"a": {"type": "string", "maxLenght": 3}}}),
     ["maxLenght", "#/properties/a", "not a JSON Schema keyword"]),
    (rf({"type": "object", "x-guidance": {"lenient": True}, "properties": {"a": {"not": {}}}}), ["not"]),
    (rf([1, 2]), ["schema must be a JSON Schema object"]),
    (rf(False), ["false"]),
    ({"type": "json_schema", "json_schema": {"name": "t"}}, ["schema is missing"]),
    ({"type": "json_schema", "json_schema": {"name": "t", "shema": {}}}, ["shema"]),
    ({"type": "json_schema"}, ["json_schema must be an object"]),
    ({"type": "regex"}, ["text, json_object, json_schema", "regex"]),
    ({"type": "json_object", "schema": {}}, ["unexpected field", "schema"]),
    ("json", ["response_format must be an object"]),
])
def test_unenforceable_formats_are_refused_with_the_reason(tokenizer, fmt, words):
    with pytest.raises(ConstraintError) as e:
        compile_response_format(fmt, tokenizer)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_text_and_none_are_no_constraint_and_compiles_are_cached(tokenizer):
    assert compile_response_format(None, tokenizer) is None
    assert compile_response_format({"type": "text"}, tokenizer) is None
    a = compile_response_format(rf({"type": "object", "properties": {"a": {"type": "integer"}, "b": {}}}), tokenizer)
    b = compile_response_format(rf({"properties": {"b": {}, "a": {"type": "integer"}}, "type": "object"}), tokenizer)
    assert a is b  # key order does not matter
    assert compile_response_format(rf(True), tokenizer).schema == {}


def test_a_missing_grammar_engine_is_a_constraint_error_naming_the_install(monkeypatch):
    fresh = train_tokenizer(CORPUS[:5], vocab_size=300, min_frequency=1)  # not in the tokenizer cache
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    with pytest.raises(ConstraintError, match=r"pip install .*llguidance"):
        compile_response_format({"type": "json_object"}, fresh)
    assert "pip install" in warm_up(fresh)


def test_masks_in_float32_and_bfloat16_agree(tokenizer):
    """The numpy path (float32 on a CPU) and the torch path (other dtypes and devices) forbid the same tokens."""
    assert warm_up(tokenizer) is None
    c = compile_response_format(rf(SCHEMAS["nested"]), tokenizer)
    V = tokenizer.get_vocab_size()
    m32, m16 = c.matcher({2}), c.matcher({2})
    for _ in range(12):
        a, b = torch.randn(3, V), torch.randn(3, V).bfloat16()
        assert mask_logits_(a, [1], [m32]) == {} and mask_logits_(b, [2], [m16]) == {}
        assert torch.equal(a[1].isinf(), b[2].isinf()) and not a[0].isinf().any() and not b[:2].isinf().any()
        assert torch.equal(~a[1].isinf(), m32.allowed_mask(V))
        t = int(a[1].argmax())
        m32.advance(t)
        m16.advance(t)


def test_allowed_mask_and_done(tokenizer):
    c = compile_response_format(rf({"enum": ["red", "green"]}), tokenizer)
    eos = tokenizer.token_to_id("<|eos|>")
    m = c.matcher({eos})
    V = tokenizer.get_vocab_size() + 7  # a model vocabulary padded past the tokenizer's
    first = m.allowed_mask(V)
    assert first.shape == (V,) and not first[eos] and not first[-7:].any()
    assert {tokenizer.decode([t]) for t in first.nonzero().flatten().tolist()} <= {'"', '"r', '"g', '"re', '"gr',
                                                                                    '"red', '"green', '"red"',
                                                                                    '"green"'}
    for t in tokenizer.encode('"red"', add_special_tokens=False).ids:
        assert m.allowed_mask(V)[t]
        m.advance(t)
    assert m.is_done() and m.is_accepting()
    assert m.allowed_mask(V).nonzero().flatten().tolist() == [eos]
    with pytest.raises(ConstraintError, match="not allowed"):
        c.matcher({eos}).advance(tokenizer.encode("x", add_special_tokens=False).ids[0])


# -- slm generate --json-schema / --json -------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, model, tokenizer):
    from slmkit.checkpoint import save_checkpoint
    from slmkit.data.tokenizer import special_token_ids, tokenizer_config

    root = tmp_path_factory.mktemp("json-cli")
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer,
                                                                                    special_token_ids(tokenizer))))
    return save_checkpoint(model, root / "ck", tokenizer_from=root / "tok")


def test_slm_generate_json_schema_and_json(ckpt_dir, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app

    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(SCHEMAS["required"]))
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(ckpt_dir), "A person:", "The quick", "--no-stream", "-n", "120",
                            "--json-schema", str(schema), "--seed", "0"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    values = [line[len(p):] for line in r.output.splitlines() for p in ("A person:", "The quick") if line.startswith(p)]
    assert len(values) == 2, r.output
    for v in values:
        check(v, SCHEMAS["required"])
    r = runner.invoke(app, ["generate", str(ckpt_dir), "x", "--json", "-n", "40", "--temperature", "0"])
    assert r.exit_code == 0 and r.output.startswith("x{"), r.output  # the random model may not close it in 40
    if "finish: stop" in r.output:
        assert isinstance(json.loads(r.output.split("\n")[0][1:]), dict), r.output

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"not": {}}}}))
    for args, message in ((["--json-schema", str(bad)], "not"), (["--json-schema", str(tmp_path / "nope.json")],
                                                                 "not found"),
                          (["--json", "--json-schema", str(schema)], "not both")):
        r = runner.invoke(app, ["generate", str(ckpt_dir), "x", *args], env={"COLUMNS": "200"})
        assert r.exit_code == 2 and message in r.output, r.output
