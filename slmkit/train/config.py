"""Training configuration: one dataclass, serialised into checkpoints and accepted as YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .. import yamlio


class TrainConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps (ignored when time_budget_s is set: steps are then chosen to fit)
    batch_size: int = 16  # global batch, in sequences, across all processes and accumulation steps
    micro_batch_size: int | None = None  # per process and forward pass; None = batch_size / world size
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto | bf16 | fp32  (auto: bf16 autocast on CUDA and on CPUs with native bf16)
    compile: bool = False  # torch.compile the model
    eval_every: int = 100  # 0 disables periodic validation
    eval_tokens: int = 65536  # held-out tokens per validation
    save_every: int = 200  # 0 saves only at the end
    log_every: int = 10
    seed: int = 1234
    time_budget_s: float | None = None  # train for about this long; steps are set after a short probe
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Quantization-aware training against the pass that will ship the model: q4_0 | q4_1 | q8_0 (GGUF blocks) or
    # a quant.int4:... / quant.int8:... spec (compress/qat.py). None trains plain float weights.
    qat: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps > 0, "batch_size": self.batch_size > 0, "seq_len": self.seq_len > 1,
            "lr": self.lr > 0, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
            "precision": self.precision in ("auto", "bf16", "fp32"), "eval_tokens": self.eval_tokens > 0,
            "micro_batch_size": self.micro_batch_size is None or self.micro_batch_size > 0,
            "time_budget_s": self.time_budget_s is None or self.time_budget_s > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainConfigError(", ".join(f"{k}={getattr(self, k)!r} is invalid" for k in bad))
        if self.qat is not None:
            self.qat_plan()  # refuse an unknown format before any work

    def qat_plan(self):
        """The validated QAT plan (compress.qat.QATPlan), or None."""
        if self.qat is None:
            return None
        from ..compress.base import PassError
        from ..compress.qat import parse_qat

        try:
            return parse_qat(str(self.qat))
        except PassError as e:
            raise TrainConfigError(f"qat={self.qat!r}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        return cls(**{**read_train_fields(path), **{k: v for k, v in overrides.items() if v is not None}})


def read_train_fields(path: str | Path, *, where: str | None = None,
                      error: type[ValueError] = TrainConfigError) -> dict:
    """The mapping of a YAML file of TrainConfig fields, checked: a missing file, bad YAML, something other than
    a mapping and unknown fields raise `error`, its message starting with `where` (default: the path)."""
    path = Path(path)
    where = where or str(path)
    data = yamlio.load_file(path, error, where=where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping of TrainConfig fields (steps: 300, lr: 1e-4, ...), found a "
                    f"{type(data).__name__}")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{where}: unknown training field(s) {unknown}; known: {sorted(known)}")
    return data
