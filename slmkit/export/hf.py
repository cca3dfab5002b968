"""Hugging Face format in and out, for the Llama, Mistral, Qwen2, Phi-3 and Mixtral families.

`export_hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as they are; `import_hf` reads a local HF checkpoint (single
`model.safetensors` or a sharded `model.safetensors.index.json`) into an slmkit checkpoint. Module names
match HF's Llama, so Llama/Mistral/Qwen2 weights move by name. Two families store them differently:

- Phi-3 (Abdin et al., 2024) fuses q/k/v into `self_attn.qkv_proj` (rows: q, then k, then v) and gate/up
  into `mlp.gate_up_proj` (rows: gate, then up). Import splits them into slmkit's separate Linears, so
  compression passes see the same projections as in any other family; export concatenates them back.
- Mixtral (Jiang et al., 2024) checkpoints name the MoE block `block_sparse_moe` with experts `w1` (gate),
  `w3` (up), `w2` (down) per expert — what `save_pretrained` writes, also in transformers 5, whose modules
  hold the experts fused as 3-D `mlp.experts.gate_up_proj` (E, 2F, d) / `mlp.experts.down_proj` (E, d, F).
  Import reads either layout; export writes the per-expert one, which every transformers version loads.

The rest of the work is in the config:

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
- Phi-3's long-context variants use "longrope" (formerly "su") scaling and some configs a partial rotary
  factor; slmkit's rotary embedding has neither, so those are refused with what is supported. Dropout rates
  (`resid_pdrop`, `embd_pdrop`) do nothing at inference and are kept only to be written back.
- Mixtral's `router_jitter_noise` only perturbs router inputs in training; slmkit does not apply it (a
  warning says so when it is non-zero). slmkit's load-balancing loss is transformers' divided by
  `num_experts_per_tok` (see `slmkit/model/moe.py`); `router_aux_loss_coef` is copied as it is. Mixtral was
  not trained with a router z-loss, so an imported one gets `router_z_loss_coef=0`.

Weights are read and written with safetensors only; a pickle (`pytorch_model.bin`) checkpoint is refused.

Compressed checkpoints export as the dense model they compute (`dense_state_dict`): slmkit-quantized modules
(`Int8Linear`, `Int4Linear`, a tied `QuantizedEmbedding`) are written as their dequantized weights — exactly the
values slmkit's own dense path multiplies with (at fp32: the products of codes and scales, no rounding) —,
low-rank factors merged (W = up · down, in float64, rounded once), pruned `SparseLinear` weights with their zeros.
transformers then computes the checkpoint's function, but in float: none of the size saving of quantization or
factorization survives, which the export says (a warning, and a note in the model card's README.md). For
llama.cpp, `slm export gguf` keeps the quantized codes.
"""

from __future__ import annotations

import hashlib
import json
import re
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
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "sliding_window": 4096,
                "num_key_value_heads": 8},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
    "phi3": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
             "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "sliding_window": None},
    "mixtral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "sliding_window": None,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.001},
}
_DEFAULT_THETA = {"mixtral": 1e6}  # transformers' default rope_theta where it is not 10000
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
    dense, notes = dense_state_dict(model, ckpt.provenance.get("passes", []))
    check_exportable(model, where=ckpt_dir, state=dense)
    state = hf_state_dict(model, _as_dtype(dtype), state=dense)
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
        card = card.replace('library_name: "slmkit"', 'library_name: "transformers"', 1)
        if notes:
            card = card.rstrip("\n") + "\n\n## Hugging Face export\n\n" + "".join(f"- {n}\n" for n in notes)
        atomic_write_text(out / "README.md", card)
    for note in notes:
        warnings.warn(f"{ckpt_dir}: {note}", stacklevel=2)
    _warn_sliding_window(config, f"{out}/config.json", exported=True)
    if config.memory_length:
        warnings.warn(f"{ckpt_dir}: memory_length={config.memory_length} (Transformer-XL segment memory) has no "
                      f"Hugging Face equivalent; under transformers {out} attends within its input only",
                      stacklevel=2)
    return out


