"""Alignment: chat templates, supervised fine-tuning, verifiers, verifier-made preference pairs, LoRA and the
DPO family of preference losses.

Names are imported on first use: `slmkit.align.defaults` is read by `slm --help`, which must not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "chat": ("ChatTemplateError", "chat_template_of", "render_chat"),
    "lora": ("LoRAConfig", "LoRAError", "LoRALinear", "apply_lora", "load_adapter", "lora_state_dict", "merge_lora",
             "save_adapter", "trainable_parameters"),
    "preference_losses": ("PREFERENCE_LOSSES", "PreferenceConfig", "PreferenceLossError"),
    "verifiers": ("VERIFIERS", "VerifierError", "VerifierResult", "build_verifier"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
