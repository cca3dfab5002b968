"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, total_steps: int, cfg: TrainConfig, anchor: tuple[int, float] | None = None) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at total_steps.

    `anchor = (step0, lr0)` is set when a resumed run changes its total: from step0 on, the rate decays by
    the same cosine from lr0 (the rate step0 had under the old total) to the floor at the new total. A
    plain recompute would jump the rate (up when extending, down when shortening) at the resume point;
    this keeps it continuous and still ends exactly at the floor.
    """
    if anchor is not None and step >= anchor[0]:
        step0, lr0 = anchor
        floor = cfg.lr * cfg.min_lr_ratio
        progress = (step - step0) / max(1, total_steps - step0)
        return floor + (lr0 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def in_warmup(step: int, total_steps: int, cfg: TrainConfig) -> bool:
    return step < min(cfg.warmup_steps, max(total_steps - 1, 0))
