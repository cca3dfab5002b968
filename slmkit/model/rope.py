"""Rotary position embeddings (Su et al., 2021, "RoFormer") with Llama-3 frequency scaling.

The rotation uses the "rotate half" layout of Hugging Face's Llama (the first and second halves of a
head are the two coordinates of each rotated pair), so weights move between the two without permuting.
Llama-3 scaling (Meta, 2024) leaves high frequencies alone, divides low frequencies by `factor`, and
interpolates smoothly between `low_freq_factor` and `high_freq_factor` wavelengths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq  # (head_dim // 2,)


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; applied per layer by `apply_rotary`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._table: tuple | None = None  # (inv_freq it came from, fp32 (L, head_dim) cos, signed sin)

    @torch.no_grad()
    def for_range(self, start: int, length: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for positions start..start+length-1 in every row, read from a cached table (grown by
        doubling, bit-identical to `forward`): one slice per decode step instead of ~10 small ops."""
        end = start + length
        t = self._table
        if t is None or t[0] is not self.inv_freq or t[1].shape[0] < end:  # `.to()` replaces inv_freq
            size = max(end, 2 * t[1].shape[0] if t is not None else 256)
            pos = torch.arange(size, device=self.inv_freq.device)[None]  # (1, size)
            cos, sin = self.forward(pos, torch.float32)  # (1, 1, size, hd)
            t = self._table = (self.inv_freq, cos[0, 0], sin[0, 0])
        cos, sin = t[1][start:end], t[2][start:end]  # (length, hd)
        return cos.to(dtype).expand(batch, 1, length, -1), sin.to(dtype).expand(batch, 1, length, -1)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim), computed in fp32 then cast.
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, head_dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: fold the sign into the table once.
        cos = torch.cat((cos, cos), dim=-1)[:, None].to(dtype)  # (B, 1, T, head_dim)
        sin = torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x: (B, n_heads, T, head_dim); sin_signed from RotaryEmbedding (first half negated).
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
