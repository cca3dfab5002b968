"""Checkpoint directories: the one on-disk format every slmkit stage reads and writes.

    config.json             model config, Hugging Face field names (+ `architectures`)
    model.safetensors       weights (tied lm_head omitted, as transformers does)
    tokenizer.json          HF tokenizers file
    tokenizer_config.json   transformers tokenizer config, incl. the chat template
    generation_config.json  bos/eos/pad ids and sampling defaults
    README.md               model card with YAML front matter
    slmkit.json             provenance: stages and passes applied, data hashes, metrics, file digests

Every file is written to a temporary name and renamed into place; `slmkit.json` is written last and
records each file's size and SHA-256, so a truncated or swapped file is caught on load with its name.
Loading builds the model on the meta device and assigns the stored tensors (no pickle anywhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .model import CausalLM, ConfigError, ModelConfig

FORMAT = "slmkit.checkpoint/1"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHECKPOINT_FILES = ("config.json", WEIGHTS, *TOKENIZER_FILES, "generation_config.json", "README.md")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model plus everything recorded beside it."""

    model: CausalLM
    path: Path
    provenance: dict = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.exists() else None

    def tokenizer(self):
        from tokenizers import Tokenizer

        if self.tokenizer_path is None:
            raise CheckpointError(f"{self.path}: no tokenizer.json in this checkpoint")
        return Tokenizer.from_file(str(self.tokenizer_path))


# -- writing -------------------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unique, contiguous tensors that own their storage (a fused projection's sources are views of one
    tensor, see compress/fuse.py); a tied lm_head is omitted (restored by tying on load)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: _owning(v.detach()) for k, v in sd.items()}


def _owning(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if not t.is_meta and t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()  # a view into a larger tensor: save its own bytes only
    return t


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save as st_save

    atomic_write_bytes(path, st_save(state, metadata={"format": "pt", **(metadata or {})}))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    d = config.to_dict()
    d["architectures"] = [ARCHITECTURES[config.model_type]]
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def save_checkpoint(model: CausalLM, out: str | Path, *, tokenizer_from: str | Path | None = None,
                    provenance: dict | None = None, generation: dict | None = None,
                    card_notes: str = "") -> Path:
    """Write `model` as a checkpoint directory. `tokenizer_from` is a directory holding tokenizer.json
    (+ tokenizer_config.json): a dataset or another checkpoint. `provenance` is merged into slmkit.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = state_dict_for_save(model)
    dtype = next(iter(state.values())).dtype
    save_weights(state, out / WEIGHTS)
    atomic_write_text(out / "config.json", json.dumps(hf_config_dict(config, dtype), indent=2, sort_keys=True) + "\n")
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        for name in TOKENIZER_FILES:
            if (src / name).exists() and (src / name).resolve() != (out / name).resolve():
                atomic_copy(src / name, out / name)
        if not (out / "tokenizer.json").exists():
            raise CheckpointError(f"{src}: no tokenizer.json to copy into the checkpoint")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
           **(generation or {})}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    prov = {"format": FORMAT, "slmkit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": [], "passes": [], **(provenance or {})}
    prov["parameters"] = model.num_parameters()
    atomic_write_text(out / "README.md", model_card(model, prov, card_notes))
    prov["files"] = {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
                     for name in CHECKPOINT_FILES if (out / name).exists()}
    atomic_write_text(out / "slmkit.json", json.dumps(prov, indent=2) + "\n")
    return out


def inherited_provenance(prov: dict) -> dict:
    """What a checkpoint made from another one keeps of its provenance: the stages that made it and the
    compression passes its modules need to load."""
    return {"stages": list(prov.get("stages", [])), "passes": list(prov.get("passes", []))}


def model_card(model: CausalLM, prov: dict, notes: str = "") -> str:
    c = model.config
    metrics = {}
    for stage in prov.get("stages", []):
        metrics.update(stage.get("metrics", {}))
    front = {"library_name": "slmkit", "pipeline_tag": "text-generation",
             "tags": ["slmkit", c.model_type, "small-language-model"]}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# slmkit {c.model_type} model", "",
             f"- parameters: {model.num_parameters():,} ({model.num_parameters(exclude_embeddings=True):,} without embeddings)",
             f"- layers: {c.num_hidden_layers}, hidden size: {c.hidden_size}, heads: {c.num_attention_heads} "
             f"(key/value heads: {c.num_key_value_heads}), MLP size: {c.intermediate_size}",
             f"- vocabulary: {c.vocab_size}, context: {c.max_position_embeddings}, tied embeddings: {c.tie_word_embeddings}",
             ""]
    if prov.get("stages"):
        lines += ["## How it was made", ""]
        for s in prov["stages"]:
            summary = ", ".join(f"{k}={v}" for k, v in s.get("summary", {}).items())
            lines.append(f"- `{s.get('stage')}` {summary}")
        lines.append("")
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["Load it with `slm generate`, `slm eval`, or export it with `slm export hf`.", ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)


# -- reading -------------------------------------------------------------------------------------

def read_provenance(path: Path) -> dict:
    f = path / "slmkit.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupted (not valid JSON at line {e.lineno}): {e.msg}") from None


def verify_files(path: Path, prov: dict, *, hashes: bool = True) -> None:
    for name, rec in prov.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing (slmkit.json lists it)")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, expected {rec['bytes']} — the file is truncated or was "
                                  "replaced; re-copy the checkpoint or restore it from its source")
        if hashes and name == WEIGHTS and sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 does not match slmkit.json — the file is corrupted")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / WEIGHTS if path.is_dir() else path
    if not f.exists():
        raise CheckpointError(f"{f}: no weights file")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupted") from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = True) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json and {WEIGHTS})")
    try:
        config = ModelConfig.load(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    prov = read_provenance(path)
    if verify:
        verify_files(path, prov)
    state = load_state(path)
    with torch.device("meta"):
        model = CausalLM(config)
    if prov.get("passes"):
        # Compressed: give the fresh model the module types and shapes the recorded passes produced.
        from .compress.run import replay_passes

        model = replay_passes(model, prov["passes"])
        _load_compressed(model, state, path / WEIGHTS)
    else:
        check_state_matches(model, state, path / WEIGHTS)
        model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = _rope_buffer(config)
    model.to(device=device, dtype=dtype)
    if dtype is not None:
        _rope_in_fp32(model)
    model.eval()
    return Checkpoint(model=model, path=path, provenance=prov)


def _load_compressed(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Compressed modules translate their on-disk tensors in load hooks, so shapes are checked by loading."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not match the recorded compression passes: {e}") from None
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the recorded compression passes: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def _rope_in_fp32(model: torch.nn.Module) -> None:
    """Rotary frequencies stay fp32 whatever the weights' dtype (bf16 would round them, and the rotation angles
    p * f would drift further with every position); RotaryEmbedding casts cos/sin to the activations' dtype."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = _rope_buffer(model.config).to(rotary.inv_freq.device)


def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Cast a float model's weights to `dtype` once, for inference in that dtype without autocast (which casts
    every fp32 matrix again at every decode step). False, and nothing changed, for a model holding integer
    buffers (quantized or sparse layers: their codes and scales stay as stored, under autocast)."""
    if any(not b.dtype.is_floating_point for b in model.buffers()):
        return False
    model.to(dtype=dtype)
    _rope_in_fp32(model)
    return True


def _rope_buffer(config: ModelConfig) -> torch.Tensor:
    from .model.rope import rope_inverse_frequencies

    return rope_inverse_frequencies(config)


def check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k])}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape mismatch " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"{where}: weights do not match config.json: " + " | ".join(problems))
