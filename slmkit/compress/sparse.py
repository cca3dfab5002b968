"""`SparseLinear`: a pruned `nn.Linear` that computes densely but is stored compactly.

In memory the weight is an ordinary dense `(out, in)` parameter with zeros where weights were pruned, so the
module *is* a Linear (same forward, same kernels, works under autocast, on any device). There is no speed
claim: the matmul is dense. What changes is the on-disk form: the state dict holds, instead of `weight`,

    weight_mask    uint8 (out, ceil(in / 8))  one bit per weight, 1 = kept; bit b of byte k is column 8k + b
    weight_values  (nnz,) in the weight's dtype  the kept values in row-major order

(plus `bias` when there is one). At fp32 and 50% sparsity that is 4 bytes × kept + 1/8 byte per weight,
about 0.53 of the dense bytes; at 2:4 in bf16 about 0.56. Loading rebuilds the dense weight from mask and
values in a load-state-dict pre-hook, so `load_state_dict(..., assign=True)` into a meta-device module works
without knowing the number of kept values in advance.

"Kept" means nonzero: the mask is derived from `weight != 0` when the state dict is taken, so the module has
no separate mask to keep in sync (a kept weight that is exactly zero is stored as pruned, which is the same
tensor).
"""

from __future__ import annotations

import torch
from torch import nn

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32))  # little-endian bit order inside a byte


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols / 8)); bit b of byte k is column 8k + b."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.int32), (0, pad)).view(rows, -1, 8)  # (rows, nbytes, 8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (rows, ceil(cols / 8)) -> bool (rows, cols); the inverse of `pack_mask`."""
    bits = (packed.to(torch.int32)[..., None] >> torch.arange(8, device=packed.device)) & 1  # (rows, nbytes, 8)
    return bits.flatten(-2)[:, :cols].bool()


class SparseLinear(nn.Linear):
    """A Linear whose zeros are not stored: state dict = `weight_mask` + `weight_values` (+ `bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        # Known nonzero count for a meta-device module (set by `restructure` from the pass record), so size
        # accounting works before weights are loaded.
        self.expected_nonzero: int | None = None
        self._register_state_dict_hook(_compact_state_dict)
        self._register_load_state_dict_pre_hook(_expand_state_dict, with_module=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        """Wrap an existing Linear, sharing its parameters (no copy; works on the meta device)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training a pruned model (e.g. KD recovery) must keep its zeros: mask the weight's gradient. With a
        # zero gradient AdamW's moments stay zero and decoupled weight decay keeps zeros at zero.
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled() and getattr(self, "_masked_param", None) != id(w):
            w.register_hook(lambda g, w=w: g.masked_fill(w.detach() == 0, 0))
            self._masked_param = id(w)
        return super().forward(x)

    def logical_parameters(self) -> tuple[int, int]:
        """(total, nonzero) as if the weight were a plain dense parameter."""
        bias = self.bias.numel() if self.bias is not None else 0
        total = self.weight.numel() + bias
        if self.weight.is_meta:
            return total, (self.expected_nonzero + bias) if self.expected_nonzero is not None else total
        nonzero = int(torch.count_nonzero(self.weight))
        if self.bias is not None:
            nonzero += int(torch.count_nonzero(self.bias))
        return total, nonzero

    def extra_repr(self) -> str:
        if self.weight.is_meta:
            return super().extra_repr()
        return f"{super().extra_repr()}, sparsity={1 - int(torch.count_nonzero(self.weight)) / self.weight.numel():.3f}"


def _compact_state_dict(module: SparseLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return
    weight = state_dict.pop(key)
    if weight.is_meta:  # nothing to compact; keep the dense entry so shapes stay inspectable
        state_dict[key] = weight
        return
    w = weight.detach()
    mask = w != 0
    state_dict[prefix + "weight_mask"] = pack_mask(mask)
    state_dict[prefix + "weight_values"] = w[mask]  # row-major order
    if prefix + "bias" in state_dict:  # keep the conventional key order: weight*, then bias
        state_dict[prefix + "bias"] = state_dict.pop(prefix + "bias")


def _expand_state_dict(module: SparseLinear, state_dict: dict, prefix: str, local_metadata, strict,
                       missing_keys, unexpected_keys, error_msgs) -> None:
    mask_key, values_key = prefix + "weight_mask", prefix + "weight_values"
    if mask_key not in state_dict and values_key not in state_dict:
        return  # a dense `weight` (or nothing): the ordinary Linear load handles it
    if mask_key not in state_dict or values_key not in state_dict:
        error_msgs.append(f"{prefix}weight: sparse storage needs both {mask_key} and {values_key}")
        return
    packed, values = state_dict.pop(mask_key), state_dict.pop(values_key)
    out_features, in_features = module.out_features, module.in_features
    if tuple(packed.shape) != (out_features, (in_features + 7) // 8) or packed.dtype != torch.uint8:
        error_msgs.append(f"{mask_key}: expected uint8 {(out_features, (in_features + 7) // 8)}, "
                          f"got {packed.dtype} {tuple(packed.shape)}")
        return
    mask = unpack_mask(packed, in_features)
    nnz = int(mask.sum())
    if values.dim() != 1 or values.numel() != nnz:
        error_msgs.append(f"{values_key}: the mask keeps {nnz} weights but {tuple(values.shape)} values are stored")
        return
    weight = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    weight[mask] = values  # boolean-mask assignment fills in row-major order, the order values were taken
    state_dict[prefix + "weight"] = weight
