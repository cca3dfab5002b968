import json
import math
import os
import subprocess
import sys

import pytest
import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.train import TrainConfig, TrainConfigError
from slmkit.train.optim import lr_at
from slmkit.train.pretrain import pretrain


def cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, save_every=2,
                log_every=1, precision="fp32", eval_tokens=512, seed=7)
    return TrainConfig(**{**base, **kw})


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_dataset, tiny_model_yaml, tmp_path):
    res = pretrain(tiny_dataset, tiny_model_yaml, tmp_path / "m", cfg(steps=25, save_every=0), quiet=True)
    assert res.steps == 25 and res.tokens == 25 * 4 * 32
    ls = losses(tmp_path / "m")
    assert len(ls) == 25 and ls[-1] < ls[0] - 0.5
    ev = res.evals[-1]
    assert 0 < ev["val_bits_per_byte"] < 8 and math.isclose(ev["val_perplexity"], math.exp(ev["val_loss"]), rel_tol=1e-6)
    ck = load_checkpoint(tmp_path / "m")
    stage = ck.provenance["stages"][0]
    assert stage["stage"] == "train" and stage["tokens_seen"] == res.tokens
    assert stage["data"]["tokenizer_sha256"] and "val_bits_per_byte" in stage["metrics"]
    assert (tmp_path / "m" / "tokenizer.json").exists()


def _crash_at(step, exc):
    def hook(s, _):
        if s == step:
            raise exc
    return hook


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_resume_after_a_crash_reaches_the_same_loss(tiny_dataset, tiny_model_yaml, tmp_path, exc):
    straight = tmp_path / "straight"
    pretrain(tiny_dataset, tiny_model_yaml, straight, cfg(), quiet=True)
    broken = tmp_path / "broken"
    with pytest.raises(exc):
        pretrain(tiny_dataset, tiny_model_yaml, broken, cfg(), on_step_end=_crash_at(3, exc), quiet=True)
    saved = json.loads((broken / "last" / "trainer_state.json").read_text())["step"]
    assert saved == (3 if exc is KeyboardInterrupt else 2)  # Ctrl-C saves; a crash falls back to the last save
    pretrain(tiny_dataset, tiny_model_yaml, broken, cfg(), resume=True, quiet=True)
    assert losses(broken) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    a, b = load_checkpoint(straight).model.state_dict(), load_checkpoint(broken).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_different_batch_shape(tiny_dataset, tiny_model_yaml, tmp_path):
    with pytest.raises(RuntimeError):
        pretrain(tiny_dataset, tiny_model_yaml, tmp_path / "m", cfg(), on_step_end=_crash_at(3, RuntimeError()),
                 quiet=True)
    with pytest.raises(TrainConfigError, match="seq_len"):
        pretrain(tiny_dataset, tiny_model_yaml, tmp_path / "m", cfg(seq_len=16), resume=True, quiet=True)


def test_gradient_accumulation_matches_full_batch(tiny_dataset, tiny_model_yaml, tmp_path):
    pretrain(tiny_dataset, tiny_model_yaml, tmp_path / "full", cfg(save_every=0), quiet=True)
    pretrain(tiny_dataset, tiny_model_yaml, tmp_path / "acc", cfg(save_every=0, micro_batch_size=1), quiet=True)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "full"), rel=1e-4)


def test_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, c) == pytest.approx(0.1) and lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(100, 100, c) == pytest.approx(0.1) and lr_at(55, 100, c) < lr_at(20, 100, c)


def test_invalid_training_config_is_named():
    with pytest.raises(TrainConfigError, match="lr=-1"):
        TrainConfig(lr=-1)


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one(tiny_dataset, tiny_model_yaml, tmp_path):
    """torchrun with gloo: the same global batch split over 2 processes gives the same losses."""
    common = ["train", "--data", str(tiny_dataset), "--model", str(tiny_model_yaml), "--steps", "4",
              "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32", "--precision", "fp32",
              "--eval-every", "0", "--save-every", "0", "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "slmkit.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "slmkit.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
