"""slmkit's quantized weights as GGUF (ggml) blocks, written from the codes a checkpoint holds: no re-quantization.

ggml stores a quantized row as blocks of 32 consecutive weights, little-endian:

    Q8_0, 34 bytes: fp16 d, 32 int8 codes q                         w = q · d
    Q4_0, 18 bytes: fp16 d, 16 bytes of 4-bit codes q in [0, 15]    w = (q − 8) · d
    Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes of 4-bit codes          w = q · d + m

(in Q4_0/Q4_1, byte j of the 16 holds code j in its low nibble and code j + 16 in its high nibble).

slmkit's modules (`compress/qlinear.py`) map onto them block by block:
- `Int8Linear`, w = q · s_r per output row r: every block of row r is Q8_0 with d = s_r and the same codes;
- `Int4Linear`, w = (q − z) · s per group of g columns, g a multiple of 32: every 32-block of a group repeats its
  parameters; Q4_0 with d = s when every z is 8 (`format=q4_0`), else Q4_1 with d = s and m = −z · s;
- `QuantizedEmbedding` holds its table as one of the two, so token_embd maps the same way.

The mapping is exact when those parameters are fp16 values: int8 scales always are now, and int4 ones with
`format=q4_0` or `q4_1` (`quantize.py` says how). Checkpoints from before, and `format=minmax` (fp32 scales),
are converted with fp16-rounded parameters. Either way `encode` measures the largest difference between the
weights ggml will compute from the blocks and slmkit's own dequantized fp32 weights, so exactness is checked
on every export rather than assumed; the exporter reports any difference that is not zero.

A layer whose input width is not a multiple of 32 (or whose groups are not: an int4 fallback to 16) has no
block layout at all; `encode` says so (qtype None) and the exporter writes its dequantized weights as floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..compress.qlinear import INT4_KERNEL_OFFSET, Int4Linear, Int8Linear, QuantizedEmbedding

BLOCK = 32  # weights per ggml block (QK8_0 = QK4_0 = QK4_1)
Q8_0, Q4_0, Q4_1 = "Q8_0", "Q4_0", "Q4_1"  # ggml type names (gguf.GGMLQuantizationType members)


@dataclass
class HeldWeight:
    """A matrix a checkpoint holds quantized, on its way into a GGUF file: one module's weight (out, in), or the
    experts of one MoE projection stacked as (E, out, in). `rows` is applied to every per-row tensor derived from
    it (blocks or dequantized values): the exporter's Q/K row permutation, or None."""

    modules: list[nn.Module]
    stacked: bool = False
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.modules = [m.packed if isinstance(m, QuantizedEmbedding) else m for m in self.modules]
        bad = [type(m).__name__ for m in self.modules if not isinstance(m, (Int8Linear, Int4Linear))]
        if bad:
            raise TypeError(f"HeldWeight: {bad[0]} is not an Int8Linear or Int4Linear")

    @property
    def shape(self) -> tuple[int, ...]:
        m = self.modules[0]
        rows_cols = (m.out_features, m.in_features)
        return (len(self.modules), *rows_cols) if self.stacked else rows_cols

    @property
    def quantized_by(self) -> str:
        return self.modules[0].quantized_by

    def _each(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        parts = [fn(m) if self.rows is None else self.rows(fn(m)) for m in self.modules]
        return torch.stack(parts) if self.stacked else parts[0]

    def dequantized(self) -> torch.Tensor:
        """slmkit's weights as fp32 values (the exact product of codes and parameters), in the file's row order."""
        return self._each(lambda m: m.dequantize(torch.float32))


@dataclass
class Encoded:
    """`HeldWeight` as ggml data: `qtype` (a ggml type name) and `data`, uint8 (..., rows, row bytes), or qtype
    None when no block layout fits (`data` then holds the fp32 dequantized weights). `max_error`: the largest
    |w_ggml − w_slmkit| over the tensor (0.0: exact); `max_abs`: the largest |w_slmkit|, to read it against."""

    qtype: str | None
    data: torch.Tensor
    max_error: float
    max_abs: float

    @property
    def exact(self) -> bool:
        return self.max_error == 0.0


def block_type(m: nn.Module) -> str | None:
    """The ggml block type that holds module `m`'s format (Q8_0, Q4_0 or Q4_1), or None when its rows or groups
    are not whole 32-blocks."""
    if m.in_features % BLOCK:
        return None
    if isinstance(m, Int8Linear):
        return Q8_0
    if m.group_size % BLOCK:
        return None
    return Q4_0 if bool((m.zeros == INT4_KERNEL_OFFSET).all()) else Q4_1


def tensor_block_type(held: HeldWeight) -> str | None:
    """One type for the whole tensor (stacked experts share one): Q4_1 holds Q4_0 data too (m = −8 · d)."""
    types = {block_type(m) for m in held.modules}
    if len(types) == 1:
        return types.pop()
    return Q4_1 if types == {Q4_0, Q4_1} else None


def encode(held: HeldWeight) -> Encoded:
    """Blocks for `held` from its codes (see the module docstring), with the weight difference measured."""
    qtype = tensor_block_type(held)
    if qtype is None:
        w = held.dequantized()
        return Encoded(None, w, 0.0, float(w.abs().max()) if w.numel() else 0.0)
    max_error, max_abs = 0.0, 0.0
    blocks = []
    for m in held.modules:
        data, w_ggml = _blocks(m, qtype)  # (rows, row bytes) uint8, (rows, cols) fp32
        w = m.dequantize(torch.float32)
        diff = (w_ggml - w).abs().max()
        max_error = max(max_error, float(diff) if torch.isfinite(diff) else float("inf"))
        max_abs = max(max_abs, float(w.abs().max()))
        blocks.append(data if held.rows is None else held.rows(data))
    data = torch.stack(blocks) if held.stacked else blocks[0]
    return Encoded(qtype, data, max_error, max_abs)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) fp16 values -> (rows, blocks, 2) their little-endian bytes."""
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _blocks(m: nn.Module, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols / 32 · block bytes) uint8 blocks of `m` in `qtype`, and the fp32 weights ggml computes from
    them (its own dequantization: fp16 parameters widened to fp32, one multiply and for Q4_1 one add)."""
    rows, cols = m.out_features, m.in_features
    nb = cols // BLOCK
    if isinstance(m, Int8Linear):
        q = m.weight_int8.reshape(rows, nb, BLOCK)
        d = m.scales.detach().to(torch.float16)[:, None].expand(rows, nb)  # (rows, blocks)
        w = q.float() * d.float()[..., None]
        data = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=2)  # (rows, blocks, 34)
        return data.reshape(rows, -1), w.reshape(rows, cols)
    per_group = m.group_size // BLOCK
    q = m.codes().reshape(rows, nb, BLOCK)  # uint8 in [0, 15]
    s = m.scales.detach().float().repeat_interleave(per_group, dim=1)  # (rows, blocks)
    z = m.zeros.float().repeat_interleave(per_group, dim=1)
    d = s.to(torch.float16)
    nibbles = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)  # (rows, blocks, 16): j low, j + 16 high
    if qtype == Q4_0:
        w = (q.float() - INT4_KERNEL_OFFSET) * d.float()[..., None]
        data = torch.cat([_fp16_bytes(d), nibbles], dim=2)  # (rows, blocks, 18)
    else:
        mn = (-z * s).to(torch.float16)
        w = q.float() * d.float()[..., None] + mn.float()[..., None]
        data = torch.cat([_fp16_bytes(d), _fp16_bytes(mn), nibbles], dim=2)  # (rows, blocks, 20)
    return data.reshape(rows, -1), w.reshape(rows, cols)
