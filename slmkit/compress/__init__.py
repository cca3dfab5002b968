"""Compression passes (pruning, low-rank factorization, quantization), calibration and the driver behind
`slm compress`. Each pass registers itself by name; see `slmkit.compress.base` for the contract."""

from .base import PASSES, Calibration, PassError, calibration_from_dataset, get_pass, register_pass

__all__ = ["PASSES", "Calibration", "PassError", "calibration_from_dataset", "get_pass", "register_pass"]
