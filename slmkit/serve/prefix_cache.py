"""Prompt-prefix reuse: the keys and values of prompt prefixes that were prefilled before, kept in whole blocks.

Requests often share a prefix (a system prompt, few-shot examples, an evaluation harness's shared context).
After a prompt is prefilled, the engine stores the per-layer K/V of each complete block of `block_size`
prompt tokens; when a new prompt arrives it looks up its longest cached run of leading blocks, copies those
rows into its cache and prefills only the rest. This is the scheme of vLLM's automatic prefix caching
(Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention"),
with copies into the engine's contiguous cache instead of shared pages.

Keys: block j's key is a hash of (block j-1's key, the token ids of block j), so one key names the whole
prefix up to and including its block: two prompts share a key only if they agree on every token before it.
The hash is blake2b over the token bytes (128 bits), so a collision, which would silently reuse another
prompt's rows, is not a practical concern (Python's `hash` of a tuple would be 64 bits and unkeyed).

Why the copied rows are exact: with full causal attention the key and value of position t at layer l are a
function of tokens 0..t alone (and of t, through RoPE, which the cache stores already applied). A block
cached from any earlier prompt with the same leading tokens therefore holds the rows this prompt would
compute, up to the float rounding of a different batch shape, which is the same difference chunked prefill
already has. Caches whose rows also depend on where they sit or on other state (Linformer's block summaries,
Transformer-XL memory) are not plain KV caches and bypass this store (`unsupported_reason`).

Eviction: least recently used, by bytes, against a budget. A lookup or an insert touches a prompt's blocks
from the last to the first, so a block is always more recent than every block that extends it; the LRU end
thus evicts the deepest blocks of the coldest prefixes first and never strands a block behind an evicted
parent (an unreachable block could never be hit again).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

__all__ = ["PrefixCache", "block_keys", "unsupported_reason"]


def block_keys(ids: list[int], block_size: int, n_blocks: int) -> list[bytes]:
    """The chained keys of the first `n_blocks` complete blocks of `ids`."""
    keys, parent = [], b""
    for j in range(n_blocks):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", ids[j * block_size:(j + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


def unsupported_reason(model) -> str | None:
    """Why `model`'s cache rows cannot be reused across prompts, or None when they can (a plain KV cache
    under full causal attention)."""
    from ..model.attention import Attention
    from ..model.cache import KVCache

    cfg = model.config
    if cfg.attention_type != "full":
        return (f"attention_type={cfg.attention_type!r}: its cache keeps per-block summaries tied to cache "
                "columns, not only plain keys and values")
    if getattr(cfg, "memory_length", 0):
        return (f"memory_length={cfg.memory_length}: a Transformer-XL memory model's keys are not a function of "
                "the prompt prefix alone")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return f"{type(model).__name__} has no decoder layers to check"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if type(attn) is not Attention:
            return f"layer {i} attends with {type(attn).__name__}, not the plain KV-cache attention"
    probe = model.new_cache(1, 1)
    if type(probe) is not KVCache:
        return f"its cache is a {type(probe).__name__}, not a plain KVCache"
    return None


class PrefixCache:
    """Blocks of prompt K/V keyed by their prefix hash, least recently used first out, within `budget_bytes`.

    A block is one tensor (2, num_layers, num_kv_heads, block_size, head_dim): keys then values, on the
    engine's device, in its cache dtype. Used by the engine's scheduler thread only; the counters may be
    read from any thread."""

    def __init__(self, block_size: int, budget_bytes: int):
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1, got {block_size}")
        self.block_size, self.budget_bytes = block_size, budget_bytes
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.lookups = 0  # prompts looked up
        self.hits = 0  # prompts that reused at least one block
        self.tokens_reused = 0  # prompt tokens whose prefill was skipped
        self.evictions = 0  # blocks evicted for room

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, ids: list[int]) -> list[torch.Tensor]:
        """The cached leading blocks of `ids`, longest run first to last. At least one token of `ids` is left
        outside them, so the prompt's last position is always computed (its logits pick the first token)."""
        n = (len(ids) - 1) // self.block_size
        found = []
        if n > 0 and self._blocks:
            for key in block_keys(ids, self.block_size, n):
                block = self._blocks.get(key)
                if block is None:
                    break
                found.append((key, block))
        for key, _ in reversed(found):  # the deepest block least recent: see the module docstring
            self._blocks.move_to_end(key)
        return [block for _, block in found]

    def cached_blocks(self, ids: list[int]) -> int:
        """How many leading blocks `lookup(ids)` would return, without touching their recency."""
        n = (len(ids) - 1) // self.block_size
        if n <= 0 or not self._blocks:
            return 0
        return next((j for j, key in enumerate(block_keys(ids, self.block_size, n)) if key not in self._blocks), n)

    def count(self, tokens_reused: int) -> None:
        """Record one prompt's lookup and how many of its tokens it took from the cache."""
        self.lookups += 1
        self.hits += tokens_reused > 0
        self.tokens_reused += tokens_reused

    def insert(self, ids: list[int], rows) -> None:
        """Keep the complete blocks of `ids` whose K/V sit in `rows(start, end)`, a callable returning the
        tensor (2, num_layers, num_kv_heads, end - start, head_dim) of the prompt's tokens start..end-1. Blocks
        already held are only touched; `rows` is called once for the span of the missing ones (again only for a
        held block that this insert itself evicted)."""
        B = self.block_size
        n = len(ids) // B
        if n == 0 or self.budget_bytes <= 0:
            return
        keys = block_keys(ids, B, n)
        missing = [j for j, key in enumerate(keys) if key not in self._blocks]
        lo = missing[0] * B if missing else 0
        span = rows(lo, (missing[-1] + 1) * B) if missing else None  # (2, layers, n_kv, span, hd)
        for j in range(n - 1, -1, -1):
            key = keys[j]
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            if span is not None and lo <= j * B and (j + 1) * B - lo <= span.shape[3]:
                block = span[:, :, :, j * B - lo:(j + 1) * B - lo].clone()  # (2, layers, n_kv, B, hd)
            else:  # held at the start, evicted by this very insert: copy it again from the prompt's rows
                block = rows(j * B, (j + 1) * B).clone()
            size = block.numel() * block.element_size()
            if size > self.budget_bytes:
                return  # not even one block fits the budget
            while self.bytes + size > self.budget_bytes:
                _, old = self._blocks.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evictions += 1
            self._blocks[key] = block
            self.bytes += size

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
