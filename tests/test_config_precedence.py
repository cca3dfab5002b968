"""Every command that takes `--config` layers its training options the same way: explicit flags beat the file,
the file beats the stage's defaults; recipe stages and the library share those defaults (one definition)."""

import inspect
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmkit.align.defaults import DPO_TRAIN_DEFAULTS, PAIRS_SAMPLING, SFT_TRAIN_DEFAULTS
from slmkit.cli import app
from slmkit.train import TrainConfig


class Captured(Exception):
    pass


def _capture(monkeypatch, target: str, position: int):
    """Replace `module:function` by one that records its TrainConfig argument (positional index) and stops."""
    import importlib

    module, name = target.split(":")
    seen = {}

    def fake(*args, **kwargs):
        seen["cfg"] = args[position]
        raise Captured

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen


def _ckpt(tmp_path: Path, context: int = 4096) -> Path:
    ck = tmp_path / "ck"
    ck.mkdir(exist_ok=True)
    (ck / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
    return ck


# (command line without training options, patched function, index of its TrainConfig, the stage's defaults)
COMMANDS = {
    "train": (["train", "--data", "{tmp}/ds", "--out", "{tmp}/out"], "slmkit.train.pretrain:pretrain", 3, {}),
    "distill": (["distill", "--teacher", "{tmp}/t", "--student", "tiny", "--data", "{tmp}/ds", "--out", "{tmp}/o"],
                "slmkit.distill.run:distill", 4, {}),
    "sft": (["sft", "{ck}", "--data", "{tmp}/chat.jsonl", "--out", "{tmp}/out"], "slmkit.align.sft:sft", 3,
            SFT_TRAIN_DEFAULTS),
    "dpo": (["dpo", "{ck}", "--pairs", "{tmp}/pairs.jsonl", "--out", "{tmp}/out"], "slmkit.align.dpo:dpo", 3,
            DPO_TRAIN_DEFAULTS),
}


def _run(monkeypatch, tmp_path, command: str, extra: list[str], context: int = 4096) -> TrainConfig:
    args, target, position, _ = COMMANDS[command]
    ck = _ckpt(tmp_path, context)
    seen = _capture(monkeypatch, target, position)
    argv = [a.format(tmp=tmp_path, ck=ck) for a in args] + extra
    r = CliRunner().invoke(app, argv)
    assert isinstance(r.exception, Captured), (r.output, r.exception)
    return seen["cfg"]


def test_every_command_with_a_config_option_is_covered():
    """A new command taking --config must join COMMANDS (and so this precedence test)."""
    import typer.main

    group = typer.main.get_group(app)
    with_config = sorted(n for n, c in group.commands.items() if any(p.name == "config" for p in c.params))
    assert with_config == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_defaults_then_file_then_flags(monkeypatch, tmp_path, command):
    defaults = {**{f: getattr(TrainConfig(), f) for f in ("steps", "lr", "seq_len", "batch_size", "warmup_steps")},
                **COMMANDS[command][3]}
    cfg = _run(monkeypatch, tmp_path, command, [])
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.batch_size) == (defaults["steps"], defaults["lr"],
                                                                 defaults["seq_len"], defaults["batch_size"])

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("steps: 7\nlr: 0.0123\nseq_len: 48\nwarmup_steps: 3\n")
    cfg = _run(monkeypatch, tmp_path, command, ["--config", str(yaml_file)])
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.warmup_steps) == (7, 0.0123, 48, 3)  # the file beats defaults
    assert cfg.batch_size == defaults["batch_size"]  # fields the file leaves alone keep the stage's defaults

    cfg = _run(monkeypatch, tmp_path, command, ["--config", str(yaml_file), "--steps", "11", "--seq-len", "32"])
    assert (cfg.steps, cfg.seq_len) == (11, 32)  # flags beat the file
    assert (cfg.lr, cfg.warmup_steps) == (0.0123, 3)  # the file still beats defaults where no flag is given


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_seq_len_default_is_capped_at_the_model_context(monkeypatch, tmp_path, command):
    assert _run(monkeypatch, tmp_path, command, [], context=128).seq_len == 128
    # a value the user chose is kept (and the library refuses it with a message if it does not fit)
    assert _run(monkeypatch, tmp_path, command, ["--seq-len", "64"], context=128).seq_len == 64
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("seq_len: 300\n")
    assert _run(monkeypatch, tmp_path, command, ["--config", str(yaml_file)], context=128).seq_len == 300


def test_config_file_errors_name_the_file_and_field(tmp_path):
    from slmkit.align.defaults import StageConfigError, stage_train_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 5\nlearning_rate: 0.1\n")
    with pytest.raises(StageConfigError, match=r"bad.yaml.*learning_rate"):
        stage_train_config("sft", config_file=bad)
    bad.write_text("- steps\n")
    with pytest.raises(StageConfigError, match="expected a mapping"):
        stage_train_config("sft", config_file=bad)
    with pytest.raises(StageConfigError, match="lr=-1"):
        stage_train_config("dpo", explicit={"lr": -1.0})


