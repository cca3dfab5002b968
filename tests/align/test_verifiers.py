"""Verifiers on known good and bad inputs: every built-in, plug-ins, option parsing and errors."""

import json
import math
import sys

import pytest
import torch
from align_helpers import tiny_ckpt  # noqa: F401 - fixture

from slmkit.align.json_schema import SchemaError, validate
from slmkit.align.verifiers import VERIFIERS, VerifierError, VerifierResult, build_verifier, cut_function_body

DEF = 'def area(w, h):\n    """Area of a w x h rectangle."""\n'


def test_registry_lists_the_builtins():
    assert {"python-syntax", "json", "regex", "length", "teacher"} <= set(VERIFIERS)


@pytest.mark.parametrize("completion, passed, reason", [
    ("    return w * h\n", True, "parses"),
    ("    return w * h\n\n\nprint(area(2, 3))\nthis is not python (\n", True, "parses"),  # cut at the dedent
    ("    return (w * h\n", False, "SyntaxError"),
    ("    if w:\n    return h\n", False, "SyntaxError"),
    ("", False, "empty body"),
    ("   \n    # only a comment\n", False, "empty body"),
])
def test_python_syntax(completion, passed, reason):
    r = build_verifier("python-syntax")(DEF, completion)
    assert r.passed is passed and reason in r.reason and r.score == float(passed)


def test_python_syntax_cut_rule_and_span():
    r = build_verifier("python-syntax")(DEF, "    return w * h\n\ndef other(:\n")
    assert r.passed and r.span == "    return w * h\n\n"
    assert not build_verifier("python-syntax:cut=false")(DEF, "    return w * h\n\ndef other(:\n").passed
    # a completion that continues the prompt's unfinished last line is a whole, uncut line
    assert cut_function_body("def f():\n    return", " 1\nx = (", 0) == " 1\n"
    assert cut_function_body("def f():\n    return", " 1", 0) == " 1"


def test_python_syntax_on_a_method_and_error_line():
    prompt = 'class Box:\n    def size(self):\n        """Size."""\n'
    v = build_verifier("python-syntax")
    assert v(prompt, "        return self.n\n    def other(self):\n        broken(\n").passed
    bad = v(prompt, "        return self.n +\n")
    assert not bad.passed and "line 4 of prompt+completion" in bad.reason
    assert v("", "x = 1\n").passed and not build_verifier("python-syntax:require_body=false")("x = (", "").passed


def test_json_and_extract():
    v = build_verifier("json")
    assert v("", ' {"a": [1, 2.5, null]} \n').passed
    r = v("", '{"a": 1,}')
    assert not r.passed and "invalid JSON" in r.reason and "column" in r.reason
    e = build_verifier("json:extract=true")
    r = e("", 'Here you go: {"a": {"b": [1]}} and more text')
    assert r.passed and r.span == '{"a": {"b": [1]}}'
    assert not e("", "no json here").passed


def test_json_schema(tmp_path):
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 5},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    v = build_verifier(f"json:schema={path}")
    assert v("", '{"name": "Ann", "age": 30.0, "tags": ["a"]}').passed
    cases = {'{"name": "Ann"}': "missing required property 'age'",
             '{"name": "Ann", "age": true}': "$.age: expected integer, got boolean",
             '{"name": "Ann", "age": -1}': "below the minimum 0",
             '{"name": "", "age": 1}': "shorter than minLength",
             '{"name": "Annabel", "age": 1}': "longer than maxLength",
             '{"name": "A", "age": 1, "x": 0}': "'x' is not allowed",
             '{"name": "A", "age": 1, "tags": ["c"]}': "$.tags[0]",
             '[1]': "expected object, got array"}
    for text, why in cases.items():
        r = v("", text)
        assert not r.passed and why in r.reason, (text, r.reason)


def test_json_schema_subset_is_honest(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"pattern": "^x"}}}))
    with pytest.raises(VerifierError, match=r"unsupported JSON Schema keyword\(s\) \['pattern'\] at #/properties/a"):
        build_verifier(f"json:schema={path}")
    with pytest.raises(VerifierError, match="schema file not found"):
        build_verifier(f"json:schema={tmp_path / 'nope.json'}")
    with pytest.raises(SchemaError):
        from slmkit.align.json_schema import check_schema
        check_schema({"type": "decimal"})
    assert validate(1, {"enum": [1.0]}) is None and validate(True, {"enum": [1]}) is not None
    assert validate(3, {"type": ["string", "null"]}) == "$: expected string or null, got integer"