def check_exportable(model: CausalLM, *, where: Path | str = "model",
                     state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise HFExportError when the HF class for `model.config.model_type` cannot hold this model (`state`: its
    dense state dict, `dense_state_dict`, when already computed)."""
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
    if c.model_type in ("mistral", "phi3", "mixtral") and (c.attention_bias or c.qkv_bias or c.mlp_bias):
        arch = ARCHITECTURES[c.model_type]
        raise HFExportError(f"{where}: model_type {c.model_type!r} with biases cannot be expressed in Hugging Face "
                            f"format: {arch} has no biases. Use model_type='qwen2' (q/k/v biases) or "
                            "'llama' (attention_bias, mlp_bias).")
    _check_family_options(c, where)
    if state is None:
        state, _ = dense_state_dict(model)
    with torch.device("meta"):
        reference = CausalLM(c)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if expected != actual:
        extra = sorted(set(actual) - set(expected))[:5]
        missing = sorted(set(expected) - set(actual))[:5]
        reshaped = [k for k in expected if k in actual and expected[k] != actual[k]][:5]
        raise HFExportError(f"{where}: the weights are not those of a plain {c.model_type} model of this config "
                            f"(unexpected {extra}, missing {missing}, reshaped {reshaped}); Hugging Face format "
                            "cannot hold them")


def _check_family_options(c: ModelConfig, where: Path | str) -> None:
    """The architecture options (experts, attention variant, rope) the HF class of `c.model_type` can hold."""
    if c.attention_type != "full":
        raise HFExportError(f"{where}: attention_type={c.attention_type!r} has no Hugging Face architecture "
                            "(its projections are not part of any transformers model); only full attention "
                            "exports")
    if c.num_local_experts and c.model_type != "mixtral":
        raise HFExportError(f"{where}: a mixture-of-experts model (num_local_experts={c.num_local_experts}) "
                            f"cannot be exported as model_type {c.model_type!r}; set model_type='mixtral' in "
                            "config.json (MixtralForCausalLM is this architecture) and export again")
    if c.model_type == "mixtral" and not c.num_local_experts:
        raise HFExportError(f"{where}: model_type 'mixtral' needs num_local_experts > 0 (this model has a dense "
                            "MLP); export it as model_type 'mistral' instead")
    if c.model_type == "phi3" and c.rope_scaling:
        kind = c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
        raise HFExportError(f"{where}: Phi3ForCausalLM supports default or longrope rotary embeddings, not "
                            f"{kind!r} scaling; export this model as model_type 'llama' instead")


def dense_state_dict(model: CausalLM, passes: list[dict] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's state dict with every compressed module as the dense float weight it computes with (see the
    module docstring), and notes on what was converted (empty for a model of plain Linears)."""
    from ..compress.lowrank import LowRankLinear
    from ..compress.qlinear import QUANTIZED_LINEARS, QuantizedEmbedding, TiedQuantizedHead
    from ..compress.sparse import SparseLinear

    dense: dict[str, torch.Tensor] = {}
    converted: dict[str, list[str]] = {"quantized": [], "low-rank": [], "sparse": []}
    done: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in done):
            continue
        if isinstance(m, (QuantizedEmbedding, *QUANTIZED_LINEARS)):
            dense[f"{name}.weight"], kind = m.dequantize(), "quantized"
        elif isinstance(m, LowRankLinear):
            w = m.up.weight.detach().double() @ m.down.weight.detach().double()  # (out, r) @ (r, in)
            dense[f"{name}.weight"], kind = w.to(m.up.weight.dtype), "low-rank"
        elif isinstance(m, SparseLinear):
            dense[f"{name}.weight"], kind = m.weight.detach(), "sparse"
        elif isinstance(m, TiedQuantizedHead):
            done.append(name)
            continue
        else:
            continue
        bias = m.up.bias if isinstance(m, LowRankLinear) else getattr(m, "bias", None)
        if bias is not None:
            dense[f"{name}.bias"] = bias.detach()
        converted[kind].append(name)
        done.append(name)
    state = {k: v.detach() for k, v in model.state_dict().items()
             if not any(k.startswith(p + ".") for p in done)}
    state.update(dense)
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    applied = ", ".join(dict.fromkeys(p.get("name", "?") for p in passes or [])) or "none recorded"
    notes = []
    if converted["quantized"]:
        n = converted["quantized"]
        notes.append(f"{len(n)} quantized modules (e.g. {n[0]}; passes: {applied}) are written dequantized: float "
                     "weights equal to the values slmkit computes with, so transformers computes the same function, "
                     "but at float size; `slm export gguf` keeps the quantized codes")
    if converted["low-rank"]:
        n = converted["low-rank"]
        notes.append(f"{len(n)} low-rank projections (e.g. {n[0]}) are written merged (W = up · down): the same "
                     "function at the dense size")
    if converted["sparse"]:
        n = converted["sparse"]
        notes.append(f"{len(n)} pruned projections (e.g. {n[0]}) are written dense: their zeros take the same "
                     "space as any weight")
    return state, notes


