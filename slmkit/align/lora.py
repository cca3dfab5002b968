"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A targeted `nn.Linear` y = W x becomes y = W x + (alpha / r) * B A dropout(x), with A (r, in) initialised like a
default `nn.Linear` (Kaiming-uniform, a=sqrt(5)) and B (out, r) zeros, so the adapted model starts exactly
equal to the base. Only A and B train; every other parameter is frozen. `merge_lora` folds B A * alpha/r into
W and puts the plain `nn.Linear` back, so a merged model is an ordinary checkpoint.

Naming follows PEFT so its users recognise everything: the wrapped layer is `base_layer`, the factors are
`lora_A` / `lora_B` (`nn.Linear`s), and a saved adapter is `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` plus `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`,
`target_modules`, ...). Because slmkit's module names are Hugging Face's, an adapter written here names the
same modules as one PEFT writes for the exported `LlamaForCausalLM`, and vice versa.

Targets match module names by suffix like PEFT's list form: `q_proj` matches `model.layers.3.self_attn.q_proj`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM wrapped in PeftModelForCausalLM
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """A LoRA configuration or adapter that cannot be applied to this model."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # one name given as a string: a tuple of one, never its characters
            object.__setattr__(self, "targets", tuple(t for t in self.targets.replace("+", ",").split(",") if t))
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            problems.append(f"alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            problems.append(f"targets={self.targets!r} must name at least one module (e.g. q_proj,v_proj)")
        if problems:
            raise LoRAError("LoRA config: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        known = {"rank", "alpha", "dropout", "targets"}
        unknown = set(d) - known
        if unknown:
            raise LoRAError(f"LoRA config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in d.items()})

    def to_peft(self, base: str | None = None) -> dict:
        """The `adapter_config.json` PEFT writes for this adapter (a LoraConfig for a causal LM)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": sorted(self.targets), "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "use_rslora": False, "use_dora": False, "revision": None}

    @classmethod
    def from_peft(cls, d: dict, where: str = ADAPTER_CONFIG) -> "LoRAConfig":
        """Read a PEFT `adapter_config.json`; refuse the variants this implementation does not compute."""
        if d.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"{where}: peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
        plain = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                 "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None}
        for key, value in plain.items():
            if d.get(key) is not None and d[key] != value:
                raise LoRAError(f"{where}: {key}={d[key]!r} is not supported (only plain LoRA: {key}={value!r})")
        targets = d.get("target_modules")
        if isinstance(targets, str):
            raise LoRAError(f"{where}: target_modules is a regular expression ({targets!r}); list the module "
                            "names instead, e.g. [\"q_proj\", \"v_proj\"]")
        try:
            return cls(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                       targets=tuple(targets or ()))
        except KeyError as e:
            raise LoRAError(f"{where}: missing field {e.args[0]!r}") from None


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        # Low-precision bases (bf16 checkpoints) keep fp32 adapters: tiny updates survive the optimizer.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not w.is_meta:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # what nn.Linear and PEFT use for A
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of a projection (e.g. dtype checks) keeps working
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (update * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every `nn.Linear` whose name ends with a target in a `LoRALinear`, in place, and freeze every
    other parameter. Returns the names of the wrapped modules. Refuses, before changing anything, a target
    that matches nothing, a match that is not a plain linear layer, and an already-adapted model."""
    model = _unwrap(model)
    names = dict(model.named_modules())
    existing = [n for n, m in names.items() if isinstance(m, LoRALinear)]
    if existing:
        raise LoRAError(f"the model already has LoRA adapters ({existing[0]}, ...); merge them with merge_lora "
                        "(or `slm merge-lora`) before adding new ones")
    chosen: list[str] = []
    for target in cfg.targets:
        hits = [n for n in names if n and _matches(n, target)]
        if not hits:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in names.items() if isinstance(m, nn.Linear)})
            raise LoRAError(f"LoRA target {target!r} matches no module of this model; linear layers are named "
                            f"{', '.join(linear)}")
        for n in hits:
            m = names[n]
            if type(m) is not nn.Linear:
                raise LoRAError(f"LoRA target {target!r} matches {n}, a {type(m).__name__}, not a plain nn.Linear "
                                "(compressed layers cannot take adapters; apply LoRA before compression)")
            if n == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                raise LoRAError("LoRA on lm_head of a model with tied embeddings would change the embedding table "
                                "when merged; leave lm_head out of --lora-targets")
            chosen.append(n)
    chosen = sorted(set(chosen), key=list(names).index)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(names[n], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under the model's own names (`...q_proj.lora_A.weight`)."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{n}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, *, base: str | Path | None = None,
                 base_sha256: str | None = None) -> Path:
    """Write `adapter_model.safetensors` (PEFT key names) and `adapter_config.json` into `out_dir`. `base` is
    the checkpoint the adapter was trained on (recorded as `base_model_name_or_path`); its weights' SHA-256
    goes into the safetensors metadata so loading onto another base can be caught."""
    from ..checkpoint import atomic_write_text, save_weights

    state = lora_state_dict(model)
    if not state:
        raise LoRAError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in state.items()}
    meta = {"slmkit.lora": json.dumps(cfg.to_dict())}
    if base_sha256:
        meta["slmkit.base_sha256"] = base_sha256
    save_weights(tensors, out / ADAPTER_WEIGHTS, metadata=meta)
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(cfg.to_peft(None if base is None else str(base)), indent=2) + "\n")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors under the model's names, safetensors metadata) of an adapter directory."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.exists():
            raise LoRAError(f"{f}: missing — an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        cfg = LoRAConfig.from_peft(json.loads(cfg_file.read_text()), str(cfg_file))
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cfg_file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
        raise LoRAError(f"{weights}: cannot read safetensors ({e})") from None
    return cfg, tensors, meta


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the adapter saved in `adapter_dir` to `model` (in place; wraps the target layers first if the
    model has no adapters yet) and return the model. Every adapter tensor must land on a module of the
    right shape, and every adapted module must receive its tensors."""
    cfg, tensors, _ = read_adapter(adapter_dir)
    if not lora_modules(model):
        apply_lora(model, cfg)
    mods = lora_modules(model)
    expected = {f"{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unexpected or missing:
        raise LoRAError(f"{adapter_dir}: adapter does not fit this model: unexpected {unexpected[:4]}, missing "
                        f"{missing[:4]} — was it trained for another architecture or other targets?")
    for n, m in mods.items():
        for ab in "AB":
            t, dst = tensors[f"{n}.lora_{ab}.weight"], getattr(m, f"lora_{ab}").weight
            if t.shape != dst.shape:
                raise LoRAError(f"{adapter_dir}: {n}.lora_{ab}.weight has shape {tuple(t.shape)}, the model needs "
                                f"{tuple(dst.shape)} (rank or layer width differs)")
            with torch.no_grad():
                dst.copy_(t)
        m.scaling, m.alpha = cfg.scaling, cfg.alpha
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B @ A, computed in fp32) and put the plain
    `nn.Linear` back, in place. Returns the model. Parameters keep the requires_grad apply_lora gave them."""
    inner = _unwrap(model)
    for n, m in lora_modules(inner).items():
        base = m.base_layer
        merged = base.weight.float() + m.delta_weight().float().to(base.weight.device)
        base.weight.data = merged.to(base.weight.dtype)
        parent_name, _, child = n.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, base)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that receive gradients, all parameters), each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in _unwrap(model).parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# -- LoRA runs: what a training command does around the loop ------------------------------------------

ADAPTER_DIR = "adapter"


def peak_memory() -> dict:
    """The process's peak resident memory (and CUDA's peak allocation, where there is a GPU), in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def lora_base_checkpoint(spec: str | Path, option: str = "--model") -> Path:
    """The checkpoint directory a LoRA run adapts. An adapter is only usable beside weights that exist on
    disk, so a fresh model (preset, config file) is refused."""
    path = Path(str(spec))
    if not (path.is_dir() and (path / "model.safetensors").is_file()):
        raise LoRAError(f"LoRA adapts existing weights: {option} {spec} is not a checkpoint directory; train the "
                        "model first (or drop --lora-rank for full training)")
    return path


