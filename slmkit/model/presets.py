"""Named model sizes. Parameter counts are for a vocabulary of 8192 with tied embeddings."""

from __future__ import annotations

from pathlib import Path

from .. import yamlio
from .config import ConfigError, ModelConfig

# name: (hidden, layers, heads, kv_heads, intermediate)
PRESETS: dict[str, dict] = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=192),  # ~0.6M
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384),  # ~1.8M
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=768),  # ~6.8M
    "base": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1536),  # ~29M
    "medium": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                   intermediate_size=2048),  # ~82M
    "large": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816),  # ~98M
}


def resolve_model_config(spec: str | Path, **overrides) -> ModelConfig:
    """A preset name, a YAML/JSON file of config fields (optionally `preset: NAME` plus overrides), or a
    checkpoint directory's config.json. `overrides` (e.g. vocab_size from the dataset) fill fields the
    spec does not set."""
    spec_str = str(spec)
    if spec_str in PRESETS:
        return ModelConfig(**{**overrides, **PRESETS[spec_str]})
    path = Path(spec_str)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(
            f"model {spec_str!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file"
        )
    data = yamlio.load_file(path, ConfigError)  # JSON is YAML (exponents read as floats)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    base = {}
    if "preset" in data:
        name = data.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    unknown = set(data) - set(ModelConfig.__dataclass_fields__) - {"rope_parameters", "architectures",
                                                                    "transformers_version", "torch_dtype", "dtype"}
    if unknown and path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"{path}: unknown config field(s) {sorted(unknown)}; "
                          f"known: {sorted(ModelConfig.__dataclass_fields__)}")
    return ModelConfig.from_dict({**overrides, **base, **data}, source=str(path))
