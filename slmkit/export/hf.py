"""Hugging Face format in and out, for the Llama, Mistral and Qwen2 families.

`export_hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as they are; `import_hf` reads a local HF checkpoint (single
`model.safetensors` or a sharded `model.safetensors.index.json`) into an slmkit checkpoint. Module names
already match HF's, so weights move by name; the work is in the config:

- transformers 5 keeps rotary settings in one `rope_parameters` dict, 4.x in top-level `rope_theta` and
  `rope_scaling`. Export writes both, with the same values, so either reads it (v5 lets a non-null
  `rope_scaling` win over `rope_parameters`, which is harmless because they agree).
- HF's architectures hard-code their biases: Llama has `attention_bias` (q, k, v *and* o) and `mlp_bias`;
  Qwen2 always has q/k/v biases and nothing else; Mistral has none. A config outside that is refused on
  export with what to do, never silently changed. A Qwen2-typed slmkit model without q/k/v biases is
  exported with zero biases, which computes the same function.
- Llama-3 rope scaling is written with every parameter spelled out, because transformers 5 and slmkit
  default a missing `original_max_position_embeddings` differently.
- Missing fields on import take transformers' defaults for that model type (they differ from
  `ModelConfig`'s: e.g. HF leaves embeddings untied and uses rms_norm_eps 1e-6).

Weights are read and written with safetensors only; a pickle (`pytorch_model.bin`) checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (ARCHITECTURES, CheckpointError, atomic_copy, atomic_write_text, check_state_matches,
                          load_checkpoint, save_checkpoint, save_weights)
from ..model import SUPPORTED_MODEL_TYPES, CausalLM, ConfigError, ModelConfig
from ..model.config import read_json_object
from ..model.rope import rope_inverse_frequencies

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# slmkit-only or not-transferable config keys, never written into an exported config.json.
_NOT_EXPORTED = {"qkv_bias", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version",
                 "architectures", "rope_parameters", "_name_or_path"}

# Fields transformers fills in when config.json leaves them out, where they differ from ModelConfig's.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None},
    "mistral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "sliding_window": 4096},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


class HFExportError(ValueError):
    """A model or directory that cannot be moved between slmkit and Hugging Face format as it is."""


# -- export --------------------------------------------------------------------------------------

def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Write the slmkit checkpoint `ckpt_dir` as a Hugging Face model directory `out_dir`.

    `dtype` (torch dtype or its name, e.g. "bfloat16") casts the floating-point weights; None keeps the
    checkpoint's. Returns `out_dir`."""
    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    if out.exists() and out.resolve() == ckpt_dir.resolve():
        raise HFExportError(f"{out}: export into the checkpoint directory itself; choose another out_dir")
    try:
        ckpt = load_checkpoint(ckpt_dir)
    except CheckpointError as e:
        raise HFExportError(f"cannot export {ckpt_dir}: {e}") from None
    model, config = ckpt.model, ckpt.config
    check_exportable(model, where=ckpt_dir)
    state = hf_state_dict(model, _as_dtype(dtype))
    out_dtype = state["model.embed_tokens.weight"].dtype

    out.mkdir(parents=True, exist_ok=True)
    save_weights(state, out / WEIGHTS)
    atomic_write_text(out / "config.json", json.dumps(hf_config(config, out_dtype), indent=2, sort_keys=True) + "\n")
    _write_generation_config(ckpt_dir, config, out)
    for name in TOKENIZER_FILES:
        if (ckpt_dir / name).exists():
            atomic_copy(ckpt_dir / name, out / name)
    if not (ckpt_dir / "tokenizer.json").exists():
        warnings.warn(f"{ckpt_dir}: no tokenizer.json, so {out} has no tokenizer; "
                      "AutoTokenizer.from_pretrained will not load it", stacklevel=2)
    if (ckpt_dir / "README.md").exists():
        card = (ckpt_dir / "README.md").read_text()
        # In HF format the model runs under transformers; the Hub reads library_name from the front matter.
        atomic_write_text(out / "README.md", card.replace('library_name: "slmkit"', 'library_name: "transformers"', 1))
    _warn_sliding_window(config, f"{out}/config.json", exported=True)
    return out