def hf_state_dict(model: CausalLM, dtype: torch.dtype | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict transformers expects: compressed modules dense (`dense_state_dict`, or `state` when given),
    tied lm_head omitted, Qwen2 q/k/v biases always present, Phi-3 projections fused and Mixtral experts under
    their checkpoint names."""
    c = model.config
    state = dict(state) if state is not None else dense_state_dict(model)[0]
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if c.model_type == "qwen2" and not c.qkv_bias:
        for i in range(c.num_hidden_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = state[f"model.layers.{i}.self_attn.{proj}.weight"]
                state[f"model.layers.{i}.self_attn.{proj}.bias"] = w.new_zeros(w.shape[0])
    if c.model_type == "phi3":
        state = fuse_phi3(state, c)
    elif c.model_type == "mixtral":
        state = mixtral_to_hf_names(state)
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
    elif c.model_type == "phi3":
        d["rope_parameters"]["partial_rotary_factor"] = 1.0
        d.update(sliding_window=c.sliding_window, resid_pdrop=c.extra.get("resid_pdrop", 0.0),
                 embd_pdrop=c.extra.get("embd_pdrop", 0.0),
                 original_max_position_embeddings=c.extra.get("original_max_position_embeddings",
                                                              c.max_position_embeddings))
    elif c.model_type == "mixtral":
        d.update(sliding_window=c.sliding_window, num_local_experts=c.num_local_experts,
                 num_experts_per_tok=c.num_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef,
                 router_jitter_noise=c.extra.get("router_jitter_noise", 0.0),
                 output_router_logits=c.extra.get("output_router_logits", False))
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


# -- family weight layouts -----------------------------------------------------------------------

def split_phi3(state: dict[str, torch.Tensor], c: ModelConfig, where: Path | str) -> dict[str, torch.Tensor]:
    """Phi-3's fused `qkv_proj` / `gate_up_proj` split into slmkit's q/k/v and gate/up projections."""
    q_rows, kv_rows, f = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    fused = {"self_attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj"), (q_rows, kv_rows, kv_rows)),
             "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj"), (f, f))}
    state = dict(state)
    for i in range(c.num_hidden_layers):
        for name, (parent, parts, rows) in fused.items():
            key = f"model.layers.{i}.{name}.weight"
            if key not in state:
                raise HFExportError(f"{where}: missing tensor {key!r} (Phi-3 stores {name.split('.')[-1]} fused)")
            w = state.pop(key)  # (sum(rows), d)
            if w.shape[0] != sum(rows):
                raise HFExportError(f"{where}: {key} has {w.shape[0]} rows, config.json implies {sum(rows)} "
                                    f"({' + '.join(map(str, rows))} for {', '.join(parts)})")
            for part, piece in zip(parts, torch.split(w, rows, dim=0)):
                state[f"model.layers.{i}.{parent}.{part}.weight"] = piece.clone()  # own storage for safetensors
    return state


def fuse_phi3(state: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `split_phi3`: q/k/v rows stacked into `qkv_proj`, gate/up rows into `gate_up_proj`."""
    state = dict(state)
    for i in range(c.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        state[attn + "qkv_proj.weight"] = torch.cat([state.pop(f"{attn}{p}_proj.weight") for p in "qkv"])
        state[mlp + "gate_up_proj.weight"] = torch.cat([state.pop(f"{mlp}{p}_proj.weight") for p in ("gate", "up")])
    return state


# Mixtral checkpoint names per expert: w1 = gate, w3 = up, w2 = down.
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_KEY = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(gate|experts\.(\d+)\.(w[123]))\.weight")
_MIXTRAL_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_SLMKIT_MOE_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|experts\.(\d+)\.(\w+_proj))\.weight")


def mixtral_from_hf_names(state: dict[str, torch.Tensor], c: ModelConfig, where: Path | str) -> dict[str, torch.Tensor]:
    """Mixtral expert and router tensors under slmkit's names (`mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`),
    from either the per-expert checkpoint layout or transformers 5's fused 3-D expert tensors."""
    out: dict[str, torch.Tensor] = {}
    E, F, d = c.num_local_experts, c.intermediate_size, c.hidden_size
    for key, w in state.items():
        if m := _MIXTRAL_KEY.fullmatch(key):
            layer, what, expert, proj = m.groups()
            name = "gate" if what == "gate" else f"experts.{expert}.{_MIXTRAL_EXPERT[proj]}"
            out[f"model.layers.{layer}.mlp.{name}.weight"] = w
        elif m := _MIXTRAL_FUSED.fullmatch(key):
            layer, what = m.groups()
            expected = (E, 2 * F, d) if what == "gate_up_proj" else (E, d, F)
            if tuple(w.shape) != expected:
                raise HFExportError(f"{where}: {key} has shape {tuple(w.shape)}, config.json implies {expected} "
                                    "(num_local_experts, rows, columns)")
            prefix = f"model.layers.{layer}.mlp.experts"
            for e in range(E):
                if what == "gate_up_proj":  # (2F, d): gate rows first, then up rows
                    out[f"{prefix}.{e}.gate_proj.weight"] = w[e, :F].clone()
                    out[f"{prefix}.{e}.up_proj.weight"] = w[e, F:].clone()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = w[e].clone()
        else:
            out[key] = w
    return out


def mixtral_to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """slmkit's MoE names to the per-expert Mixtral checkpoint layout that `save_pretrained` writes."""
    to_hf = {v: k for k, v in _MIXTRAL_EXPERT.items()}
    out: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        if m := _SLMKIT_MOE_KEY.fullmatch(key):
            layer, what, expert, proj = m.groups()
            name = "gate" if what == "gate" else f"experts.{expert}.{to_hf[proj]}"
            key = f"model.layers.{layer}.block_sparse_moe.{name}.weight"
        out[key] = w
    return out


# -- import --------------------------------------------------------------------------------------

def import_hf(hf_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Read a local Hugging Face Llama/Mistral/Qwen2/Phi-3/Mixtral directory into an slmkit checkpoint at `out_dir`.

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
    if config.model_type == "phi3":
        state = split_phi3(state, config, weights_file)
    elif config.model_type == "mixtral":
        state = mixtral_from_hf_names(state, config, weights_file)
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
    jitter = raw.get("router_jitter_noise") or 0.0
    if config.model_type == "mixtral" and jitter:
        warnings.warn(f"{config_path}: router_jitter_noise={jitter} only perturbs router inputs while training in "
                      "transformers; slmkit does not apply it (inference is the same either way)", stacklevel=2)
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
    d["rope_theta"], d["rope_scaling"] = _rope_from_hf(raw, source, default_theta=_DEFAULT_THETA.get(model_type, 1e4))
    if model_type == "qwen2":  # q/k/v biases are built into Qwen2; a window only applies when switched on
        d.update(qkv_bias=True, attention_bias=False, mlp_bias=False)
        if not raw.get("use_sliding_window", False):
            d["sliding_window"] = None
    elif model_type in ("mistral", "phi3", "mixtral"):  # no biases anywhere in these architectures
        d.update(qkv_bias=False, attention_bias=False, mlp_bias=False)
        if model_type == "mixtral":  # Mixtral's recipe has no router z-loss
            d.setdefault("router_z_loss_coef", 0.0)
    else:
        d["qkv_bias"] = False
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    try:
        return ModelConfig.from_dict(d, source=source)
    except ConfigError as e:
        raise HFExportError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _rope_from_hf(raw: dict[str, Any], source: str, default_theta: float = 1e4) -> tuple[float, dict | None]:
    # transformers 5 lets a non-null legacy `rope_scaling` win over `rope_parameters`; follow it.
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise HFExportError(f"{source}: rope parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise HFExportError(f"{source}: per-layer-type rope parameters are not supported")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise HFExportError(f"{source}: partial_rotary_factor={partial} (rotary embeddings on part of each head) "
                            "is not supported by slmkit; only full rotary (partial_rotary_factor 1.0) imports")
    params = {k: v for k, v in params.items() if k != "partial_rotary_factor"}
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind in ("longrope", "su", "yarn") and raw.get("model_type") == "phi3":
        raise HFExportError(f"{source}: Phi-3 rope scaling {kind!r} (LongRoPE, used by the 128k-context variants "
                            "such as Phi-3-mini-128k) is not supported by slmkit; Phi-3 models with default "
                            "rotary embeddings (rope_scaling null, e.g. the 4k-context variants) import")
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
    applies = config.model_type in ("mistral", "phi3", "mixtral") or (
        config.model_type == "qwen2" and bool(config.extra.get("use_sliding_window")))
    if applies and window is not None and window < config.max_position_embeddings:
        side = "transformers will" if exported else "the source model was configured to"
        warnings.warn(f"{where}: sliding_window={window}: {side} attend over the last {window} tokens only, while "
                      f"slmkit attends over the full context; outputs agree for sequences up to {window} tokens",
                      stacklevel=3)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, HFExportError)
