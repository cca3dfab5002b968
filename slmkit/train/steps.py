"""Step functions: what one forward/backward unit of training computes. The loop is shared; a new kind of
training (KD, SFT, DPO) is a new step function and a new batch source, nothing else."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .chunked_losses import chunked_cross_entropy, chunked_losses_enabled, output_head


class StepFn(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...


def lm_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy. Returns (loss, metrics).

    When the model can return its final hidden states and has a plain head (see `chunked_losses.output_head`),
    the loss is fused with the head and computed in chunks of positions, never holding the (B, T, V) logits;
    same value and gradients. `SLMKIT_CHUNKED_LOSS=0` keeps the plain path."""
    head = output_head(model) if chunked_losses_enabled() else None
    if head is not None:
        hidden = model(batch["input_ids"], return_final_hidden=True)  # (B, T, d)
        loss = chunked_cross_entropy(hidden, head, batch["labels"])
    else:
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
