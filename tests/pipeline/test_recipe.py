"""Recipe runner: validation errors name the stage, unchanged stages are skipped, an edited stage re-runs
with everything downstream of it, an interrupted stage resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from slmkit.pipeline import recipe as recipe_mod
from slmkit.pipeline.recipe import RecipeError, recipe_from_dict, run_recipe
from slmkit.pipeline.stages import STAGES, StageKind

CALLS: list[tuple[str, bool]] = []


@dataclass
class EchoOptions:
    text: str = ""
    src: str | None = None
    fail: bool = False


def run_echo(opts: EchoOptions, out, ctx):
    CALLS.append((out.name, ctx.resume))
    if opts.fail:
        raise RuntimeError("boom")
    upstream = (open(opts.src).read() if opts.src else "")
    (out / "out.txt").write_text(upstream + opts.text)
    return {"length": len(upstream + opts.text)}


@pytest.fixture(autouse=True)
def echo_stage(monkeypatch):
    monkeypatch.setitem(STAGES, "echo", StageKind(EchoOptions, run_echo, artifact=lambda out: out / "out.txt"))
    CALLS.clear()


def recipe(tmp_path, b_text="b", c_text="c"):
    return recipe_from_dict({"name": "t", "workdir": str(tmp_path / "w"), "stages": [
        {"name": "a", "kind": "echo", "with": {"text": "a"}},
        {"name": "b", "kind": "echo", "with": {"text": b_text, "src": "@a"}},
        {"name": "c", "kind": "echo", "with": {"text": c_text, "src": "@b"}},
        {"name": "d", "kind": "echo", "with": {"text": "d", "src": "@a"}},
    ]}, source="t.yaml")


def test_unchanged_stages_are_skipped_and_edits_rerun_downstream(tmp_path):
    recs = run_recipe(recipe(tmp_path), log=lambda m: None)
    assert [c[0] for c in CALLS] == ["a", "b", "c", "d"] and not any(r.cached for r in recs)
    assert (tmp_path / "w" / "c" / "out.txt").read_text() == "abc"
    CALLS.clear()
    recs = run_recipe(recipe(tmp_path), log=lambda m: None)
    assert CALLS == [] and all(r.cached for r in recs)
    assert recs[2].metrics == {"length": 3}
    recs = run_recipe(recipe(tmp_path, b_text="B"), log=lambda m: None)
    assert [c[0] for c in CALLS] == ["b", "c"]  # d depends only on a
    assert (tmp_path / "w" / "c" / "out.txt").read_text() == "aBc"
    run_summary = json.loads((tmp_path / "w" / "run.json").read_text())
    assert [s["cached"] for s in run_summary["stages"]] == [True, False, False, True]


def test_force_and_until(tmp_path):
    run_recipe(recipe(tmp_path), log=lambda m: None)
    CALLS.clear()
    run_recipe(recipe(tmp_path), force=("c",), log=lambda m: None)
    assert [c[0] for c in CALLS] == ["c", "d"]  # forced: c and every later stage
    CALLS.clear()
    recs = run_recipe(recipe(tmp_path, c_text="x"), until="b", log=lambda m: None)
    assert CALLS == [] and [r.name for r in recs] == ["a", "b"]
    with pytest.raises(RecipeError, match="no stage named 'zz'"):
        run_recipe(recipe(tmp_path), force=("zz",), log=lambda m: None)


def test_an_interrupted_stage_resumes_and_a_stale_one_is_cleared(tmp_path):
    r = recipe_from_dict({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "a", "kind": "echo", "with": {"text": "a", "fail": True}}]})
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(r, log=lambda m: None)
    assert (tmp_path / "w" / "a" / ".stage.pending.json").exists()
    with pytest.raises(RuntimeError):
        run_recipe(r, log=lambda m: None)
    assert CALLS == [("a", False), ("a", True)]  # the same key again: resume
    (tmp_path / "w" / "a" / "stale.bin").write_text("old")
    r.stages[0].options["fail"] = False
    run_recipe(r, log=lambda m: None)
    assert CALLS[-1] == ("a", False) and not (tmp_path / "w" / "a" / "stale.bin").exists()


def test_a_changed_input_file_invalidates_the_stage(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one")
    r = recipe_from_dict({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "a", "kind": "echo", "with": {"src": str(src)}}]})
    run_recipe(r, log=lambda m: None)
    run_recipe(r, log=lambda m: None)
    src.write_text("two")
    run_recipe(r, log=lambda m: None)
    assert len(CALLS) == 2 and (tmp_path / "w" / "a" / "out.txt").read_text() == "two"


def test_a_cache_that_readers_write_inside_an_input_directory_does_not_invalidate_the_stage(tmp_path):
    """Evaluating a vocabulary-trimmed model writes the dataset's remapped split into DATASET/.vocab-remap/: that
    is derived, not an edit of the input; an edit of the input still re-runs the stage."""
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "meta.json").write_text("{}")
    r = recipe_from_dict({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "a", "kind": "echo", "with": {"src": str(ds / "meta.json"), "text": str(ds)}}]})
    run_recipe(r, log=lambda m: None)
    (ds / ".vocab-remap" / "abc").mkdir(parents=True)
    (ds / ".vocab-remap" / "abc" / "meta.json").write_text("{}")
    run_recipe(r, log=lambda m: None)
    assert len(CALLS) == 1
    (ds / "extra.bin").write_text("new")
    run_recipe(r, log=lambda m: None)
    assert len(CALLS) == 2


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "kind": "nope"}], "stage 1: unknown kind 'nope'"),
    ([{"name": "a", "kind": "echo", "with": {"src": "@later"}}], r"stage 1 \(a\): '@later' does not name an earlier"),
    ([{"name": "a", "kind": "echo"}, {"name": "a", "kind": "echo"}], "stage 2: a stage named 'a' already exists"),
    ([{"name": "a", "kind": "echo", "with": {"colour": 1}}], r"unknown option\(s\) \['colour'\]"),
    ([{"name": "t", "kind": "train", "with": {"data": "x", "lr": -1}}], r"stage 1 \(t\): lr=-1 is invalid"),
    ([{"name": "t", "kind": "train", "with": {}}], "missing 1 required positional argument: 'data'"),
    ([{"name": "a/b", "kind": "echo"}], "must be letters, digits"),
    ([{"kind": "echo", "extra": 1}], r"unknown field\(s\) \['extra'\]"),
])
def test_bad_recipes_name_the_stage(stages, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"stages": stages}, source="r.yaml")


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe_mod.load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        recipe_mod.load_recipe(bad)
    bad.write_text("stages: []\n")
    with pytest.raises(RecipeError, match="'stages' must be a non-empty list"):
        recipe_mod.load_recipe(bad)


def test_data_stage_passes_the_file_limit_and_hidden_files_through(tmp_path):
    import inspect

    from slmkit.data import build_dataset
    from slmkit.pipeline.stages import DataOptions
    from tests.data.conftest import CODE, PROSE

    library = inspect.signature(build_dataset).parameters
    for name in ("max_file_bytes", "include_hidden"):  # one definition of each default
        assert getattr(DataOptions(), name) == library[name].default, name
    src = tmp_path / "src"
    src.mkdir()
    (src / "code.py").write_text(CODE)
    (src / "notes.md").write_text(PROSE * 4)  # ~700 bytes
    (src / ".env").write_text("DATABASE_PASSWORD=hunter2\n" + PROSE)
    common = {"sources": [str(src)], "vocab_size": 300, "val_fraction": 0}
    for name, options, counts in (("plain", {}, {"hidden": 1}),
                                  ("opened", {"include_hidden": True, "max_file_bytes": 500}, {"too large": 1})):
        r = recipe_from_dict({"name": name, "workdir": str(tmp_path / name), "stages": [
            {"name": "ds", "kind": "data", "with": {**common, **options}}]}, source=f"{name}.yaml")
        run_recipe(r, quiet=True, log=lambda _: None)
        meta = json.loads((tmp_path / name / "ds" / "meta.json").read_text())
        assert meta["skipped_counts"] == counts and meta["documents"] == 2
        assert meta["include_hidden"] is options.get("include_hidden", False)
        assert meta["max_file_bytes"] == options.get("max_file_bytes", library["max_file_bytes"].default)


def test_smollm2_quickstart_recipe_loads_and_a_missing_import_source_is_named(tmp_path):
    from slmkit.pipeline.quickstart import run_quickstart
    from slmkit.pipeline.recipe import RecipeError, load_recipe, run_recipe

    recipe = load_recipe("quickstart-smollm2", workdir=tmp_path / "w")
    assert [s.name for s in recipe.stages][:2] == ["teacher", "data"]
    missing = tmp_path / "nope.gguf"
    recipe = load_recipe("quickstart-smollm2", workdir=tmp_path / "w", overrides=[f"teacher.source={missing}"])
    with pytest.raises(RecipeError, match="does not exist"):
        run_recipe(recipe, quiet=True, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown teacher"):
        run_quickstart(tmp_path / "q", teacher="bogus")


def test_a_second_run_of_the_same_workdir_is_refused_while_the_first_holds_it(tmp_path):
    """Two runs in one workdir would clear each other's stage directories: the second is refused by name, and
    the lock dies with its holder (no stale lock after a crash)."""
    import subprocess
    import sys

    r = recipe(tmp_path)
    r.workdir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"fh = open({str(r.workdir / '.lock')!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "fh.write('pid 4242'); fh.flush(); print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecipeError, match=r"another run of this workdir is in progress \(pid 4242\)"):
            run_recipe(r, log=lambda m: None)
        assert CALLS == [] and not (r.workdir / "a").exists()
    finally:
        holder.kill()
        holder.wait()
    recs = run_recipe(r, log=lambda m: None)  # the holder died: its lock went with it
    assert [x.name for x in recs] == ["a", "b", "c", "d"]
