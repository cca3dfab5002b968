"""Verifier-made preference pairs: pair selection, prompt files, and `slm pairs` end to end on a tiny model."""

import json
import os
import subprocess
import sys

import pytest
from align_helpers import tiny_ckpt  # noqa: F401 - fixture

from slmkit.align.pairs import (PromptFileError, PromptItem, heldout_fraction, make_pairs, read_prompts,
                                select_pair)
from slmkit.align.verifiers import VerifierResult, build_verifier

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def R(passed, score=None):
    return VerifierResult(passed, float(passed) if score is None else score)


def test_select_best_passing_against_worst_failing():
    results = [R(False, 0.3), R(True, 0.6), R(True, 0.9), R(False, 0.1), R(True, 0.9)]
    assert select_pair(results, list("abcde"), graded=False, margin=0) == (2, 3)


def test_select_skips_unanimous_unless_graded():
    assert select_pair([R(True)] * 3, list("abc"), graded=False, margin=0) == "all_passed"
    assert select_pair([R(False)] * 3, list("abc"), graded=False, margin=0) == "all_failed"
    graded = [R(True, -2.0), R(True, -0.5), R(True, -1.0)]
    assert select_pair(graded, list("abc"), graded=True, margin=1.0) == (1, 0)
    assert select_pair(graded, list("abc"), graded=True, margin=2.0) == "small_margin"
    assert select_pair([R(True), R(False)], ["same", "same"], graded=False, margin=0) == "identical"


