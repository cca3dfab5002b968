"""The `ood` task: bits per byte on English prose outside the domain (licence texts every machine carries),
shown beside in-domain bits per byte for the teacher and every candidate."""

from __future__ import annotations

import json
import math

import pytest

from slmkit.evaluate import ood
from slmkit.evaluate.suite import SuiteConfig, evaluate_checkpoint, parse_tasks
from slmkit.evaluate.tasks import TaskError


def test_prose_is_found_read_in_a_fixed_order_and_cut_at_a_line_end():
    files = ood.prose_files()
    assert files, "no licence text found: this machine's Python should ship LICENSE.txt"
    names = [str(p) for p, _ in files]
    assert names == [str(p) for p in ood.candidate_files() if str(p) in names]  # reading order kept
    assert len({t for _, t in files}) == len(files)  # links and copies count once
    chosen = ood.prose_texts(4000)
    total = sum(len(t.encode()) for _, t in chosen)
    assert 0 < total <= 4000 and chosen[-1][1].endswith("\n")
    assert [p for p, _ in chosen] == [p for p, _ in files[:len(chosen)]]
    assert chosen[0][1] == files[0][1][:len(chosen[0][1])]  # a prefix of the first file, not a sample


def test_ood_task_on_a_tiny_model(ckpt, tiny_dataset):
    cfg = SuiteConfig(seq_len=64)
    first = evaluate_checkpoint(ckpt, parse_tasks("lm,ood:6000"), data=tiny_dataset, cfg=cfg)
    again = evaluate_checkpoint(ckpt, ["ood:6000"], cfg=cfg)  # needs no dataset; same numbers beside lm or alone
    res, s = first["tasks"]["ood"], first["summary"]
    assert math.isfinite(s["ood_bits_per_byte"]) and s["ood_bits_per_byte"] > 0
    assert s["ood_bits_per_byte"] == res["bits_per_byte"] == again["summary"]["ood_bits_per_byte"]
    assert res["tokens"] == again["tasks"]["ood"]["tokens"] > 0
    assert s["bits_per_byte"] != s["ood_bits_per_byte"]  # the two are reported side by side
    # the files used are named; the bytes scored are the prose's bytes (token byte lengths add up to them)
    assert res["files"] and all(f["bytes"] > 0 for f in res["files"])
    assert res["bytes"] == sum(f["bytes"] for f in res["files"]) <= 6000
    assert res["files"][0]["path"] == str(ood.prose_files()[0][0])


def test_ood_task_spec_and_a_machine_without_prose(ckpt, monkeypatch, tmp_path):
    assert parse_tasks("lm,ood,ood:2048") == ["lm", "ood", "ood:2048"]
    for bad in ("ood:x", "ood:0"):
        with pytest.raises(TaskError, match=bad.replace(":", ".")):
            parse_tasks(bad)
    monkeypatch.setattr(ood, "candidate_files", lambda: [tmp_path / "LICENSE.txt", tmp_path / "GPL-3"])
    with pytest.raises(TaskError, match=r"ood task found no out-of-domain English prose .*LICENSE.txt.*drop `ood`"):
        evaluate_checkpoint(ckpt, ["ood"])


def test_eval_command_prints_the_ood_row(ckpt, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app

    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--tasks", "ood:3000", "--seq-len", "64", "--json", str(out)],
                           env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "outside the domain" in r.output
    assert json.loads(out.read_text())["summary"]["ood_bits_per_byte"] > 0


def test_selection_table_shows_ood_for_the_teacher_and_every_candidate():
    from slmkit.evaluate.pareto import direction, field_name
    from slmkit.evaluate.report import candidates_table

    rows = {"base": {"bits_per_byte": 1.2, "ood_bits_per_byte": 2.5},
            "int4": {"bits_per_byte": 1.3, "ood_bits_per_byte": 2.7}}
    header, table = candidates_table({"references": {"teacher": {"bits_per_byte": 1.0, "ood_bits_per_byte": 1.6}},
                                      "candidates": rows, "recommended": "base"})
    col = header.index("bits/byte (out of domain)")
    assert header.index("bits/byte") < col
    assert [r[col] for r in table] == ["1.6000", "2.5000", "2.7000"]
    assert (field_name("ood_bpb"), direction("ood_bpb")) == ("ood_bits_per_byte", "min")
    header, _ = candidates_table({"candidates": {"base": {"bits_per_byte": 1.2}}})
    assert "bits/byte (out of domain)" not in header  # shown only when the task ran
