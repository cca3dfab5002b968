"""Step functions: what one forward/backward unit of training computes. The loop is shared; a new kind of
training (KD, SFT, DPO) is a new step function and a new batch source, nothing else."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class StepFn(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...


def lm_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy. Returns (loss, metrics)."""
    logits = model(batch["input_ids"])  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    metrics = {"loss": loss.detach()}
    aux = auxiliary_loss(model)
    if aux is not None:  # e.g. MoE load balancing; logged apart so "loss" stays the language-model loss
        metrics["aux_loss"] = aux.detach()
        loss = loss + aux
    return loss, metrics


def auxiliary_loss(model: torch.nn.Module) -> torch.Tensor | None:
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    fn = getattr(inner, "auxiliary_loss", None)
    return fn() if fn is not None else None


STEP_FUNCTIONS: dict[str, Callable] = {"lm": lm_step}
