"""Defaults of the alignment stages, defined once: `slm sft|pairs|dpo`, recipe stages of those kinds and the
library functions all read them from here, so an option means the same wherever it is given.

Training options are layered the same way everywhere (`stage_train_config`): TrainConfig's own defaults,
then the stage's defaults below, then a `--config` YAML file, then options given explicitly (command-line
flags or a recipe stage's `with:`). A later layer wins only for the fields it sets. On a resume, a run's saved
total replaces the default `steps` (it stays as planned unless `steps` is given). A default that depends
on the model (`seq_len`) is capped at the checkpoint's context when no layer above the defaults sets it.

Imports nothing heavy: `slm --help` reads these values to print them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

# Fine-tuning starts from a trained model: a few hundred steps at a peak rate ~30x (SFT) to ~300x (DPO) below
# pretraining's 3e-3, short warmup and no weight decay, which would pull the weights away from the model
# being aligned. Pretraining (`slm train`, `slm distill`) keeps TrainConfig's defaults.
SFT_TRAIN_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "steps": 200, "batch_size": 16, "seq_len": 512, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0,
    "eval_every": 50, "save_every": 100})
DPO_TRAIN_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "steps": 200, "batch_size": 8, "seq_len": 512, "lr": 1e-5, "warmup_steps": 10, "weight_decay": 0.0,
    "eval_every": 50, "save_every": 100})
STAGE_TRAIN_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "sft": SFT_TRAIN_DEFAULTS, "dpo": DPO_TRAIN_DEFAULTS})
# Fields whose default is only an upper bound: the model's context caps it.
CONTEXT_BOUND = ("seq_len",)


@dataclass(frozen=True)
class PairsSampling:
    """How `slm pairs` samples. top_p=1.0 samples from the model's whole distribution: DPO's loss assumes
    pairs drawn from the policy being trained, and nucleus truncation would make them off-policy."""

    k: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_prompts: int = 4
    margin: float = 0.0


PAIRS_SAMPLING = PairsSampling()


class StageConfigError(ValueError):
    """A training option that cannot be used; the message names the file or stage and the field."""


def read_config_file(path: str | Path) -> dict:
    """The mapping of a `--config` YAML file, checked against TrainConfig's fields."""
    from ..train.config import read_train_fields

    return read_train_fields(path, where=f"--config {path}", error=StageConfigError)


def checkpoint_context(ckpt: str | Path | None) -> int | None:
    """`max_position_embeddings` from a checkpoint's config.json, or None when it cannot be read (loading
    the checkpoint reports that properly later)."""
    if ckpt is None:
        return None
    try:
        value = json.loads((Path(ckpt) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 1 else None


def stage_train_config(stage: str | None = None, *, config_file: str | Path | None = None,
                       explicit: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None,
                       ckpt: str | Path | None = None, where: str = "options",
                       resume_from: str | Path | None = None):
    """The TrainConfig of a stage: TrainConfig defaults < `base` < the stage's defaults < `config_file` <
    `explicit` (entries that are None count as not given). A context-bound default (seq_len) left to the
    defaults is capped at the checkpoint's context. `resume_from` is the output directory of a run being
    resumed: when no layer above the defaults sets `steps`, the run keeps its saved total (a resume honours
    a new total, so taking the default there would silently lengthen or shorten the run)."""
    from ..train import TrainConfig, TrainConfigError

    defaults = {**(base or {}), **STAGE_TRAIN_DEFAULTS.get(stage or "", {})}
    given = {**(read_config_file(config_file) if config_file else {}),
             **{k: v for k, v in (explicit or {}).items() if v is not None}}
    if resume_from is not None and "steps" not in given:
        from ..train.state import resumable_total_steps

        saved = resumable_total_steps(Path(resume_from))
        if saved is not None:
            defaults["steps"] = saved
    values = {**defaults, **given}
    context = checkpoint_context(ckpt)
    for name in CONTEXT_BOUND:
        if name not in given and context is not None:
            values[name] = min(values.get(name, TrainConfig.__dataclass_fields__[name].default), context)
    try:
        return TrainConfig(**values)
    except (TrainConfigError, TypeError) as e:
        src = f"--config {config_file} / {where}" if config_file else where
        raise StageConfigError(f"{src}: {e}") from None
