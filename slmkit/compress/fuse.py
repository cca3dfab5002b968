"""Fused projections for inference: q/k/v as one matmul and gate/up as one, over the same stored codes.

A decode step multiplies one row by ~7 small matrices per layer. For quantized layers each call has a fixed
cost besides reading the weight: fbgemm's dynamic kernel quantizes the activation and packs its operand
per call, torch's int4 kernel walks its tiles per call. q/k/v share their input, as do gate/up, so
concatenating them along the output dimension gives one call of the same arithmetic: every output row is
still the dot product of the same stored codes with the same input row (per-output-channel int8 scales and
per-(row, group) int4 parameters concatenate along rows unchanged), and the kernels quantize a single row's
activation the same way whatever the output width. Measured on SmolLM2-135M compressed to int8 (24 layers,
AVX2 EPYC, one thread): 1.13x faster decode end to end.

No memory is added. `fuse_projections` builds one module of the sources' class holding the concatenated
codes, then makes each source's buffers row-slices (views) of it, so the sources still compute exactly as
before, `state_dict` still has every projection under its own name (`checkpoint.state_dict_for_save`
copies views out before saving), and passes still find every projection. An in-place edit of a source
(`load_state_dict`, `copy_`) writes into the shared storage and bumps its version, which invalidates the
fused module's kernel caches; a source whose buffers were replaced (`.to()`, `load_state_dict(assign=True)`)
no longer points into the fused storage, and the fused module is then dropped on its next call
(the layer computes unfused, as it would without this).

Only quantized projections are fused: a float layer's matmul reads the weight at memory bandwidth whatever
its width, so fusing saves two or three calls of a few microseconds while needing the float weights
rearranged. Layers whose projections differ in class, kernel, group size, dtype or device are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .qlinear import Int4Linear, Int8Linear

FUSED_ATTRIBUTE = {"self_attn": ("fused_qkv", ("q_proj", "k_proj", "v_proj")),
                   "mlp": ("fused_gate_up", ("gate_proj", "up_proj"))}


class FusedProjection:
    """Several quantized Linears of one input as one: `__call__(x)` returns the concatenated outputs
    (..., sum of out_features), or None once a source no longer shares the fused storage."""

    def __init__(self, module: nn.Module, sources: list[nn.Module]):
        self.module = module
        self.sources = sources
        # (source module, buffer name, the view it was given) — identity checks on every call
        self._views = [(s, name, s._buffers[name]) for s in sources for name in _buffer_names(s)]

    def valid(self) -> bool:
        return all(src._buffers.get(name) is view for src, name, view in self._views)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.valid():
            return None
        first, fused = self.sources[0], self.module
        # Execution settings follow the sources (a test or a user may pin them after fusing); sources set
        # differently from each other compute one by one, as they would unfused.
        for attr in _SETTINGS:
            value = getattr(first, attr)
            if any(getattr(s, attr) != value for s in self.sources[1:]):
                return torch.cat([s(x) for s in self.sources], dim=-1)
            if getattr(fused, attr) != value:
                setattr(fused, attr, value)
        return fused(x)


_SETTINGS = ("kernel_choice", "kernel_dtype")  # per-call execution choices of a quantized Linear


def _buffer_names(m: nn.Module) -> tuple[str, ...]:
    return m._source_buffers


def _compatible(mods: list[nn.Module]) -> bool:
    first = mods[0]
    if type(first) not in (Int8Linear, Int4Linear) or any(type(m) is not type(first) for m in mods):
        return False
    if any(m.in_features != first.in_features for m in mods):
        return False
    if any((m.bias is None) != (first.bias is None) for m in mods):
        return False
    if any(m.scales.dtype != first.scales.dtype or m.scales.device != first.scales.device or m.scales.is_meta
           for m in mods):
        return False
    return len({getattr(m, "kernel", None) for m in mods}) == 1 and len({getattr(m, "group_size", None) for m in mods}) == 1


def _fuse(mods: list[nn.Module]) -> FusedProjection:
    first = mods[0]
    out = sum(m.out_features for m in mods)
    kwargs = dict(device=first.scales.device, dtype=first.scales.dtype)
    if isinstance(first, Int8Linear):
        fused = Int8Linear(first.in_features, out, first.bias is not None, kernel=first.kernel, **kwargs)
    else:
        fused = Int4Linear(first.in_features, out, first.bias is not None, first.group_size, **kwargs)
    with torch.no_grad():
        for name in _buffer_names(first):
            fused._buffers[name] = torch.cat([m._buffers[name] for m in mods])
            start = 0
            for m in mods:  # each source now reads its rows of the fused tensor: no extra memory
                rows = m._buffers[name].shape[0]
                m._buffers[name] = fused._buffers[name][start:start + rows]
                start += rows
        if first.bias is not None:  # biases are copied (one vector per layer), not shared
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
    return FusedProjection(fused, mods)


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every decoder layer whose projections are quantized alike; returns the number
    of fused groups. Idempotent: groups that are already fused (and still valid) are kept."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return 0
    count = 0
    for layer in layers:
        for parent_name, (attr, names) in FUSED_ATTRIBUTE.items():
            parent = getattr(layer, parent_name, None)
            if parent is None or not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                continue  # e.g. a mixture-of-experts block has no gate_proj of its own
            existing = parent.__dict__.get(attr)
            if existing is not None and existing.valid():
                count += 1
                continue
            mods = [getattr(parent, n) for n in names]
            if _compatible(mods):
                parent.__dict__[attr] = _fuse(mods)  # a plain attribute: not a submodule, not in state_dict
                count += 1
    return count

