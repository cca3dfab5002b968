"""Knowledge distillation: KD losses, the KD step function, the teacher logit cache, on-policy sampling,
hidden-state matching, student initialisation and sequence-level KD."""

from .kd_losses import DIVERGENCES, KDError, kd_loss
from .steps import KDConfig, KDStep

__all__ = ["DIVERGENCES", "KDConfig", "KDError", "KDStep", "kd_loss"]
