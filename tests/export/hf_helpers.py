"""Helpers shared by the Hugging Face parity tests."""

import torch
import transformers


@torch.no_grad()
def hf_logits(path_or_model, ids: torch.Tensor) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    return model.eval()(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
