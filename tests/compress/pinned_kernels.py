"""Exact comparisons of quantized models on decode-sized inputs: `kernel_choice="auto"` times the packed and the
dense kernel per model, so two models can pick differently on a loaded machine (different rounding). Pin both."""

from __future__ import annotations

from collections.abc import Iterator

from slmkit.compress.qlinear import Int4Linear, Int8Linear


def each_kernel_choice(*models) -> Iterator[str]:
    """Yield "packed" then "dense", with every quantized linear layer of `models` pinned to it; auto after."""
    layers = [m for model in models for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    try:
        for choice in ("packed", "dense"):
            for layer in layers:
                layer.kernel_choice = choice
            yield choice
    finally:
        for layer in layers:
            layer.kernel_choice = "auto"
