"""Key/value cache for incremental decoding.

Preallocated per layer, shape (B, num_key_value_heads, max_length, head_dim), so a decode step writes
one slot instead of concatenating tensors. All rows share one length; batches of prompts with different
lengths are left-padded and masked (see `slmkit.serve.generate`).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored (same for every layer once a forward pass completes)
        # Per-layer state derived from the stored columns (e.g. Linformer block summaries), keyed by layer:
        # tuples of (B, ...) tensors; rows follow select_rows, and drop_columns discards it.
        self.derived: dict[int, tuple[torch.Tensor, ...]] = {}

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, T, head_dim) for the new tokens; returns all keys/values so far.
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} tokens > max_length {self.max_length}")
        self.keys[layer][:, :, start:end] = k.to(self.keys[layer].dtype)
        self.values[layer][:, :, start:end] = v.to(self.values[layer].dtype)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.derived = {layer: tuple(t[rows] for t in state) for layer, state in self.derived.items()}

    def drop_columns(self, n: int) -> None:
        """Drop the first n stored columns (padding no row needs any more); derived state is discarded,
        since it was computed on the old column positions."""
        self.keys = [k[:, :, n:] for k in self.keys]
        self.values = [v[:, :, n:] for v in self.values]
        self.length, self.max_length = self.length - n, self.max_length - n
        self.derived = {}