def weights_sha256(ckpt_dir: str | Path) -> str:
    """SHA-256 of a checkpoint's weights file: the digest slmkit.json records (verified on load), else hashed."""
    from ..checkpoint import WEIGHTS, read_provenance, sha256_file

    recorded = read_provenance(Path(ckpt_dir)).get("files", {}).get(WEIGHTS, {}).get("sha256")
    return recorded or sha256_file(Path(ckpt_dir) / WEIGHTS)


def finish_lora_run(model: nn.Module, out: str | Path, cfg: LoRAConfig, *, base: str | Path,
                    base_sha256: str | None = None) -> dict:
    """End of a LoRA run: write the adapter to OUT/adapter/ (PEFT layout), then merge it into the model in
    place so OUT itself can be saved as an ordinary checkpoint. Returns the record for the stage."""
    base_sha256 = base_sha256 or weights_sha256(base)
    trainable, total = trainable_parameters(model)
    save_adapter(model, Path(out) / ADAPTER_DIR, cfg, base=Path(base).resolve(), base_sha256=base_sha256)
    merge_lora(model)
    return {"config": cfg.to_dict(), "adapter": ADAPTER_DIR, "base": str(Path(base).resolve()),
            "base_sha256": base_sha256, "trainable_parameters": trainable, "total_parameters": total,
            **peak_memory()}


def merge_adapter_checkpoint(base: str | Path, adapter_dir: str | Path, out: str | Path) -> dict:
    """`slm merge-lora`: load `base`, apply the adapter, fold it in and save an ordinary checkpoint to `out`
    (provenance gains a `merge-lora` stage). An slmkit adapter records its base's weight digest; merging it
    into other weights is refused. Returns the stage record."""
    import time

    from ..checkpoint import inherited_provenance, load_checkpoint, save_checkpoint

    cfg, _, meta = read_adapter(adapter_dir)
    digest = weights_sha256(base)
    trained_on = meta.get("slmkit.base_sha256")
    if trained_on and trained_on != digest:
        raise LoRAError(f"{adapter_dir} was trained on weights {trained_on[:12]}..., but {base} holds {digest[:12]}...; "
                        "merge it into the checkpoint it was trained on (adapter_config.json: base_model_name_or_path)")
    ck = load_checkpoint(base)
    load_adapter(ck.model, adapter_dir)
    modules = list(lora_modules(ck.model))
    merge_lora(ck.model)
    prior = inherited_provenance(ck.provenance)
    stage = {"stage": "merge-lora", "adapter": str(Path(adapter_dir).resolve()), "config": cfg.to_dict(),
             "modules": modules, "base": {"path": str(Path(base).resolve()), "weights_sha256": digest},
             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "summary": {"rank": cfg.rank, "alpha": cfg.alpha, "layers": len(modules)}}
    save_checkpoint(ck.model, out, tokenizer_from=base, provenance={**prior, "stages": [*prior["stages"], stage]})
    return stage
