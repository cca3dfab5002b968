"""Training state survives interruption: signals inside a step, durable saves, a torn metrics log, and a
changed total on resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from slmkit.checkpoint import load_checkpoint
from slmkit.train import TrainConfig, TrainConfigError
from slmkit.train.optim import lr_at
from slmkit.train.pretrain import pretrain


def cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, save_every=2,
                log_every=1, precision="fp32", eval_tokens=512, seed=7)
    return TrainConfig(**{**base, **kw})


def records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def losses(out):
    return [r["loss"] for r in records(out)]


def saved_steps(out):
    """(trainer step, optimizer steps applied) of the saved resumable state."""
    step = json.loads((out / "last" / "trainer_state.json").read_text())["step"]
    adam_steps = {int(v.item()) for k, v in load_file(str(out / "last" / "optimizer.safetensors")).items()
                  if k.endswith(".step")}
    assert len(adam_steps) == 1
    return step, adam_steps.pop()


def same_weights(a, b):
    a, b = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _stop_at(step, exc=KeyboardInterrupt):
    def hook(s, _):
        if s == step:
            raise exc
    return hook


class SignalAtOptimizerStep:
    """Sends `signum` to this process right after the n-th optimizer.step() (before the loop counts the
    step): the window a real Ctrl-C can hit."""

    def __init__(self, n, signum=signal.SIGINT, times=1):
        self.n, self.signum, self.times, self.calls = n, signum, times, 0

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, *_):
        self.calls += 1
        if self.calls == self.n:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def straight(tiny_dataset, tiny_model_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "m"
    pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), quiet=True)
    return out


def test_sigint_inside_a_step_stops_after_it_with_weights_and_step_in_agreement(
        tiny_dataset, tiny_model_yaml, tmp_path, straight):
    out = tmp_path / "m"
    with SignalAtOptimizerStep(3), pytest.raises(KeyboardInterrupt):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(save_every=0), quiet=True)
    assert saved_steps(out) == (3, 3)  # the step finished and was counted before the save
    pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), resume=True, quiet=True)
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    assert same_weights(out, straight)


def test_a_second_sigint_inside_a_step_stops_at_once_and_keeps_the_last_save(
        tiny_dataset, tiny_model_yaml, tmp_path, straight):
    out = tmp_path / "m"
    with SignalAtOptimizerStep(3, times=2), pytest.raises(KeyboardInterrupt):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(save_every=2), quiet=True)
    assert saved_steps(out) == (2, 2)  # the torn step 3 was not saved over the consistent step-2 state
    pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), resume=True, quiet=True)
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)


SIGTERM_SCRIPT = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, sys.argv[4])
    from test_interrupts import SignalAtOptimizerStep, cfg
    from slmkit.train.pretrain import pretrain
    try:
        with SignalAtOptimizerStep(3, signal.SIGTERM):
            pretrain(sys.argv[1], sys.argv[2], sys.argv[3], cfg(save_every=0), quiet=True)
    except KeyboardInterrupt:
        sys.exit(143)
""")


def test_sigterm_inside_a_step_saves_a_consistent_state(tiny_dataset, tiny_model_yaml, tmp_path):
    """A scheduler's SIGTERM (SLURM, Kubernetes) is a stop request like Ctrl-C, not a kill: run in a child,
    since without a handler SIGTERM ends the process."""
    out = tmp_path / "m"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(tiny_dataset), str(tiny_model_yaml), str(out),
                          os.path.dirname(__file__)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 143, run.stderr[-2000:]
    assert saved_steps(out) == (3, 3)


def test_state_files_and_directory_are_fsynced_before_the_rename(tiny_dataset, tiny_model_yaml, tmp_path,
                                                                  monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file behind a descriptor")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "m"
    pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=2, save_every=0), quiet=True)
    tmp, last = str((out / ".last.tmp").resolve()), str((out / "last").resolve())
    swap = events.index(("replace", str(out / ".last.tmp"), str(out / "last")))
    synced_before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    for name in ("optimizer.safetensors", "rng.safetensors", "trainer_state.json", "model.safetensors",
                 "config.json"):
        assert f"{tmp}/{name}" in synced_before, name
    assert tmp in synced_before  # the directory's entries too
    assert ("fsync", str(out.resolve())) in events[swap:]  # and the rename itself
    assert os.path.isdir(last)


