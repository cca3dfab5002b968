"""Blockwise causal Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity").

Linformer projects the n keys and values of a sequence along the *sequence* axis to k rows with learned
matrices E, F (k x n), so every query scores k summaries instead of n tokens. As published it is
bidirectional: every summary mixes every position, so a decoder using it would see the future. This module
makes it causal by compressing in blocks:

    positions        | block 0 | block 1 | block 2 | block 3 (current, partial) |
    summaries        |  E K_0  |  E K_1  |  E K_2  |          -                 |   k rows per complete block
    query t in block 3 attends to:  summaries of blocks 0..2  +  raw keys of block 3 at positions <= t

- The sequence is cut into blocks of b = `linformer_block` positions. Each block's keys and values
  (after RoPE, so every key keeps its absolute position) are compressed by E, F in R^{k x b}
  (k = `linformer_k`, parameters `proj_k`, `proj_v`, shared by all blocks of a layer) into k summary rows.
- A query at position t in block j = t // b attends to (a) the summaries of blocks 0..j-1 (each ends at or
  before the start of block j, so it holds only the past) and (b) the raw keys/values of block j at
  positions <= t (exact causal attention inside the block). No position ever sees a later token.
- Cost: T queries x (t/b * k + b) keys, i.e. O(T * (T k / b + b)) instead of O(T^2) — full attention
  with its far past compressed by b/k. (Per query it still grows with t, by k/b per token; the constant
  b/k, not the exponent, is what buys speed. A fixed-size summary of the whole past would be truly linear
  but would need recurrence, not a projection.)
- With k == b and identity E, F the summaries are the raw keys and this *is* full causal attention.
- "Linformer k larger than the sequence": in the paper k must not exceed the sequence length n that E
  projects from. Here E projects one block, so the equivalent condition is k <= `linformer_block`, which
  `ModelConfig.validate` enforces at config time (with k > 0). A sequence shorter than one block has no
  complete past block and simply gets exact causal attention.

Computation: one `scaled_dot_product_attention` call per query block, over the keys
[summaries of earlier blocks ; raw keys of this block] with a small additive mask (L x (j k + L)) for the
lower-right causal triangle, a view of one (b x (n k + b)) mask shared by all blocks: no T x T mask is ever
built, and SDPA's fused kernels (flash on CPU, GQA via `enable_gqa`) apply. Summed over blocks those
concatenated keys hold O(T^2 k / b) rows; in training SDPA would keep them all for backward, so a saved-tensor
hook stores the pieces instead (views of tensors alive anyway) and concatenates them again in backward — a
copy, not a second attention forward. Training memory is then of the order of fused full attention's (which is
itself O(T) on CPU: flash SDPA never holds the scores), not below it: benchmarks/linformer_vs_full.py measures
0.9-1.8x the peak of flash SDPA at T = 1024..8192, and about 1/9 of attention that materialises the T x T
scores at T = 4096. Decoding with a `KVCache` stores raw keys/values as usual; each step recomputes the
summaries of the completed blocks from the cache (O(S k) per layer and step) and attends as above, so
cached decoding gives the same logits as a full forward. With left-padded batches, padded key rows are
zeroed before compression (they still occupy summary slots, so a padded row matches its unpadded run only
approximately once it spans a complete block); the raw in-block part honours the padding mask exactly.

E and F start as mean pooling over k contiguous segments of the block, so a fresh model's summaries are
local averages of keys and values (a sensible start; the paper's fixed-projection ablations show simple
projections work nearly as well as learned ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .cache import KVCache
from .config import ModelConfig
from .rope import apply_rotary


def mean_pooling_projection(k: int, b: int) -> torch.Tensor:
    """(k, b) matrix whose row r averages the positions of the r-th of k near-equal contiguous segments."""
    segment = torch.arange(b) * k // b  # which summary row each position feeds
    proj = (segment[None, :] == torch.arange(k)[:, None]).float()  # (k, b)
    return proj / proj.sum(dim=1, keepdim=True)


class LinformerAttention(Attention):
    """Attention with the same q/k/v/o projections as `Attention`, plus per-layer sequence projections
    `proj_k` (E) and `proj_v` (F), each (linformer_k, linformer_block)."""

    recompute_blocks = True  # training: re-concatenate per-block keys in backward instead of saving them

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.block, self.k_rows = config.linformer_block, config.linformer_k
        self.proj_k = nn.Parameter(mean_pooling_projection(self.k_rows, self.block))
        self.proj_v = nn.Parameter(mean_pooling_projection(self.k_rows, self.block))

    def compress(self, x: torch.Tensor, proj: torch.Tensor, n_blocks: int) -> torch.Tensor:
        # x: (B, n_kv, S, hd) -> summaries of the first n_blocks complete blocks: (B, n_kv, n_blocks * k, hd)
        B, H, _, hd = x.shape
        blocks = x[:, :, :n_blocks * self.block].reshape(B, H, n_blocks, self.block, hd)
        summaries = torch.matmul(proj.to(x.dtype), blocks)  # (k, b) @ (B, H, n, b, hd) -> (B, H, n, k, hd)
        return summaries.reshape(B, H, n_blocks * self.k_rows, hd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)  # (B, n_heads, T, hd), (B, n_kv, T, hd) x 2
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd): all raw keys so far
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = self.blockwise_attention(q, k, v, past, mask)  # (B, n_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)

    def blockwise_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                            mask: torch.Tensor | None) -> torch.Tensor:
        # q: (B, n_heads, T, hd) at positions [past, S); k, v: (B, n_kv, S, hd) at positions [0, S).
        T, S, b = q.shape[2], k.shape[2], self.block
        n_sum = (S - 1) // b  # summarise every block before the last query's block
        k_src, v_src = k, v
        if mask is not None and n_sum > 0:
            # The last query (a real token under left padding) sees exactly the non-padded keys.
            valid = mask[:, 0, -1, :n_sum * b, None].to(k.dtype)[:, None]  # (B or 1, 1, n_sum * b, 1)
            k_src, v_src = k[:, :, :n_sum * b] * valid, v[:, :, :n_sum * b] * valid
        # Split once into per-block pieces: slicing the full tensors inside the loop would make every
        # slice's backward allocate and add a full-length gradient, quadratic in T.
        first = past // b  # the block of the first query
        blocks = range(first, n_sum + 1)
        q_blocks = q.split([min((j + 1) * b, S) - max(j * b, past) for j in blocks], dim=2)
        raw_sizes = [min((j + 1) * b, S) - j * b for j in blocks]
        k_raw, v_raw = k[:, :, first * b:].split(raw_sizes, dim=2), v[:, :, first * b:].split(raw_sizes, dim=2)
        k_sums = self.compress(k_src, self.proj_k, n_sum).split(self.k_rows, dim=2)  # n_sum x (B, n_kv, k, hd)
        v_sums = self.compress(v_src, self.proj_v, n_sum).split(self.k_rows, dim=2)
        # Training: rebuild each block's concatenated keys in backward instead of keeping them (see _attend).
        recompute = self.recompute_blocks and torch.is_grad_enabled() and q.requires_grad
        if mask is None and T > 1:
            # One additive mask for all blocks, [0 (summaries) | causal triangle (raw keys)]: block j's mask is
            # a view of its lower-right corner, so no per-block mask is built, converted or saved for backward.
            width = n_sum * self.k_rows + b
            shared = torch.zeros(b, width, dtype=q.dtype, device=q.device)
            shared[:, width - b:].masked_fill_(torch.ones(b, b, dtype=torch.bool, device=q.device).triu(1),
                                               float("-inf"))
        outputs = []
        for i, j in enumerate(blocks):  # query blocks, in order
            start, end = j * b, min((j + 1) * b, S)  # this block's key positions [start, end)
            q0 = max(start, past)  # its queries are positions [q0, end), the last L of them
            L, n_prev = end - q0, j * self.k_rows
            if mask is not None:  # padding (and causality) from the caller's mask for the raw keys
                raw = mask[:, :, q0 - past:end - past, start:end]  # (B or 1, 1, L, end - start)
                mj = torch.cat([raw.new_ones(*raw.shape[:3], n_prev), raw], dim=-1)
            elif L == 1:
                mj = None  # a single (last) query sees every key
            else:  # lower-right causal: query i sees all summaries and raw keys up to its own position
                cols = width - b - n_prev
                mj = shared[q0 - start:end - start, cols:cols + n_prev + end - start]  # (L, n_prev + raw)
            k_parts, v_parts = [*k_sums[:j], k_raw[i]], [*v_sums[:j], v_raw[i]]
            outputs.append(self._attend(q_blocks[i], k_parts, v_parts, mj, recompute))
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, n_heads, T, hd)

    def _attend(self, q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                mask: torch.Tensor | None, recompute: bool) -> torch.Tensor:
        # One query block: keys = [summaries of blocks 0..j-1 ; raw keys of block j], concatenated.
        gqa = self.n_kv != self.n_heads
        if len(k_parts) == 1:  # block 0: raw keys only, no copy
            return F.scaled_dot_product_attention(q, k_parts[0], v_parts[0], attn_mask=mask, enable_gqa=gqa)
        k, v = torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2)  # (B, n_kv, j k + raw, hd)
        if not recompute:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        # Summed over blocks the concatenations hold O(T^2 k / b) rows, far more than the raw keys. SDPA
        # saves k and v for its backward; store instead the parts (views of tensors alive anyway) and
        # concatenate them again when backward unpacks — a copy, not a second attention forward.
        recipes = {id(k): k_parts, id(v): v_parts}

        def pack(t: torch.Tensor):
            for full in (k, v):
                if t.data_ptr() == full.data_ptr() and t.shape == full.shape and t.stride() == full.stride():
                    return [p.detach() for p in recipes[id(full)]]
            return t

        def unpack(saved):
            return torch.cat(saved, dim=2) if isinstance(saved, list) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
