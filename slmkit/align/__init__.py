"""Alignment: chat templates, supervised fine-tuning, verifiers, verifier-made preference pairs, LoRA and the
DPO family of preference losses."""

from .chat import ChatTemplateError, chat_template_of, render_chat
from .lora import (LoRAConfig, LoRAError, LoRALinear, apply_lora, load_adapter, lora_state_dict, merge_lora,
                   save_adapter, trainable_parameters)
from .preference_losses import PREFERENCE_LOSSES, PreferenceConfig, PreferenceLossError
from .verifiers import VERIFIERS, VerifierError, VerifierResult, build_verifier
