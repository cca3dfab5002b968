"""Blockwise causal Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity").

Linformer projects the n keys and values of a sequence along the *sequence* axis to k rows with learned
matrices E, F (k x n), so every query scores k summaries instead of n tokens. As published it is
bidirectional: every summary mixes every position, so a decoder using it would see the future. This module
makes it causal by compressing in blocks:

    positions   | block 0 | block 1 | block 2 | block 3 | block 4 | block 5 (current, partial) |
    summaries   |  E K_0  |  E K_1  |  E K_2  |  E K_3  |  E K_4  |        -                   |
    query t in block 5, window W = 2:
        mean(E K_0, E K_1, E K_2)  +  E K_3, E K_4  +  raw keys of block 5 at positions <= t
        (k rows: the far past)        (W x k rows)     (exact causal attention inside the block)

- The sequence is cut into blocks of b = `linformer_block` positions. Each complete block's keys and values
  (after RoPE, so every key keeps its absolute position) are compressed by E, F in R^{k x b}
  (k = `linformer_k`, parameters `proj_k`, `proj_v`, shared by all blocks of a layer) into k summary rows.
- A query at position t in block j = t // b attends to (a) the summaries of the W = `linformer_window` blocks
  before its own, each as its k rows, (b) the blocks before those as one k-row running mean of their
  summaries, and (c) the raw keys/values of block j at positions <= t. Everything in (a) and (b) ends at or
  before the start of block j, so no position ever sees a later token.
- Cost: every query scores at most (W + 1) k + b keys, whatever its position: attention is linear in T, as
  in the paper, with a fixed-size summary of the far past. `linformer_window: null` keeps every earlier
  block as its own k rows (no running mean; per query cost then grows by k/b per token, O(T^2 k / b) in
  all: full attention with the past compressed by b/k). Checkpoints saved before the window existed load
  with null, so they compute exactly what they were trained with.
- With k == b, identity E, F and no running mean (window null, or T <= (W + 1) b) the summaries are the raw
  keys and this *is* full causal attention.
- "Linformer k larger than the sequence": in the paper k must not exceed the sequence length n that E
  projects from. Here E projects one block, so the equivalent condition is k <= `linformer_block`, which
  `ModelConfig.validate` enforces at config time (with k > 0). A sequence shorter than one block has no
  complete past block and simply gets exact causal attention.

Training and prefill of a fresh sequence (no cache, no padding mask) with a window take the batched path
(`windowed_attention`): every block after the first W + 1 sees the same number of rows, so all of them run as
one SDPA call with the blocks folded into the batch axis and one shared (b, K) mask.

With `linformer_recompute` training runs the layer as a scan over blocks instead (`_BlockScan`): the forward
pass computes q/k/v, attention and the output projection one block at a time and keeps only the layer's
input and the block summaries (k/b of the keys and values); the backward pass walks the blocks in reverse,
recomputing each block's forward and back-propagating through it, and carries the summaries' gradients to
the earlier blocks they came from. No T-sized activation inside the layer is stored: its training memory is
its input, output, their gradients and O(T k / b). This is the chunked form linear-attention kernels use; the
price is a second forward pass, block by block. benchmarks/linformer_vs_full.py (one layer, width 256, k=16,
b=128, W=4, T=4096, CPU): the batched path is 3.1-3.5x faster than flash SDPA with 1.4x its live memory; the
scan is 1.9-2.2x faster with 0.40x its live memory (0.22x its RSS growth); against attention that
materialises the T x T scores, 10.4x / 0.07x and 6.3x / 0.02x.

Otherwise (decoding, padding masks, no window) the layer runs one `scaled_dot_product_attention` call per
query block, over the keys [summaries ; raw keys of this block] with a small additive mask for the
lower-right causal triangle, a view of one (b x (max summaries + b)) mask shared by all blocks: no T x T mask
is ever built, and SDPA's fused kernels (flash on CPU, GQA via `enable_gqa`) apply.

Decoding with a `KVCache` stores raw keys/values as usual and keeps each layer's block summaries with the
cache (`KVCache.derived`): a step compresses only a block it has just completed, then attends as above, so
cached decoding gives the same logits as a full forward and, with a window, costs O((W + 1) k + b)
attention per token. With left-padded batches, padded key rows are zeroed before compression (they still
occupy summary slots, so a padded row matches its unpadded run only approximately once it spans a complete
block); the raw in-block part honours the padding mask exactly.

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


def mean_pooling_projection(k: int, b: int) -> torch.Tensor:
    """(k, b) matrix whose row r averages the positions of the r-th of k near-equal contiguous segments."""
    segment = torch.arange(b) * k // b  # which summary row each position feeds
    proj = (segment[None, :] == torch.arange(k)[:, None]).float()  # (k, b)
    return proj / proj.sum(dim=1, keepdim=True)


class LinformerAttention(Attention):
    """Attention with the same q/k/v/o projections as `Attention`, plus per-layer sequence projections
    `proj_k` (E) and `proj_v` (F), each (linformer_k, linformer_block)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.block, self.k_rows, self.window = config.linformer_block, config.linformer_k, config.linformer_window
        # Training as the block scan (_BlockScan) instead of autograd keeping every block's activations.
        self.recompute_blocks = config.linformer_recompute
        self.proj_k = nn.Parameter(mean_pooling_projection(self.k_rows, self.block))
        self.proj_v = nn.Parameter(mean_pooling_projection(self.k_rows, self.block))

    # -- shared pieces -------------------------------------------------------------------------------

    def compress(self, x: torch.Tensor, proj: torch.Tensor, n_blocks: int) -> torch.Tensor:
        # x: (B, n_kv, S, hd) -> summaries of the first n_blocks complete blocks: (B, n_kv, n_blocks, k, hd).
        # Keys and values come from the projections laid out (B, S, n_kv, hd): one (k, b) @ (b, n_kv hd) product
        # per block covers every head at once, without a transposed copy.
        B, H, S, hd = x.shape
        if S != n_blocks * self.block:  # (a whole-tensor x is used as is: no slice, no zero-filled gradient)
            x = x[:, :, :n_blocks * self.block]
        rows = x.transpose(1, 2).reshape(B * n_blocks, self.block, H * hd)
        sums = torch.bmm(proj.to(x.dtype).expand(B * n_blocks, *proj.shape), rows)  # (B n, k, H hd)
        return sums.view(B, n_blocks, proj.shape[0], H, hd).permute(0, 3, 1, 2, 4)

    def summaries(self, k: torch.Tensor, v: torch.Tensor, n_blocks: int, store: dict | None):
        """Key and value summaries of the first n_blocks blocks of k, v (B, n_kv, S, hd): (B, n_kv, n, k, hd)
        each. With `store`, the blocks summarised on earlier calls are reused and only new ones computed."""
        if store is None:
            return self.compress(k, self.proj_k, n_blocks), self.compress(v, self.proj_v, n_blocks)
        held = store.get(self.layer_idx)
        done = 0 if held is None else held[0].shape[2]
        if done < n_blocks:
            start = done * self.block
            new = (self.compress(k[:, :, start:], self.proj_k, n_blocks - done),
                   self.compress(v[:, :, start:], self.proj_v, n_blocks - done))
            held = new if held is None else tuple(torch.cat([h, n], dim=2) for h, n in zip(held, new))
            store[self.layer_idx] = held
        return held[0][:, :, :n_blocks], held[1][:, :, :n_blocks]

    def context_span(self, j: int) -> tuple[bool, int]:
        """For query block j: whether it sees the running mean of the far past, and the first block it sees
        as its own summary rows (blocks lo..j-1)."""
        if self.window is None or j <= self.window:
            return False, 0
        return True, j - self.window

    def context_rows(self, j: int) -> int:
        far, lo = self.context_span(j)
        return (int(far) + j - lo) * self.k_rows

    def far_mean(self, cum: torch.Tensor, j: int) -> torch.Tensor:
        """Running mean of the summaries of blocks 0..j-W-1 from their cumulative sum (B, H, n, k, hd)."""
        n = j - self.window
        return cum[:, :, n - 1] / n

    def shared_mask(self, n_rows: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[0 (summaries) | causal triangle (raw keys)] for up to n_rows summary rows: block j's mask is a
        view of its lower-right corner (`block_mask`), so no per-block mask is built or saved."""
        b = self.block
        shared = torch.zeros(b, n_rows + b, dtype=dtype, device=device)
        shared[:, n_rows:].masked_fill_(torch.ones(b, b, dtype=torch.bool, device=device).triu(1), float("-inf"))
        return shared

    def block_mask(self, shared: torch.Tensor, first_query: int, n_keys_raw: int, n_prev: int):
        # Queries first_query..n_keys_raw-1 of a block (lower-right causal) against n_prev summaries + raw keys.
        if n_keys_raw - first_query == 1:
            return None  # a single (last) query sees every key
        cols = shared.shape[1] - self.block - n_prev
        return shared[first_query:n_keys_raw, cols:cols + n_prev + n_keys_raw]

    def attend(self, q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
               mask: torch.Tensor | None) -> torch.Tensor:
        gqa = self.n_kv != self.n_heads
        k = torch.cat(k_parts, dim=2) if len(k_parts) > 1 else k_parts[0]
        v = torch.cat(v_parts, dim=2) if len(v_parts) > 1 else v_parts[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def context_parts(self, sums: torch.Tensor, cum: torch.Tensor | None, j: int) -> list[torch.Tensor]:
        # sums: (B, H, n, k, hd) block summaries -> the rows query block j sees before its raw keys.
        far, lo = self.context_span(j)
        B, H, _, k, hd = sums.shape
        parts = [self.far_mean(cum, j)] if far else []
        if j > lo:
            parts.append(sums[:, :, lo:j].reshape(B, H, (j - lo) * k, hd))
        return parts

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if (self.recompute_blocks and cache is None and mask is None and T > self.block
                and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            params = [p for p in self.parameters() if p.requires_grad]
            if x.requires_grad or params:
                return _BlockScan.apply(self, x, rope[0], rope[1], *params)
        q, k, v = self.project_qkv(x, rope)  # (B, n_heads, T, hd), (B, n_kv, T, hd) x 2
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd): all raw keys so far
            k, v = k.to(q.dtype), v.to(q.dtype)
        if past == 0 and mask is None and self.window is not None and T >= (self.window + 2) * self.block:
            return self.o_proj(self.windowed_attention(q, k, v))
        # Decoding keeps the summaries of completed blocks with the cache, so a step compresses only a block
        # it has just completed (not every block so far).
        store = cache.derived if cache is not None and not torch.is_grad_enabled() else None
        y = self.blockwise_attention(q, k, v, past, mask, store)  # (B, n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def windowed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """All blocks of a fresh sequence (no cache, no padding) with a window: q (B, n_heads, T, hd), k, v
        (B, n_kv, T, hd) -> (B, T, n_heads * hd). Blocks 0..W see fewer summaries and run one by one; every
        later complete block sees exactly k + W k summary rows + b raw keys, so all of them run as one SDPA
        call with the blocks folded into the batch axis and one shared (b, K) mask; a trailing partial block
        runs alone. Pieces are taken with split/unbind, never slicing, so backward concatenates gradients
        instead of zero-filling full-size ones per slice."""
        B, H, T, hd = q.shape
        b, W, kr, Hkv = self.block, self.window, self.k_rows, k.shape[1]
        n_full, tail = divmod(T, b)
        m, e = n_full - W - 1, (W + 1) * b  # m late complete blocks, starting at position e
        q_early, q_late, q_tail = q.split([e, m * b, tail], dim=2)
        shared = self.shared_mask((W + 1) * kr, q.dtype, q.device)  # (b, K): summaries 0 | causal triangle
        outs = []  # per piece: (B, L, H, hd)
        pieces = {}
        for name, x, proj in (("k", k, self.proj_k), ("v", v, self.proj_v)):
            full, x_tail = x.split([n_full * b, tail], dim=2)
            blocks = full.unflatten(2, (n_full, b))  # (B, Hkv, n_full, b, hd), a view
            sums = self.compress(full, proj, n_full)  # (B, Hkv, n_full, kr, hd); the last one unused
            cum = sums.cumsum(2)
            early, late = blocks.split([W + 1, m], dim=2)
            counts = torch.arange(1, m + 1, device=x.device, dtype=cum.dtype)[:, None, None]
            parts = [cum[:, :, :m] / counts] + [sums[:, :, 1 + w:1 + w + m] for w in range(W)] + [late]
            late_keys = torch.cat([p.transpose(1, 2) for p in parts], dim=3)  # (B, m, Hkv, K, hd)
            pieces[name] = (sums, cum, early.unbind(2), late_keys.flatten(0, 1), x_tail)
        (sk, ck, k_early, k_late, k_tail), (sv, cv, v_early, v_late, v_tail) = pieces["k"], pieces["v"]
        gqa = Hkv != H
        for j, qj in enumerate(q_early.split(b, dim=2)):  # blocks 0..W: j k summary rows each
            if j == 0:
                y = F.scaled_dot_product_attention(qj, k_early[0], v_early[0], is_causal=True, enable_gqa=gqa)
            else:
                y = self.attend(qj, [*self.context_parts(sk, ck, j), k_early[j]],
                                [*self.context_parts(sv, cv, j), v_early[j]],
                                self.block_mask(shared, 0, b, self.context_rows(j)))
            outs.append(y.transpose(1, 2))
        q_late = q_late.transpose(1, 2).unflatten(1, (m, b)).flatten(0, 1).transpose(1, 2)  # (B m, H, b, hd)
        y = F.scaled_dot_product_attention(q_late, k_late, v_late, attn_mask=shared, enable_gqa=gqa)
        outs.append(y.transpose(1, 2).unflatten(0, (B, m)).flatten(1, 2))  # (B, m b, H, hd)
        if tail:  # a partial last block n_full: far-past mean + window + its own raw keys
            n_prev = self.context_rows(n_full)
            y = self.attend(q_tail, [*self.context_parts(sk, ck, n_full), k_tail],
                            [*self.context_parts(sv, cv, n_full), v_tail], self.block_mask(shared, 0, tail, n_prev))
            outs.append(y.transpose(1, 2))
        return torch.cat(outs, dim=1).flatten(2)  # (B, T, H hd)

    def blockwise_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                            mask: torch.Tensor | None, store: dict | None = None) -> torch.Tensor:
        # q: (B, n_heads, T, hd) at positions [past, S); k, v: (B, n_kv, S, hd) at positions [0, S).
        # store: a KV cache's `derived` dict, holding this layer's summaries of the blocks compressed so far.
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
        sums_k, sums_v = self.summaries(k_src, v_src, n_sum, store)
        far = self.window is not None and n_sum > self.window
        cum_k, cum_v = (sums_k.cumsum(2), sums_v.cumsum(2)) if far else (None, None)
        if mask is None and T > 1:
            shared = self.shared_mask(self.context_rows(n_sum), q.dtype, q.device)
        outputs = []
        for i, j in enumerate(blocks):  # query blocks, in order
            start, end = j * b, min((j + 1) * b, S)  # this block's key positions [start, end)
            q0 = max(start, past)  # its queries are positions [q0, end), the last L of them
            n_prev = self.context_rows(j)
            if mask is not None:  # padding (and causality) from the caller's mask for the raw keys
                raw = mask[:, :, q0 - past:end - past, start:end]  # (B or 1, 1, L, end - start)
                mj = torch.cat([raw.new_ones(*raw.shape[:3], n_prev), raw], dim=-1)
            elif T == 1:
                mj = None
            else:
                mj = self.block_mask(shared, q0 - start, end - start, n_prev)
            k_parts = [*self.context_parts(sums_k, cum_k, j), k_raw[i]]
            v_parts = [*self.context_parts(sums_v, cum_v, j), v_raw[i]]
            outputs.append(self.attend(q_blocks[i], k_parts, v_parts, mj))
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, n_heads, T, hd)

    def scan_block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared: torch.Tensor,
                   k_context: list[torch.Tensor], v_context: list[torch.Tensor], n_prev: int, summarise: bool):
        """One block of the training scan: x (B, L, d) at this block's positions -> (output (B, L, d),
        key summary, value summary (B, n_kv, k, hd) or None when the block is not summarised)."""
        B, L, _ = x.shape
        q, k, v = self.project_qkv(x, (cos, sin))
        if not n_prev:  # block 0: causal attention over its own keys
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = self.attend(q, [*k_context, k], [*v_context, v], self.block_mask(shared, 0, L, n_prev))
        y = self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
        if not summarise:
            return y, None, None
        return y, torch.matmul(self.proj_k.to(k.dtype), k), torch.matmul(self.proj_v.to(v.dtype), v)


class _BlockScan(torch.autograd.Function):
    """The Linformer layer as a scan over blocks, recomputed block by block in backward (module docstring).

    forward keeps x, the rotary tables and the block summaries (B, n_kv, n, k, hd); backward visits blocks
    last to first, so when it reaches block i every later block has added its gradient with respect to
    block i's summaries: directly for the W blocks that see them as rows, and through a running sum for
    the blocks that see them inside the far-past mean."""

    @staticmethod
    def forward(ctx, layer: LinformerAttention, x, cos, sin, *params):
        B, T, _ = x.shape
        b, W = layer.block, layer.window
        n_blocks, n_sum = -(-T // b), (T - 1) // b
        device_type = x.device.type
        autocast_on, autocast_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        shared = layer.shared_mask(layer.context_rows(n_sum), autocast_dtype if autocast_on else x.dtype, x.device)
        sums_k = sums_v = cum_k = cum_v = y = None
        for j in range(n_blocks):
            s, e = j * b, min((j + 1) * b, T)
            kc = vc = []
            if j:
                kc = layer.context_parts(sums_k, cum_k, j)
                vc = layer.context_parts(sums_v, cum_v, j)
            yb, sk, sv = layer.scan_block(x[:, s:e], cos[:, :, s:e], sin[:, :, s:e], shared, kc, vc,
                                          layer.context_rows(j), j < n_sum)
            if y is None:
                y = yb.new_empty(B, T, yb.shape[-1])
            y[:, s:e] = yb
            if sk is not None:
                if sums_k is None:
                    sums_k = sk.new_empty(*sk.shape[:2], n_sum, *sk.shape[2:])
                    sums_v = sv.new_empty(sums_k.shape)
                    if W is not None and n_sum > W:
                        cum_k, cum_v = torch.empty_like(sums_k), torch.empty_like(sums_v)
                sums_k[:, :, j], sums_v[:, :, j] = sk, sv
                if cum_k is not None:
                    cum_k[:, :, j] = sk if j == 0 else cum_k[:, :, j - 1] + sk
                    cum_v[:, :, j] = sv if j == 0 else cum_v[:, :, j - 1] + sv
        ctx.layer = layer
        ctx.autocast = (device_type, autocast_on, autocast_dtype)
        ctx.save_for_backward(x, cos, sin, sums_k, sums_v, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        layer: LinformerAttention = ctx.layer
        x, cos, sin, sums_k, sums_v, *params = ctx.saved_tensors
        device_type, autocast_on, autocast_dtype = ctx.autocast
        T, b, W = x.shape[1], layer.block, layer.window
        n_blocks, n_sum = -(-T // b), (T - 1) // b
        sums = (sums_k, sums_v)
        cums = tuple(t.cumsum(2) for t in sums) if W is not None and n_sum > W else (None, None)
        # fp32 gradients of block summaries, per side (keys, values), held only for the blocks still ahead
        # of the scan that later blocks have seen (at most W + 1 at a time): `g_sums[j]` for block j, and
        # `pend[m]` the far-past means' share for blocks 0..m, handed down through the running sum `run`.
        g_sums: tuple[dict, dict] = ({}, {})
        pend: tuple[dict, dict] = ({}, {})
        run: list[torch.Tensor | None] = [None, None]
        need_x = ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_x else None
        dparams: list[torch.Tensor | None] = [None] * len(params)
        shared = layer.shared_mask(layer.context_rows(n_sum), autocast_dtype if autocast_on else x.dtype, x.device)
        for i in reversed(range(n_blocks)):
            s, e = i * b, min((i + 1) * b, T)
            summarise = i < n_sum
            far, lo = layer.context_span(i)
            if summarise and cums[0] is not None:
                for side in (0, 1):
                    share = pend[side].pop(i, None)
                    if share is not None:
                        run[side] = share if run[side] is None else run[side] + share
                    if run[side] is not None:
                        _accumulate(g_sums[side], i, run[side])
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                xb = x[:, s:e].detach().requires_grad_(need_x)
                # The rows this block sees from earlier blocks, as leaves: [far-past mean], [window summaries].
                leaves = [([layer.far_mean(c, i).detach().requires_grad_()] if far else [])
                          + ([t[:, :, lo:i].detach().requires_grad_()] if i > lo else []) for t, c in zip(sums, cums)]
                context = [[leaf.flatten(2, 3) if leaf.dim() == 5 else leaf for leaf in ls] for ls in leaves]
                yb, sk, sv = layer.scan_block(xb, cos[:, :, s:e], sin[:, :, s:e], shared, *context,
                                              layer.context_rows(i), summarise)
                outs, grads = [yb], [gy[:, s:e]]
                if summarise:
                    outs += [sk, sv]
                    grads += [g_sums[side].pop(i, torch.zeros_like(t)).to(t.dtype) for side, t in enumerate((sk, sv))]
                inputs = ([xb] if need_x else []) + leaves[0] + leaves[1] + params
                got = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
            if need_x:
                dx[:, s:e] = got.pop(0)
            for ls, g_sum, pd in zip(leaves, g_sums, pend):
                for leaf in ls:
                    g = got.pop(0)
                    if g is None:
                        continue
                    if leaf.dim() == 5:  # the window: summaries of blocks lo..i-1
                        for j in range(lo, i):
                            _accumulate(g_sum, j, g[:, :, j - lo])
                    else:  # the mean of blocks 0..n-1 (n = i - W): 1/n of its gradient to each
                        _accumulate(pd, i - W - 1, g / (i - W))
            for n, g in enumerate(got):
                if g is not None:
                    dparams[n] = g.float() if dparams[n] is None else dparams[n].add_(g)
        return (None, dx, None, None,
                *(None if g is None else g.to(p.dtype) for g, p in zip(dparams, params)))


def _accumulate(grads: dict, index: int, g: torch.Tensor) -> None:
    """grads[index] += g, in fp32, creating the entry on first use."""
    held = grads.get(index)
    grads[index] = g.float().clone() if held is None else held.add_(g)