def check_exportable(model: CausalLM, *, where: Path | str = "model") -> None:
    """Raise HFExportError when the HF class for `model.config.model_type` cannot hold this model."""
    c = model.config
    if c.model_type not in ARCHITECTURES:
        raise HFExportError(f"{where}: model_type={c.model_type!r} has no Hugging Face architecture here; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    if c.model_type == "llama" and c.qkv_bias and not c.attention_bias:
        raise HFExportError(
            f"{where}: model_type 'llama' with qkv_bias=True cannot be expressed in Hugging Face format: "
            "LlamaForCausalLM has either no attention biases or biases on q, k, v and o together. Set "
            "model_type='qwen2' in config.json (Qwen2 is this architecture with q/k/v-only biases) and export again.")
    if c.model_type == "qwen2" and (c.attention_bias or c.mlp_bias):
        field = "attention_bias (an o_proj bias)" if c.attention_bias else "mlp_bias"
        raise HFExportError(f"{where}: model_type 'qwen2' with {field} cannot be expressed in Hugging Face format: "
                            "Qwen2ForCausalLM has biases on q, k, v only. Use model_type='llama', whose "
                            "attention_bias/mlp_bias options cover it.")
    if c.model_type == "mistral" and (c.attention_bias or c.qkv_bias or c.mlp_bias):
        raise HFExportError(f"{where}: model_type 'mistral' with biases cannot be expressed in Hugging Face format: "
                            "MistralForCausalLM has no biases. Use model_type='qwen2' (q/k/v biases) or "
                            "'llama' (attention_bias, mlp_bias).")
    # A compression pass may have swapped projections for packed/quantized modules: those are not HF weights.
    swapped = [name for name, m in model.named_modules()
               if name.endswith("_proj") and type(m) is not torch.nn.Linear]
    if swapped:
        raise HFExportError(f"{where}: {len(swapped)} projections are not plain nn.Linear (e.g. {swapped[0]}: "
                            f"{type(model.get_submodule(swapped[0])).__name__}); Hugging Face format holds dense "
                            "weights only — export the checkpoint from before the pass that replaced them")
    with torch.device("meta"):
        reference = CausalLM(c)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        extra = sorted(set(actual) - set(expected))[:5]
        missing = sorted(set(expected) - set(actual))[:5]
        reshaped = [k for k in expected if k in actual and expected[k] != actual[k]][:5]
        raise HFExportError(f"{where}: the weights are not those of a plain {c.model_type} model of this config "
                            f"(unexpected {extra}, missing {missing}, reshaped {reshaped}); Hugging Face format "
                            "cannot hold them")


def hf_state_dict(model: CausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict transformers expects: tied lm_head omitted, Qwen2 q/k/v biases always present."""
    c = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if c.model_type == "qwen2" and not c.qkv_bias:
        for i in range(c.num_hidden_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = state[f"model.layers.{i}.self_attn.{proj}.weight"]
                state[f"model.layers.{i}.self_attn.{proj}.bias"] = w.new_zeros(w.shape[0])
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json as transformers 5 writes it, plus the rope keys transformers 4.x reads."""
    c = config
    d = {k: v for k, v in c.extra.items() if k not in _NOT_EXPORTED}
    d.update({
        "architectures": [ARCHITECTURES[c.model_type]], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": c.hidden_act, "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "use_cache": True,
        "attention_dropout": 0.0, "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4.x name of `dtype`
    })
    scaling = _full_rope_scaling(c.rope_scaling, c.max_position_embeddings)
    d["rope_theta"] = c.rope_theta
    d["rope_scaling"] = scaling
    d["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": c.rope_theta}
    if c.model_type == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    elif c.model_type == "mistral":
        d["sliding_window"] = c.sliding_window
    elif c.model_type == "qwen2":
        use_window = bool(c.extra.get("use_sliding_window", False)) and c.sliding_window is not None
        d.update(use_sliding_window=use_window, sliding_window=c.sliding_window if use_window else None,
                 max_window_layers=c.extra.get("max_window_layers", c.num_hidden_layers))
        if len(d.get("layer_types") or []) != c.num_hidden_layers:
            d.pop("layer_types", None)  # transformers derives it from use_sliding_window/max_window_layers
    return d


def _full_rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = kind
    if kind == "llama3":
        # Spell out the values slmkit's rope uses, so every transformers version computes the same frequencies.
        for k, v in _LLAMA3_DEFAULTS.items():
            out.setdefault(k, v)
        out.setdefault("original_max_position_embeddings", 8192)
    return out


def _write_generation_config(ckpt_dir: Path, config: ModelConfig, out: Path) -> None:
    src = ckpt_dir / "generation_config.json"
    gen = _read_json(src) if src.exists() else {}
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id, **gen}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise HFExportError(f"dtype={dtype!r} is not supported; choose one of {', '.join(names)}")
    return names[dtype]


# -- import --------------------------------------------------------------------------------------

def import_hf(hf_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Read a local Hugging Face Llama/Mistral/Qwen2 directory into an slmkit checkpoint at `out_dir`.

    Weights keep their stored dtype (bf16 stays bf16) unless `dtype` is given. Returns `out_dir`."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise HFExportError(f"{hf_dir}: not a directory; import_hf reads a local Hugging Face model directory")
    if out.exists() and out.resolve() == hf_dir.resolve():
        raise HFExportError(f"{out}: import into the Hugging Face directory itself; choose another out_dir")
    config_path = hf_dir / "config.json"
    raw = _read_json(config_path)
    config = model_config_from_hf(raw, source=str(config_path))
    state, weights_file = load_hf_state(hf_dir)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice

    with torch.device("meta"):
        model = CausalLM(config)
    try:
        check_state_matches(model, state, weights_file)
    except CheckpointError as e:
        raise HFExportError(f"{e} (model_type {config.model_type!r})") from None
    target = _as_dtype(dtype) or state["model.embed_tokens.weight"].dtype
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config)
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    has_tokenizer = _copy_tokenizer(hf_dir, out)
    stage = {"stage": "import", "source": str(hf_dir), "model_type": config.model_type,
             "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
             "weights": weights_file.name, "dtype": str(target).removeprefix("torch."),
             "summary": {"source": str(hf_dir), "model_type": config.model_type}}
    gen_path = hf_dir / "generation_config.json"
    generation = None
    if gen_path.exists():  # kept as transformers wrote it (a list of eos ids stays a list here)
        generation = {k: v for k, v in _read_json(gen_path).items()
                      if k not in ("transformers_version", "_from_model_config")}
    save_checkpoint(model, out, provenance={"stages": [stage]}, generation=generation)
    if not has_tokenizer:
        warnings.warn(f"{hf_dir}: no tokenizer.json, so {out} has no tokenizer. If the model ships a "
                      "SentencePiece tokenizer.model, convert it first: "
                      "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes tokenizer.json", stacklevel=2)
    _warn_sliding_window(config, str(config_path), exported=False)
    return out


def model_config_from_hf(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Map a transformers config.json (4.x or 5 layout) of a supported family to a ModelConfig."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFExportError(f"{source}: model_type={model_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "unknown")
        raise HFExportError(f"{source}: the checkpoint is quantized ({method}); import_hf reads dense weights — "
                            "import the unquantized model and compress it with slmkit")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise HFExportError(f"{source}: missing required fields {missing}")
    d = {**_HF_DEFAULTS[model_type], **raw}
    d.pop("rope_parameters", None)
    d["rope_theta"], d["rope_scaling"] = _rope_from_hf(raw, source)
    if model_type == "qwen2":  # q/k/v biases are built into Qwen2; a window only applies when switched on
        d.update(qkv_bias=True, attention_bias=False, mlp_bias=False)
        if not raw.get("use_sliding_window", False):
            d["sliding_window"] = None
    elif model_type == "mistral":
        d.update(qkv_bias=False, attention_bias=False, mlp_bias=False)
    else:
        d["qkv_bias"] = False
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    try:
        return ModelConfig.from_dict(d, source=source)
    except ConfigError as e:
        raise HFExportError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _rope_from_hf(raw: dict[str, Any], source: str) -> tuple[float, dict | None]:
    # transformers 5 lets a non-null legacy `rope_scaling` win over `rope_parameters`; follow it.
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise HFExportError(f"{source}: rope parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise HFExportError(f"{source}: per-layer-type rope parameters are not supported")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise HFExportError(f"{source}: rope type {kind!r} is not supported by slmkit; supported: default, llama3")
    if "factor" not in params:
        raise HFExportError(f"{source}: llama3 rope scaling needs 'factor'")
    scaling = {k: v for k, v in params.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = "llama3"
    for k, v in _LLAMA3_DEFAULTS.items():
        scaling.setdefault(k, v)
    # transformers 5 falls back to max_position_embeddings for the pretraining length.
    scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
    return theta, scaling


def load_hf_state(hf_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a single-file or sharded safetensors checkpoint, rotary buffers dropped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = hf_dir / WEIGHTS, hf_dir / WEIGHTS_INDEX
    if single.exists():
        files, where = [single], single
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFExportError(f"{index}: no 'weight_map' object naming the shard of each tensor")
        files, where = [hf_dir / name for name in sorted(set(weight_map.values()))], index
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise HFExportError(f"{index}: shards {absent} are listed but not in {hf_dir}")
    else:
        pickled = [name for name in PICKLE_WEIGHTS if (hf_dir / name).exists()]
        if pickled:
            raise HFExportError(
                f"{hf_dir}: only {pickled[0]} (a pickle) is present; slmkit never loads pickle files because "
                "they can run code. Convert it to safetensors first, e.g. in a trusted environment: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise HFExportError(f"{hf_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFExportError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupted") from None
        twice = sorted(set(part) & set(state))
        if twice:
            raise HFExportError(f"{f}: tensors {twice[:5]} also appear in another shard")
        state.update(part)
    # Old transformers saved the rotary frequencies; slmkit recomputes them from the config.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return state, where


def _copy_tokenizer(hf_dir: Path, out: Path) -> bool:
    if not (hf_dir / "tokenizer.json").exists():
        return False
    atomic_copy(hf_dir / "tokenizer.json", out / "tokenizer.json")
    tok_cfg = hf_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        cfg = _read_json(tok_cfg)
        template = hf_dir / "chat_template.jinja"  # newer transformers save the template beside the config
        if "chat_template" not in cfg and template.exists():
            cfg["chat_template"] = template.read_text()
        atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return True


def _warn_sliding_window(config: ModelConfig, where: str, *, exported: bool) -> None:
    window = config.sliding_window
    applies = config.model_type == "mistral" or (
        config.model_type == "qwen2" and bool(config.extra.get("use_sliding_window")))
    if applies and window is not None and window < config.max_position_embeddings:
        side = "transformers will" if exported else "the source model was configured to"
        warnings.warn(f"{where}: sliding_window={window}: {side} attend over the last {window} tokens only, while "
                      f"slmkit attends over the full context; outputs agree for sequences up to {window} tokens",
                      stacklevel=3)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, HFExportError)