def test_prompt_files_jsonl_text_and_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "def f():\n"}) + "\n{bad\n" + json.dumps({"x": 1}) + "\n"
                 + json.dumps({"id": "q7", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    problems = []
    items = read_prompts(f, template=lambda m: "T:" + m[-1]["content"], problems=problems)
    assert [(i.id, i.text, i.chat) for i in items] == [(f"{f}:1", "def f():\n", False), ("q7", "T:hi", True)]
    assert [p.split(": ")[0] for p in problems] == [f"{f}:2", f"{f}:3"]
    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\nsecond {not json}\n")
    assert [i.text for i in read_prompts(t, template=None, problems=[])] == ["first prompt", "second {not json}"]
    (tmp_path / "empty.jsonl").write_text('{"x": 1}\n{bad\n')
    with pytest.raises(PromptFileError, match="no usable prompt"):
        read_prompts(tmp_path / "empty.jsonl", template=None, problems=[])
    problems = []
    assert len(read_prompts(f, template=None, problems=problems)) == 1  # a chat prompt needs a template
    assert problems[-1] == f"{f}:4: a 'messages' prompt, but the checkpoint has no chat template"


def test_heldout_fraction_from_provenance(tiny_dataset, tmp_path):
    vf, why = heldout_fraction({"stages": [{"stage": "train", "data": {"path": str(tiny_dataset)}},
                                           {"stage": "sft", "data": {"files": []}}]})
    assert vf == 0.1 and str(tiny_dataset) in why
    assert heldout_fraction({})[0] == 0.01


def test_chat_prompts_give_message_pairs_that_slm_dpo_reads(tiny_ckpt, tmp_path):
    from slmkit.align.chat import chat_template_of, render_chat
    from slmkit.align.preference_data import PromptFormat, load_preference_pairs
    from slmkit.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    template, variables = chat_template_of(tiny_ckpt)
    messages = [{"role": "user", "content": f"Say something about {w}."} for w in ("cats", "tea", "rain")]
    items = [PromptItem(str(i), render_chat(template, [m], add_generation_prompt=True, **variables), [m])
             for i, m in enumerate(messages)]
    records, stats = make_pairs(ck.model, ck.tokenizer(), items, build_verifier("regex:pattern=e"), k=6,
                                max_new_tokens=6, seed=3, batch_prompts=2)
    assert stats.pairs == len(records) > 0 and stats.samples == 18
    for r in records:
        assert r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert "e" in r["chosen"][0]["content"] and "e" not in r["rejected"][0]["content"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, _ = load_preference_pairs(path, PromptFormat.from_checkpoint(tiny_ckpt, ck.tokenizer()), seq_len=128)
    assert len(examples) == len(records)


def slm_pairs(*args):
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "pairs", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_slm_pairs_end_to_end_is_valid_and_deterministic(tiny_ckpt, tmp_path):
    from slmkit.align.pairs import pairs_from_checkpoint

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("def add(a, b):\n", "import os\n", "class Queue:\n", "# A comment\n", "x = [")))
    spec = "regex:pattern=[aeiou]{1},fullmatch=false"
    r = slm_pairs(tiny_ckpt, "--prompts", prompts, "--verifier", spec, "-k", 6, "-n", 6, "--seed", 11,
                  "--batch-prompts", 3, "--out", tmp_path / "a.jsonl")
    text = (tmp_path / "a.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records and f"{len(records)} pairs from 5 prompts x 6 samples" in r.stdout
    verifier = build_verifier("regex:pattern=[aeiou]{1}")
    for rec in records:
        assert set(rec) >= {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "verifier"}
        assert rec["chosen"] != rec["rejected"] and rec["chosen_score"] == 1.0 and rec["rejected_score"] == 0.0
        assert verifier(rec["prompt"], rec["chosen"]).passed and not verifier(rec["prompt"], rec["rejected"]).passed
    # The same seed gives the same file (here through the Python API the command calls); another seed does not.
    # top_p is left out: the library and the command share one default, so the file must match without it
    sampling = dict(k=6, max_new_tokens=6, batch_prompts=3, temperature=0.8)
    pairs_from_checkpoint(tiny_ckpt, str(prompts), spec, tmp_path / "b.jsonl", seed=11, **sampling)
    assert (tmp_path / "b.jsonl").read_text() == text
    pairs_from_checkpoint(tiny_ckpt, str(prompts), spec, tmp_path / "c.jsonl", seed=12, **sampling)
    assert (tmp_path / "c.jsonl").read_text() != text
    with pytest.raises(PromptFileError, match="missing.jsonl: no such file"):
        pairs_from_checkpoint(tiny_ckpt, str(tmp_path / "missing.jsonl"), spec, tmp_path / "d.jsonl")


def test_slm_pairs_default_prompts_with_python_syntax(tiny_ckpt, tmp_path):
    r = slm_pairs(tiny_ckpt, "--prompts", "default", "--verifier", "python-syntax", "-k", 2, "-n", 4, "--limit", 2,
                  "--top-p", 0.95, "--out", tmp_path / "p.jsonl")  # samples known to fail (seed 0, top_p 0.95)
    # A random model writes no valid function bodies: both prompts are skipped as all-failed, and said so.
    assert "0 pairs from 2 prompts x 2 samples (pass rate 0.0%)" in r.stdout and "all failed 2" in r.stdout
    assert "val_fraction=0.1 from" in r.stderr  # the tiny dataset's held-out fraction, read from provenance
    assert (tmp_path / "p.jsonl").read_text() == ""


def test_slm_pairs_user_error_exits_2(tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "pairs", str(tiny_ckpt), "--prompts", "default",
                        "--verifier", "nope", "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 2 and "unknown verifier 'nope'" in r.stderr


def test_slm_pairs_draws_sampling_and_verifying_bars_on_a_terminal_only(tiny_ckpt, tmp_path, monkeypatch):
    from progress_capture import run_slm

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nimport os\nclass Queue:\n")
    args = ["pairs", tiny_ckpt, "--prompts", prompts, "--verifier", "regex:pattern=e", "-k", 3, "-n", 4,
            "--batch-prompts", 2]
    out, err = run_slm(monkeypatch, *args, "--out", tmp_path / "a.jsonl", terminal=True)
    assert "sampling (3 prompts x 3)" in err and "verifying (regex" in err and "9/9" in err, err
    assert "pairs from 3 prompts x 3 samples" in out and "prompts x 3)" not in out
    for flags, terminal in ((["--quiet"], True), ([], False)):  # quiet on a terminal; stderr a pipe
        out, err = run_slm(monkeypatch, *args, *flags, "--out", tmp_path / "b.jsonl", terminal=terminal)
        assert err == "" and "pairs from 3 prompts x 3 samples" in out
