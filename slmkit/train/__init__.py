"""The training loop, step functions, optimizer/schedule and resumable training state."""

from .batches import LMBatches
from .config import TrainConfig, TrainConfigError
from .loop import Trainer, TrainResult
from .steps import STEP_FUNCTIONS, lm_step

__all__ = ["LMBatches", "STEP_FUNCTIONS", "TrainConfig", "TrainConfigError", "TrainResult", "Trainer", "lm_step"]
