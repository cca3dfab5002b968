"""The slmkit decoder: a Llama-family causal language model.

Features: RMSNorm pre-normalisation, rotary positions with optional Llama-3 scaling, grouped-query
attention through `scaled_dot_product_attention`, SwiGLU MLP, optional tied input/output embeddings,
a preallocated KV cache for decoding, and left-padded batches via an attention mask.

Module names match Hugging Face's `LlamaForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `lm_head`), so state dicts move between the two by name and compression passes can find every
projection as its own `nn.Linear`. Architecture variants plug in through `build_attention` / `build_mlp`.

Papers: Touvron et al., 2023 (Llama); Meta, 2024 (Llama 3); Su et al., 2021 (RoPE); Ainslie et al., 2023
(GQA); Shazeer, 2020 (SwiGLU); Zhang & Sennrich, 2019 (RMSNorm).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention
from .cache import KVCache
from .config import ModelConfig
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .xl_memory import XLMemory


def build_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.attention_type == "linformer":
        from .linformer import LinformerAttention

        return LinformerAttention(config, layer_idx)
    return Attention(config, layer_idx)


def build_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.num_local_experts > 0:
        from .moe import SparseMoE

        return SparseMoE(config)
    return SwiGLU(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_mlp(config, layer_idx)

    def forward(self, x, rope, mask, cache=None, memory=None):
        mem = {} if memory is None else {"memory": memory}  # only full attention accepts memory
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, **mem)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, layers and final norm (HF's `LlamaModel`, under the name `model`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:  # a meta-device model is about to receive stored weights
            self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(self._init_weights)
        # Scale residual-branch outputs by depth (GPT-2) so deep stacks start stable.
        std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.initializer_range)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # a quantized head shares its table
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, return_hidden_states: bool = False, memory: XLMemory | None = None,
                document_ids: torch.Tensor | None = None, return_final_hidden: bool = False):
        """input_ids: (B, T). attention_mask: (B, S) with 1 for real tokens over all S = past + T key
        positions (only needed for padded batches). Returns logits (B, T, V) — (B, 1, V) with
        `last_only` — and, with `return_hidden_states`, the list of per-layer inputs plus the final
        normalised hidden state. `memory` (an XLMemory, see xl_memory.py) makes the segment attend to the
        cached positions of earlier segments and then keeps its last positions for the next one.
        `document_ids` (B, T) marks packed rows: a position attends only to earlier positions with the same
        id (pass `position_ids` restarting at each document too, and a packed row computes exactly what each
        document alone would). `return_final_hidden` returns the final normalised hidden state (B, T, d) in
        place of the logits, without applying `lm_head`, for losses that fuse the output projection with the
        loss (train/chunked_losses.py) and never hold the (B, T, V) logits."""
        B, T = input_ids.shape
        if document_ids is not None:
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(B, T)}")
            if cache is not None or memory is not None or attention_mask is not None:
                raise ValueError("document_ids is for packed training rows: not with a cache, memory or attention_mask")
            if self.config.attention_type != "full":
                raise ValueError(f"document masking needs attention_type='full', not {self.config.attention_type!r}")
        past = cache.length if cache is not None else 0
        if memory is not None:
            position_ids = memory.begin_segment(input_ids, position_ids=position_ids, cache=cache,
                                                attention_mask=attention_mask, rotary=self.model.rotary_emb)
            past = memory.length
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if position_ids is None and cache is not None:  # decoding: positions past.. from the cached table
            rope = self.model.rotary_emb.for_range(past, T, B, dtype)
        else:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            rope = self.model.rotary_emb(position_ids, dtype)
        mask = causal_mask(T, past, attention_mask, input_ids.device, document_ids)
        hidden = []
        for layer in self.model.layers:
            if return_hidden_states:
                hidden.append(x)
            x = layer(x, rope, mask, cache, memory)
        if cache is not None:
            cache.advance(T)
        if memory is not None:
            memory.end_segment(T)
        x = self.model.norm(x)
        if return_hidden_states:
            hidden.append(x)
        if last_only:
            x = x[:, -1:]
        logits = x if return_final_hidden else self.lm_head(x)  # (B, T, d) or (B, T, V)
        return (logits, hidden) if return_hidden_states else logits

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses modules recorded in the last forward (e.g. MoE load balancing), already
        weighted by their coefficients; None when there are none. Training adds it to the task loss."""
        losses = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    # -- bookkeeping ------------------------------------------------------------------------------

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                continue
            total += p.numel()
        return total

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.model.norm.weight  # always a plain float parameter, whatever compression did to the rest
        return KVCache(self.config, batch_size, max_length, p.device, dtype or p.dtype)

    def new_memory(self, batch_size: int, length: int | None = None) -> XLMemory:
        """An empty Transformer-XL memory of `length` (default `config.memory_length`) positions."""
        return XLMemory(self.config, batch_size, length)


def causal_mask(T: int, past: int, attention_mask: torch.Tensor | None, device: torch.device,
                document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean attention mask (B or 1, 1, T, past + T), or None when plain causal attention applies
    (no padding, and either no past or a single query token). With `document_ids` (B, T), no past: causal
    within each document, (B, 1, T, T)."""
    if document_ids is not None:
        pos = torch.arange(T, device=device)
        same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        return (same & (pos[None, :] <= pos[:, None])[None])[:, None]
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    key_pos = torch.arange(S, device=device)
    query_pos = torch.arange(past, S, device=device)
    allowed = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past+T={S}")
        allowed = allowed[None] & attention_mask[:, None, :].bool()  # (B, T, S)
        # A padded query position attends to itself so its softmax row is never empty (no NaN).
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None]
        return allowed[:, None]  # (B, 1, T, S)
    return allowed[None, None]  # (1, 1, T, S)