def test_recipe_stages_train_with_the_same_defaults_as_the_command_line(tmp_path):
    from slmkit.pipeline.recipe import Recipe, RunContext
    from slmkit.pipeline.stages import _train_config

    ctx = RunContext(Recipe("r", tmp_path, []), {})
    ck = _ckpt(tmp_path, context=4096)
    for stage, defaults in (("sft", SFT_TRAIN_DEFAULTS), ("dpo", DPO_TRAIN_DEFAULTS)):
        cfg = _train_config({}, ctx, stage, str(ck))
        assert {k: getattr(cfg, k) for k in defaults} == dict(defaults)
        assert cfg.lr < TrainConfig().lr  # never the pretraining rate
        assert _train_config({"lr": 0.5}, ctx, stage, str(ck)).lr == 0.5
    assert _train_config({}, ctx, "dpo", str(_ckpt(tmp_path, context=200))).seq_len == 200


def test_pairs_sampling_defaults_are_defined_once():
    from slmkit.align.pairs import make_pairs
    from slmkit.commands.align import pairs as pairs_command
    from slmkit.pipeline.stages import PairsOptions

    library = inspect.signature(make_pairs).parameters
    command = inspect.signature(pairs_command).parameters
    recipe = PairsOptions(ckpt="x")
    for name in ("k", "temperature", "top_p", "max_new_tokens", "seed"):
        want = getattr(PAIRS_SAMPLING, name)
        assert library[name].default == want, name
        assert command[name].default.default == want, name
        assert getattr(recipe, name) == want, name
    assert PAIRS_SAMPLING.top_p == 1.0


def test_stage_defaults_are_part_of_the_recipe_cache_key():
    from slmkit.pipeline.recipe import StageSpec, stage_key

    spec = StageSpec("a", "sft", {"ckpt": "x", "data": ["d.jsonl"]})
    assert stage_key(spec, {}) == stage_key(spec, {})
    import slmkit.align.defaults as d

    old = d.STAGE_TRAIN_DEFAULTS
    try:
        d.STAGE_TRAIN_DEFAULTS = {**old, "sft": {**old["sft"], "lr": 1.0}}
        changed = stage_key(spec, {})
    finally:
        d.STAGE_TRAIN_DEFAULTS = old
    assert changed != stage_key(spec, {})


def _resumable(out: Path, total_steps: int) -> None:
    """A stand-in for an interrupted run's saved state: only its planned total is read before training."""
    (out / "last").mkdir(parents=True)
    (out / "last" / "trainer_state.json").write_text(json.dumps({"step": 2, "total_steps": total_steps}))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_resume_without_steps_keeps_the_saved_total(monkeypatch, tmp_path, command):
    out = Path(COMMANDS[command][0][COMMANDS[command][0].index("--out") + 1].format(tmp=tmp_path))
    _resumable(out, 37)
    default = COMMANDS[command][3].get("steps", TrainConfig().steps)
    assert _run(monkeypatch, tmp_path, command, []).steps == default  # no --resume: the default
    assert _run(monkeypatch, tmp_path, command, ["--resume"]).steps == 37
    assert _run(monkeypatch, tmp_path, command, ["--resume", "--steps", "6"]).steps == 6
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("steps: 9\n")
    assert _run(monkeypatch, tmp_path, command, ["--resume", "--config", str(yaml_file)]).steps == 9
    yaml_file.write_text("lr: 0.01\n")  # a file without steps leaves the saved total alone
    assert _run(monkeypatch, tmp_path, command, ["--resume", "--config", str(yaml_file)]).steps == 37
    (out / "last" / "trainer_state.json").write_text("{")
    args, target, position, _ = COMMANDS[command]
    r = CliRunner().invoke(app, [a.format(tmp=tmp_path, ck=_ckpt(tmp_path)) for a in args] + ["--resume"])
    assert "trainer_state.json" in str(r.exception) and "total_steps" in str(r.exception)


def test_resumed_recipe_stage_without_steps_keeps_the_saved_total(tmp_path):
    from slmkit.pipeline.recipe import Recipe, RunContext
    from slmkit.pipeline.stages import _train_config

    out = tmp_path / "stage"
    _resumable(out, 37)
    ctx = RunContext(Recipe("r", tmp_path, []), {})
    assert _train_config({}, ctx, out=out).steps == TrainConfig().steps  # a fresh stage: the default
    ctx.resume = True
    assert _train_config({}, ctx, out=out).steps == 37
    assert _train_config({}, ctx, "sft", str(_ckpt(tmp_path)), out).steps == 37
    assert _train_config({"steps": 6}, ctx, out=out).steps == 6
