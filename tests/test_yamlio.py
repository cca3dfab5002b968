"""Exponent-only decimals (`3e-4`, `1e-05`) are floats in every YAML/JSON file slmkit reads (PyYAML alone reads
them as strings): a checkpoint's config.json as a model spec, train configs, recipes and their overrides."""

import json

import pytest

from slmkit import yamlio
from slmkit.model import resolve_model_config
from slmkit.pipeline.recipe import apply_overrides


def test_exponents_are_floats_and_the_rest_is_plain_yaml():
    data = yamlio.load("a: 1e-5\nb: -3E+4\nc: 1.5e-3\nd: 12\ne: '1e-5'\nf: .5\ng: 1_000\nh: .inf\ni: v1e5\n")
    assert data == {"a": 1e-5, "b": -3e4, "c": 1.5e-3, "d": 12, "e": "1e-5", "f": 0.5, "g": 1000,
                    "h": float("inf"), "i": "v1e5"}
    assert isinstance(data["d"], int) and isinstance(data["g"], int)


def test_a_checkpoint_config_json_is_a_model_spec(tmp_path):
    cfg = resolve_model_config("micro", vocab_size=300).to_dict()
    cfg["rms_norm_eps"] = 1e-5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert '"rms_norm_eps": 1e-05' in (tmp_path / "config.json").read_text()  # what json writes
    again = resolve_model_config(tmp_path / "config.json")
    assert isinstance(again.rms_norm_eps, float) and again.rms_norm_eps == 1e-5


def test_train_config_and_recipe_overrides_read_exponents(tmp_path):
    from slmkit.train.config import read_train_fields

    f = tmp_path / "train.yaml"
    f.write_text("lr: 3e-4\nsteps: 10\n")
    assert read_train_fields(f)["lr"] == pytest.approx(3e-4)
    recipe = {"stages": [{"name": "t", "kind": "train", "with": {"data": "x"}}]}
    assert apply_overrides(recipe, ["t.lr=5e-5"])["stages"][0]["with"]["lr"] == pytest.approx(5e-5)
