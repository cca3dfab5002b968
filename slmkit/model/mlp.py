"""SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        d, f = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("fused_gate_up")  # set by slmkit.compress.fuse for quantized inference
        gate_up = fused(x) if fused is not None else None
        if gate_up is None:
            if fused is not None:  # its sources were replaced since: compute unfused from now on
                del self.__dict__["fused_gate_up"]
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
