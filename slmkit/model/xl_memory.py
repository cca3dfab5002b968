"""Transformer-XL segment memory (Dai et al., 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context").

A long text is read in segments of T tokens. Each layer's queries attend causally to
[memory; current segment], where the memory holds the last M = `config.memory_length` positions of the
earlier segments, detached from the autograd graph (the paper's stop-gradient, SG(h) in its eq. 1).
Information thus flows across segments without back-propagating through them: a layer-n state can see
up to n * M tokens back, at the cost of attending to M extra keys per query.

What is cached, and why: the paper caches each layer's *input hidden states* h of the previous segment and
recomputes keys and values from them with the current weights. Here each layer caches the *keys and values*
it computed for those positions (keys already rotated by RoPE at their absolute positions), as the KV cache
does for decoding.
- With fixed weights (evaluation, generation-like use) the two are identical: k = W_k h, v = W_v h either way.
- In training the only difference is staleness: cached K/V carry the W_k, W_v of the step that produced
  them, one optimizer step old. The paper's cached h is itself the output of the previous step's weights
  for every layer below, so the memory is already a stale, gradient-free summary; one more stale linear
  map changes nothing of substance and saves two projections (and a rotation) per memory position, layer
  and segment.
- Size: K and V take 2 * num_key_value_heads * head_dim numbers per position and layer, against
  hidden_size for h: twice as much without grouped-query attention, the same or less with GQA >= 2. M is
  a few hundred positions, so either is small.

Positions: the paper replaces absolute positional encodings by relative ones (its section 3.3) because
absolute positions 0..T-1 reused in every segment would collide. Rotary embeddings (Su et al., 2021) are
already relative: q_i . k_j depends on positions only through i - j. So the segment simply continues the
absolute positions (position_ids = offset + arange(T)), and keys rotated at their own absolute positions
when they were cached stay correct for every later query. When positions would exceed
`max_position_embeddings` the memory is *rebased*: cached keys are rotated back by a constant shift so
they occupy positions 0..m-1 (a rotation composes with rotations, so relative positions are unchanged);
this keeps RoPE angles in the trained range and in fp32 precision on arbitrarily long streams. An empty
memory restarts at position 0, so `memory_length=0` is exactly the plain model.

Usage::

    memory = model.new_memory(batch_size)           # per-layer memory of config.memory_length positions
    for segment in segments:                        # (B, T) consecutive pieces of B long texts
        logits = model(segment, memory=memory)      # attends to memory, then memory := last M positions
    memory.reset()                                  # start new texts

Memory is for reading long text (training, scoring). Generation uses the KV cache, which keeps *every*
earlier position (a superset of the memory); passing both is an error (two competing pasts with different
positions), so `generate` ignores memory and a model trained with memory decodes like any other.
"""

from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig


class XLMemory:
    """Per-layer keys and values of the last `length` positions read, detached, plus the absolute position
    of the next token (`offset`). Rows are independent texts read in lockstep; all rows share one length."""

    def __init__(self, config: ModelConfig, batch_size: int, length: int | None = None):
        length = config.memory_length if length is None else length
        if config.attention_type != "full":
            raise ConfigError(f"segment memory needs attention_type='full', not {config.attention_type!r}")
        if length < 0:
            raise ConfigError(f"memory length {length} must be >= 0")
        self.config, self.batch_size, self.max_length = config, batch_size, length
        self.reset()

    def reset(self) -> None:
        """Forget everything (new texts start): no cached positions, positions restart at 0."""
        n = self.config.num_hidden_layers
        self.keys: list[torch.Tensor | None] = [None] * n  # (B, n_kv, m, head_dim) each, rotated
        self.values: list[torch.Tensor | None] = [None] * n
        self._pending_keys: list[torch.Tensor | None] = [None] * n
        self._pending_values: list[torch.Tensor | None] = [None] * n
        self.length = 0  # m: positions currently held (<= max_length)
        self.offset = 0  # absolute position of the next token

    # -- called by CausalLM.forward ---------------------------------------------------------------

    def begin_segment(self, input_ids: torch.Tensor, *, position_ids, cache, attention_mask,
                      rotary) -> torch.Tensor:
        """Check the call and return the segment's position ids (B, T) = offset + arange(T)."""
        B, T = input_ids.shape
        if cache is not None:
            raise ValueError("memory and cache cannot be used together: the KV cache already keeps every earlier "
                             "position for decoding, and a second, shorter past with its own positions would "
                             "conflict with it; use memory to read long text, the cache to generate")
        if B != self.batch_size:
            raise ValueError(f"the memory was made for batch size {self.batch_size}, got a batch of {B} rows; "
                             f"use model.new_memory({B})")
        if attention_mask is not None or position_ids is not None:
            raise ValueError("memory sets positions itself and reads unpadded segments; do not pass "
                             "attention_mask or position_ids with memory")
        if self.length == 0:
            self.offset = 0  # nothing cached: restarting positions is free and matches the plain model
        elif self.offset + T > self.config.max_position_embeddings and self.offset > self.length:
            self._rebase(rotary)
        return torch.arange(self.offset, self.offset + T, device=input_ids.device).expand(B, T)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv, T, head_dim) of the segment, rotated. Returns the keys/values to attend to,
        (B, n_kv, m + T, head_dim), and stages this layer's next memory (committed by `end_segment`, so
        the forward pass reads one consistent memory throughout)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer].to(k.dtype), k], dim=2)  # (B, n_kv, m + T, hd)
            v = torch.cat([self.values[layer].to(v.dtype), v], dim=2)
        if self.max_length > 0:
            # detach: the stop-gradient of the paper; the next segment's loss never reaches this one.
            # contiguous: a copy of the last M positions, so the memory neither pins the whole (m + T) tensor
            # nor changes its strides from segment to segment (torch.compile guards on them: a new layout
            # would mean a recompile).
            self._pending_keys[layer] = k[:, :, -self.max_length:].detach().contiguous()
            self._pending_values[layer] = v[:, :, -self.max_length:].detach().contiguous()
        return k, v

    def end_segment(self, T: int) -> None:
        if self.max_length > 0:
            self.keys, self.values = self._pending_keys, self._pending_values
            self._pending_keys = [None] * len(self.keys)
            self._pending_values = [None] * len(self.values)
        self.length = min(self.max_length, self.length + T)
        self.offset += T

    def _rebase(self, rotary) -> None:
        # Rotate cached keys by -shift so they sit at positions 0..m-1: R(-s) R(p) = R(p - s).
        shift = self.offset - self.length
        from .rope import apply_rotary

        for i, k in enumerate(self.keys):
            pos = torch.full((k.shape[0], 1), -shift, device=k.device, dtype=torch.long)
            cos, sin = rotary(pos, torch.float32)  # (B, 1, 1, hd)
            self.keys[i] = apply_rotary(k.float(), cos, sin).to(k.dtype)
        self.offset -= shift

    def __repr__(self) -> str:
        return (f"XLMemory(batch_size={self.batch_size}, max_length={self.max_length}, length={self.length}, "
                f"offset={self.offset})")


def new_memory(model, batch_size: int, length: int | None = None) -> XLMemory:
    """An empty memory for `model` (a CausalLM) reading `batch_size` texts; `length` defaults to
    `config.memory_length`."""
    return XLMemory(model.config, batch_size, length)
