"""The eval suite: built-in default-domain tasks, task files with verifiers, and the CLI table/JSON."""

from __future__ import annotations

import json

import pytest

from slmkit.data import open_dataset
from slmkit.evaluate.suite import SuiteConfig, builtin_task, evaluate_checkpoint, parse_tasks
from slmkit.evaluate.tasks import TaskError
from tests.test_cli import slm


def test_builtin_tasks_come_from_held_out_files():
    from slmkit.data.default_tasks import heldout_files

    held = {doc_id for doc_id, _ in heldout_files(0.05)}
    nl = builtin_task("next-line", SuiteConfig(items=12), 0.05)
    fp = builtin_task("function-parse", SuiteConfig(items=12), 0.05)
    assert len(nl.items) == 12 and len(fp.items) == 12
    assert all(len(it.choices) == 4 and 0 <= it.gold < 4 for it in nl.items)
    assert all(it.prompt.startswith(("def ", "async def ")) and it.reference for it in fp.items)
    assert held  # the items above were drawn from these files only (see tests/data/test_default_tasks.py)


def test_suite_with_lm_files_and_verifiers(ckpt, tiny_dataset, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "import", "choices": [" os", " sys"], "gold": 0}) + "\n{bad\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "def f(x):\n", "reference": "    return x"}) + "\n")
    res = evaluate_checkpoint(ckpt, parse_tasks(f"lm,{mc},{gen}@python-syntax,{gen}"), data=tiny_dataset,
                              cfg=SuiteConfig(max_tokens=512, max_new_tokens=8, seq_len=64))
    s = res["summary"]
    assert s["bits_per_byte"] > 0 and s["mc_acc"] in (0.0, 1.0)
    assert 0.0 <= s["gen_pass_rate"] <= 1.0 and 0.0 <= s["gen_score"] <= 1.0
    assert res["tasks"][str(mc)]["skipped_lines"] == [f"{mc}:2: Expecting property name enclosed in double "
                                                      "quotes: line 1 column 2 (char 1)"]
    with pytest.raises(TaskError, match="unknown task 'bogus'"):
        parse_tasks("lm,bogus")
    with pytest.raises(TaskError, match="pass --data"):
        evaluate_checkpoint(ckpt, ["lm"])


def test_eval_and_bench_commands(ckpt, tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "def f(x):\n", "reference": "    return x"}) + "\n")
    out = tmp_path / "e.json"
    r = slm("eval", ckpt, "--tasks", f"{gen}@python-syntax", "--max-new-tokens", 4, "--json", out)
    assert "pass rate" in r.stdout and json.loads(out.read_text())["summary"]["gen_pass_rate"] in (0.0, 1.0)
    r = slm("eval", ckpt, "--tasks", "nope", ok=False)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr
    r = slm("bench", ckpt, "--prompt-len", 8, "--new-tokens", 4, "--repeats", 1, "--batch-sizes", "1,2",
            "--json", tmp_path / "b.json")
    assert "time to first token" in r.stdout and json.loads((tmp_path / "b.json").read_text())["decode_tok_s_b2"] > 0


def test_item_count_per_builtin_task(ckpt, tiny_dataset):
    assert parse_tasks("lm,next-line:7,function-parse:3") == ["lm", "next-line:7", "function-parse:3"]
    for bad in ("lm:5", "next-line:x", "next-line:0", "nextline:5"):
        with pytest.raises(TaskError, match=bad.replace(":", ".")):
            parse_tasks(bad)
    res = evaluate_checkpoint(ckpt, ["next-line:7"], data=tiny_dataset, cfg=SuiteConfig(items=3))
    assert res["tasks"]["next-line"]["items"] == 7 and "next_line_acc" in res["summary"]


def test_lm_scores_the_same_tokens_whichever_tasks_run_beside_it(ckpt, tiny_dataset, tmp_path):
    """`--tasks lm` and `--tasks lm,next-line` used to score different token counts (the whole split vs the
    first 65,536 tokens) and the suite ignored --split and --precision: one scoring function now serves both."""
    from typer.testing import CliRunner

    from slmkit.cli import app

    results = []
    for tasks in ("lm", "lm,next-line:2"):
        out = tmp_path / f"{len(results)}.json"
        r = CliRunner().invoke(app, ["eval", str(ckpt), "--data", str(tiny_dataset), "--tasks", tasks, "--split",
                                     "train", "--seq-len", "64", "--json", str(out)])
        assert r.exit_code == 0, r.output
        res = json.loads(out.read_text())
        results.append(res if tasks == "lm" else res["tasks"]["lm"])
    train_tokens = len(open_dataset(tiny_dataset).split("train"))
    assert results[0]["tokens"] == results[1]["tokens"] == min(train_tokens - 1, SuiteConfig().max_tokens)
    assert results[0]["bits_per_byte"] == results[1]["bits_per_byte"]
    assert results[0]["bytes"] == results[1]["bytes"]


def test_progress_hook_totals_match_the_work(ckpt, tiny_dataset):
    bars = {}

    def hook(description, total):
        bars[description] = [total, 0]

        def advance(n):
            bars[description][1] += n
        return advance

    evaluate_checkpoint(ckpt, ["lm", "next-line:3"], data=tiny_dataset, cfg=SuiteConfig(max_tokens=300, seq_len=64),
                        progress=hook)
    assert bars and all(total == done > 0 for total, done in bars.values()), bars
    assert any(d.startswith("next-line") for d in bars) and bars["lm (val bits/byte)"][0] == 5  # ceil(300 / 64)
