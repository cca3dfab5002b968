"""Model configuration: one typed dataclass whose field names follow Hugging Face's.

The same object is written as `config.json` in a checkpoint, so a Llama/Mistral/Qwen2-shaped
slmkit model is readable by `transformers` without translation. Architecture variants added later
(mixture of experts, Linformer, segment memory) are further optional fields here, each implemented
in its own module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "mixtral")
ATTENTION_TYPES = ("full", "linformer")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working model."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling, HF layout:
    # {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    #  "original_max_position_embeddings": 8192}
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v and o (Llama semantics)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    sliding_window: int | None = None  # Mistral; recorded for interop, attention is full
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    model_type: str = "llama"
    # Sparse mixture of experts (Mixtral style, slmkit/model/moe.py): 0 experts = dense SwiGLU MLP.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch Transformer / Mixtral)
    router_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    # Attention variant: "full" (softmax over all past tokens) or "linformer" (slmkit/model/linformer.py).
    attention_type: str = "full"
    linformer_k: int = 16  # keys/values of each block projected to this many rows (Linformer)
    linformer_block: int = 128  # causal block size for the projections
    # Blocks a query sees as their own k summary rows; older blocks are averaged into one k-row summary, so
    # attention is linear in T. None: every earlier block as its own rows (checkpoints saved before this field).
    linformer_window: int | None = 4
    # Train Linformer layers as a block scan that keeps no T-sized activation and recomputes each block in
    # backward: far less training memory, about 1.5x slower (slmkit/model/linformer.py).
    linformer_recompute: bool = False
    # Transformer-XL segment memory (slmkit/model/xl_memory.py): cached positions from earlier segments.
    memory_length: int = 0
    extra: dict = field(default_factory=dict)  # unknown HF fields, preserved on round trip

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use 'silu' (SwiGLU)")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_local_experts < 0 or (self.num_local_experts and not
                                           1 <= self.num_experts_per_tok <= self.num_local_experts):
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                              f"num_local_experts={self.num_local_experts}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ConfigError("router_aux_loss_coef and router_z_loss_coef must be >= 0")
        if self.attention_type not in ATTENTION_TYPES:
            raise ConfigError(f"attention_type={self.attention_type!r} is not supported; "
                              f"supported: {', '.join(ATTENTION_TYPES)}")
        if self.attention_type == "linformer":
            if not 0 < self.linformer_k <= self.linformer_block:
                raise ConfigError(f"linformer_k={self.linformer_k} must be in 1..linformer_block="
                                  f"{self.linformer_block} (each block of keys is projected to k rows)")
            if self.linformer_window is not None and (not isinstance(self.linformer_window, int)
                                                      or self.linformer_window < 0):
                raise ConfigError(f"linformer_window={self.linformer_window!r} must be an integer >= 0 (blocks "
                                  f"seen as their own summaries) or null (every earlier block)")
        if self.memory_length < 0:
            raise ConfigError(f"memory_length={self.memory_length} must be >= 0")
        if self.memory_length and self.attention_type != "full":
            raise ConfigError(f"memory_length={self.memory_length} needs attention_type='full'; segment memory "
                              f"cannot be used with {self.attention_type!r} attention")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: 'llama3'")

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 writes rope parameters as one dict.
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):
            if "rope_theta" in rope_params:
                kwargs.setdefault("rope_theta", rope_params["rope_theta"])
            if rope_params.get("rope_type", "default") != "default" and "rope_scaling" not in d:
                kwargs["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if kwargs.get("rope_scaling") and kwargs["rope_scaling"].get("rope_type", "default") == "default" \
                and kwargs["rope_scaling"].get("type") in (None, "default"):
            kwargs["rope_scaling"] = None
        for k in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(k), list):  # Llama 3 lists several eos ids; keep the first
                kwargs[k] = kwargs[k][0]
        extra = {k: v for k, v in d.items() if k not in known and k not in _DROP_ON_LOAD}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # wrong value types
            raise ConfigError(f"{source}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        d = read_json_object(path)
        if d.get("attention_type") == "linformer" and "linformer_window" not in d:
            d["linformer_window"] = None  # saved before the window existed: every block kept, as trained
        return cls.from_dict(d, source=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def read_json_object(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON object from `path`, or `error` naming the file (and line) when it is missing or malformed."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


# Fields transformers adds that carry no meaning for the architecture.
_DROP_ON_LOAD = {"transformers_version", "_name_or_path", "rope_parameters", "torch_dtype", "dtype",
                 "architectures", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
                 "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
                 "pretraining_tp", "attention_dropout"}