def test_a_torn_last_metrics_line_does_not_stop_resume(tiny_dataset, tiny_model_yaml, tmp_path, straight):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), on_step_end=_stop_at(3, RuntimeError), quiet=True)
    with open(out / "metrics.jsonl", "a") as f:  # a crash in the middle of writing a record
        f.write('{"step": 4, "loss": 5.1')
    with pytest.warns(RuntimeWarning, match="metrics.jsonl: dropped 1 unreadable line"):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), resume=True, quiet=True)
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)




def test_resume_with_more_steps_extends_the_schedule_continuously(tiny_dataset, tiny_model_yaml, tmp_path,
                                                                  straight):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), on_step_end=_stop_at(3), quiet=True)
    res = pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=10), resume=True, quiet=True)
    assert res.steps == 10 and [r["step"] for r in records(out)] == list(range(1, 11))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["total_steps"] == 10
    lrs = [r["lr"] for r in records(out)]
    c = cfg()
    assert lrs[:3] == pytest.approx([r["lr"] for r in records(straight)][:3])  # before the resume: unchanged
    assert lrs[3] == pytest.approx(lr_at(3, 6, c))  # no jump at the resume point
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > c.lr * c.min_lr_ratio
    assert lr_at(10, 10, c, (3, lr_at(3, 6, c))) == pytest.approx(c.lr * c.min_lr_ratio)  # floor at the end
    stage = load_checkpoint(out).provenance["stages"][-1]
    assert stage["steps"] == 10


def test_resume_with_fewer_steps_shortens_or_refuses_with_the_reason(tiny_dataset, tiny_model_yaml, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(), on_step_end=_stop_at(3), quiet=True)
    with pytest.raises(TrainConfigError, match="steps=2: the run is already at step 3"):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=2), resume=True, quiet=True)
    res = pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=4), resume=True, quiet=True)
    assert res.steps == 4 and len(records(out)) == 4


def test_an_anchored_schedule_is_continuous_and_ends_at_the_floor():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    anchor = (40, lr_at(40, 100, c))
    assert lr_at(40, 300, c, anchor) == pytest.approx(lr_at(40, 100, c))
    assert lr_at(39, 300, c, anchor) == lr_at(39, 300, c)  # steps before the anchor keep the old rule
    assert lr_at(300, 300, c, anchor) == pytest.approx(0.1)
    assert lr_at(60, 60, c, anchor) == pytest.approx(0.1)  # shortened: reaches the floor at the new end


def test_resumable_total_steps_tells_a_command_the_planned_total(tiny_dataset, tiny_model_yaml, tmp_path):
    from slmkit.train.state import resumable_total_steps

    out = tmp_path / "m"
    assert resumable_total_steps(out) is None
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=7), on_step_end=_stop_at(3), quiet=True)
    assert resumable_total_steps(out) == 7


def test_slm_train_resume_keeps_the_saved_total_unless_steps_is_given(tiny_dataset, tiny_model_yaml, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from slmkit.cli import app

    config = tmp_path / "train.yaml"  # everything but steps, so --resume decides the total
    config.write_text(yaml.safe_dump({k: v for k, v in vars(cfg()).items() if k in (
        "batch_size", "seq_len", "lr", "warmup_steps", "eval_every", "save_every", "log_every", "precision",
        "eval_tokens", "seed")}))
    for extra, total in (([], 4), (["--steps", "6"], 6)):
        out = tmp_path / f"m{total}"
        with pytest.raises(KeyboardInterrupt):
            pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=4), on_step_end=_stop_at(2), quiet=True)
        r = CliRunner().invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(tiny_model_yaml),
                                     "--out", str(out), "--config", str(config), "--resume", *extra])
        assert r.exit_code == 0, (r.output, r.exception)
        assert f"trained {total} steps" in r.output
        assert json.loads((out / "last" / "trainer_state.json").read_text())["total_steps"] == total
        assert records(out)[-1]["step"] == total
