"""Shipped recipes run end to end through `slm run` (scaled down with --set), and a rerun is cached;
`slm select` builds, measures and recommends; `slm eval --tasks` and `slm bench` print their tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import slm

RECIPES = Path(__file__).resolve().parents[2] / "slmkit" / "recipes"
TINY = ["data.max_bytes=150000", "data.vocab_size=384", "data.val_fraction=0.1",
        "*.time_budget_s=null", "*.seq_len=64", "*.batch_size=4", "*.eval_every=0",
        "teacher.model=micro", "teacher.steps=8", "student.student=micro", "student.steps=4",
        "select.tasks=[lm]", "select.max_tokens=2048", "select.seq_len=64", "select.bench_prompt_len=16",
        "select.bench_new_tokens=8", "select.bench_repeats=1", "select.budget=bytes<=200KB"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.slow
def test_distill_compress_select_recipe(tmp_path):
    work = tmp_path / "w"
    r = slm("run", RECIPES / "distill-compress-select.yaml", "--workdir", work, *sets(TINY))
    assert "recommended" in r.stdout
    sel = json.loads((work / "select" / "selection.json").read_text())
    assert set(sel["candidates"]) == {"student", "student-int8", "student-int4"}
    assert "teacher" in sel["references"]
    for row in sel["candidates"].values():
        assert row["bytes_on_disk"] > 0 and row["decode_tok_s_b1"] > 0 and row["bits_per_byte"] > 0
    # int4 with quantized embeddings is the only candidate under 200 KB
    assert sel["recommended"] == "student-int4"
    report = (work / "report" / "report.md").read_text()
    assert "Recommended: student-int4" in report and "| student-int8 |" in report and "teacher (reference)" in report
    html = (work / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (work / "export" / "config.json").exists()  # the dense student in Hugging Face layout

    r = slm("run", RECIPES / "distill-compress-select.yaml", "--workdir", work, *sets(TINY))
    run = json.loads((work / "run.json").read_text())
    assert [s["name"] for s in run["stages"] if not s["cached"]] == ["report"]  # only the summary re-runs
    r = slm("run", RECIPES / "distill-compress-select.yaml", "--workdir", work,
            *sets([*TINY[:-1], "select.budget=bytes<=1GB"]))
    run = json.loads((work / "run.json").read_text())
    assert [s["name"] for s in run["stages"] if not s["cached"]] == ["select", "report"]
    assert "measurement cached" in r.stderr


def test_run_rejects_bad_overrides(tmp_path):
    r = slm("run", RECIPES / "distill-compress-select.yaml", "--set", "nosuch.steps=3", ok=False)
    assert r.returncode == 2 and "no stage named 'nosuch'" in r.stderr
    r = slm("run", RECIPES / "distill-compress-select.yaml", "--set", "teacher.lr=-1", ok=False)
    assert r.returncode == 2 and "lr=-1 is invalid" in r.stderr