def test_regex_options_with_commas_and_fullmatch():
    v = build_verifier("regex:pattern=^[a-z]{2,4}$,fullmatch=true")
    assert v.pattern == "^[a-z]{2,4}$" and v.fullmatch
    assert v("", "abc").passed and not v("", "abcdef").passed
    s = build_verifier("regex:pattern=ok,ignorecase=yes")
    assert s("", "it is OK.").passed and not s("", "nope").passed
    assert not build_verifier("regex:pattern=ok.,fullmatch=1")("", "ok!\n").passed
    with pytest.raises(VerifierError, match="does not compile"):
        build_verifier("regex:pattern=(")
    with pytest.raises(VerifierError, match="needs pattern"):
        build_verifier("regex")


def test_length_chars_and_tokens(tiny_ckpt):
    v = build_verifier("length:min_chars=3,max_chars=5")
    assert v("", "abcd").passed and "2 chars < min 3" in v("", "ab").reason and not v("", "abcdef").passed
    t = build_verifier(f"length:max_tokens=3,tokenizer={tiny_ckpt}")
    assert t("", "a").passed and not t("", "word " * 10).passed
    with pytest.raises(VerifierError, match="token bounds need tokenizer"):
        build_verifier("length:max_tokens=3")("", "x")
    with pytest.raises(VerifierError, match="needs min_chars"):
        build_verifier("length")


def test_teacher_scores_mean_loglik_of_the_completion(tiny_ckpt):
    from slmkit.checkpoint import load_checkpoint

    v = build_verifier(f"teacher:ckpt={tiny_ckpt}")
    assert v.graded
    prompt, completion = "def f(x):\n", "    return x\n"
    r = v(prompt, completion)
    ck = load_checkpoint(tiny_ckpt)
    tok = ck.tokenizer()
    head = [ck.config.bos_token_id] + tok.encode(prompt, add_special_tokens=False).ids
    tail = tok.encode(completion, add_special_tokens=False).ids
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = ck.model(ids[:, :-1]).log_softmax(-1)[0]
    expected = sum(logp[len(head) - 1 + i, t].item() for i, t in enumerate(tail)) / len(tail)
    assert r.score == pytest.approx(expected, abs=1e-4) and r.passed
    # batched scoring (right-padded rows of different lengths) gives the same numbers
    batch = v.score_batch([prompt, "x", prompt], [completion, "yy zz", ""])
    assert batch[0].score == pytest.approx(r.score, abs=1e-5) and math.isinf(batch[2].score) and not batch[2].passed
    strict = build_verifier(f"teacher:ckpt={tiny_ckpt},threshold=0")
    assert not strict(prompt, completion).passed and "< threshold 0" in strict(prompt, completion).reason
    with pytest.raises(VerifierError, match="needs ckpt"):
        build_verifier("teacher")


def test_plugins_from_a_file_and_a_module(tmp_path, monkeypatch):
    f = tmp_path / "checks.py"
    f.write_text("from slmkit.align.verifiers import VerifierResult\n"
                 "def polite(prompt, completion):\n    return 'please' in completion\n"
                 "def score(prompt, completion, scale='1'):\n    return float(scale) * len(completion)\n"
                 "def full(prompt, completion):\n    return VerifierResult(True, 0.5, 'custom')\n"
                 "def broken(prompt, completion):\n    return 'yes'\n")
    polite = build_verifier(f"{f}:polite")
    assert polite("", "please sit").passed and not polite("", "sit").passed and not polite.graded
    scored = build_verifier(f"{f}:score:scale=2,threshold=5")
    r = scored("", "abc")
    assert r.score == 6.0 and r.passed and scored.graded and not scored("", "ab").passed
    assert build_verifier(f"{f}:full")("", "") == VerifierResult(True, 0.5, "custom")
    with pytest.raises(VerifierError, match="returned str"):
        build_verifier(f"{f}:broken")("", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_verifier("checks:polite")("", "please").passed
    sys.modules.pop("checks", None)


@pytest.mark.parametrize("spec, match", [
    ("nope", "unknown verifier 'nope'"),
    ("python-syntax:foo=1", r"unknown option\(s\) \['foo'\]"),
    ("python-syntax:cut", "must be key=value"),
    ("length:min_chars=many", "not a valid int"),
    ("no_such_module_xyz:f", "cannot import"),
    ("missing_file.py:f", "does not exist"),
    ("json:no_such:x", "must be key=value"),
])
def test_bad_specs(spec, match):
    with pytest.raises(VerifierError, match=match):
        build_verifier(spec)


def test_plugin_import_failure_and_missing_function(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(VerifierError, match="importing .* failed: RuntimeError: boom"):
        build_verifier(f"{f}:x")
    g = tmp_path / "ok.py"
    g.write_text("x = 1\n")
    with pytest.raises(VerifierError, match="has no function 'f'"):
        build_verifier(f"{g}:f")
