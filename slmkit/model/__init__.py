"""Model definitions. Imports nothing else of slmkit."""

from .cache import KVCache
from .config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from .decoder import CausalLM, causal_mask
from .presets import PRESETS, resolve_model_config

__all__ = ["CausalLM", "ConfigError", "KVCache", "ModelConfig", "PRESETS", "SUPPORTED_MODEL_TYPES",
           "causal_mask", "resolve_model_config"]
