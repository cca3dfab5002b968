"""Causal self-attention with grouped-query heads (Ainslie et al., 2023, "GQA"), rotary positions and
PyTorch's `scaled_dot_product_attention` (fused flash/memory-efficient kernels where available)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.attention_bias)

    def project_qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Queries, keys and values of `x` (B, T, d) with rotary positions applied to q and k."""
        B, T, _ = x.shape
        fused = self.__dict__.get("fused_qkv")  # set by slmkit.compress.fuse for quantized inference
        qkv = fused(x) if fused is not None else None
        if qkv is not None:
            q, k, v = qkv.split((self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim), dim=-1)
        else:
            if fused is not None:  # its sources were replaced since: compute unfused from now on
                del self.__dict__["fused_qkv"]
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, memory=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if memory is not None:  # Transformer-XL segment memory (xl_memory.py): prepend cached positions
            k, v = memory.attend(self.layer_idx, k, v)  # (B, n_kv, m + T, hd)
        # mask=None means plain causal attention over T == S (training / first prefill).
        causal = mask is None and q.shape[2] > 1
        # GQA: SDPA broadcasts each key/value head over its group of query heads without copying.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, n_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)
