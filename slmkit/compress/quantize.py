"""Weight-only quantization passes: `quant.int8`, `quant.int4`, `quant.gptq`.

- `quant.int8`: symmetric per-output-channel int8, round-to-nearest (RTN). No calibration. ~1/4 of fp32.
- `quant.int4`: asymmetric int4 per group of `group_size` input columns with integer zero points, RTN.
  No calibration. ~1/8 of fp32 plus one scale and zero point per group.
- `quant.gptq`: the same two formats (bits=8 per channel, bits=4 grouped), with the codes chosen by GPTQ
  (Frantar et al., 2023) from calibration activations; the algorithm and the pass live in `gptq.py`.

GGUF. int8 scales are fp16 values (rounded up before the codes are computed), so every int8 module is exactly a
GGUF Q8_0 tensor. `format` (quant.int4, and quant.gptq with bits=4) says how a group's scale and zero point are
fitted; the stored layout is the same for all three, and `slm export gguf` writes the codes as they are:
- `minmax` (default): the range [min(w, 0), max(w, 0)] in 15 steps, scales in the model's dtype. Not exactly a
  GGUF type (fp32 scales): the export converts it to Q4_1 with fp16 parameters and reports the weight error.
- `q4_0`: llama.cpp's Q4_0 rule, symmetric with z = 8 and s = (the value of largest magnitude) / −8, |s| rounded
  up to fp16: exactly GGUF Q4_0 (w = (q − 8) · d).
- `q4_1`: `minmax` with s rounded up to 7 significant bits (a · 2^k, a < 128, k ≥ −24), so that d = s and
  m = −z · s (z ≤ 15) are both exact fp16 values: exactly GGUF Q4_1 (w = q · d + m). The step is at most 2^-6
  larger than `minmax`'s (measured: no difference in the tests' logit error).
Any `group_size` here (32, 64, 128) is a multiple of GGUF's 32-weight blocks, which then repeat the group's
parameters. See `qlinear.py` for the arithmetic.

Each pass swaps the target projections for `Int8Linear` / `Int4Linear` (`qlinear.py`), whose state dicts
are the packed on-disk form and whose CPU forward runs torch's packed weight-only kernels. Targets are
plain `nn.Linear` modules and pruned `SparseLinear` ones (quantize after pruning: a zero weight stays an
exact zero in both formats); modules of other types under a target name (e.g. low-rank factors) are skipped
and listed in the report. `lm_head` may be a target only when it is not tied to the input embeddings.

`quant.int4` and `quant.gptq` (bits=4) fall back per layer where `group_size` does not divide the input width:
to the largest power of two >= 16 below it that does, else to int8 per channel (weight_only) for that layer;
each fallback is listed in the report (`fallbacks`, `notes`) and replayed exactly on load.

`embeddings=true` (quant.int8 / quant.int4 only) also quantizes the vocabulary matrix, round-to-nearest in
the pass's format (int4: groups of `group_size` along hidden_size, which it must divide):
- tied embeddings: `model.embed_tokens` becomes a `QuantizedEmbedding` holding the one packed (V, d) table
  and `lm_head` a `TiedQuantizedHead` computing logits from that same table (stored once, under
  `model.embed_tokens.packed.*`; nothing under `lm_head`);
- untied: `lm_head` is quantized as an ordinary target (Int8Linear / Int4Linear); the input embedding stays
  in float (a gather reads only T rows, so it costs bytes on disk, not time).

`kernel` (quant.int8, and quant.gptq with bits=8) picks how the int8 modules multiply; the stored tensors are
the same either way: `weight_only` keeps activations in float (torch's `_weight_int8pack_mm` at decode, the
exact dequantized matmul elsewhere); `dynamic` also quantizes each call's activations to 7-bit integers and
runs fbgemm's integer GEMM (W8A8 dynamic, see `qlinear.py`); `auto` is `DEFAULT_INT8_KERNEL`. The report
records the resolved kernel and replay builds that one, so a checkpoint runs the arithmetic it was measured
with (checkpoints from before this option record none and replay as `weight_only`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import PROJECTIONS, Calibration, PassError, register_pass, set_module
from .qlinear import (INT4_FORMATS, INT8_KERNELS, QUANTIZED_LINEARS, Int4Linear, Int8Linear,
                      QuantizedEmbedding, TiedQuantizedHead, int4_params, int8_scales, quantize_int4, quantize_int8)

GROUP_SIZES = (32, 64, 128)
# Per-layer fallbacks of the grouped 4-bit formats (quant.int4, quant.gptq) when `group_size` does not divide a
# layer's input width (SmolLM2's 576 with 128, a 176-wide MLP with 32): the largest power of two >= 16 below it
# that divides the width, else int8 for that layer. llama.cpp's quantizer does the same per tensor (a k-quant
# whose 256-wide block does not fit a row falls back to a type whose block does), so one odd layer never refuses
# the whole model.
FALLBACK_GROUP_SIZES = (128, 64, 32, 16)
ALLOWED_TARGETS = (*PROJECTIONS, "lm_head")
KERNEL_CHOICES = ("auto", *INT8_KERNELS)
DEFAULT_INT8_KERNEL = "dynamic"  # what kernel=auto means for int8: the measured trade-off is in README.md


# -- configs ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _QuantConfig:
    pass_name: ClassVar[str] = "quant"
    allowed_bits: ClassVar[tuple[int, ...]] = ()

    def _fail(self, field: str, msg: str) -> PassError:
        return PassError(f"{self.pass_name}: {field}={getattr(self, field)!r} {msg}")

    def _check_common(self) -> None:
        if isinstance(self.targets, (list, str)):  # from JSON or a single name
            object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if self.bits not in self.allowed_bits or isinstance(self.bits, bool):
            raise self._fail("bits", f"is not supported; {self.pass_name} supports bits in {list(self.allowed_bits)}")
        bad = [t for t in self.targets if t not in ALLOWED_TARGETS]
        if not self.targets or bad:
            raise self._fail("targets", f"must be a non-empty subset of {list(ALLOWED_TARGETS)}"
                             + (f" (unknown: {bad})" if bad else ""))

    def _check_group(self) -> None:
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise self._fail("group_size", f"must be one of {list(GROUP_SIZES)} for 4-bit weights")

    def _check_embeddings(self) -> None:
        if not isinstance(self.embeddings, bool):
            raise self._fail("embeddings", "must be true or false")

    def _check_format(self) -> None:
        if self.format not in INT4_FORMATS:
            raise self._fail("format", f"must be one of {list(INT4_FORMATS)} (how 4-bit group scales and zero "
                                       "points are fitted; q4_0/q4_1 export exactly to GGUF's blocks)")
        if self.bits == 8 and self.format != "minmax":
            raise self._fail("format", "applies to bits=4; 8-bit weights have one format (per-channel, fp16 "
                                       "scales: GGUF Q8_0)")

    @property
    def int4_format(self) -> str:
        """How 4-bit group parameters are fitted (`INT4_FORMATS`)."""
        return getattr(self, "format", "minmax")

    def _check_kernel(self) -> None:
        if self.kernel not in KERNEL_CHOICES:
            raise self._fail("kernel", f"must be one of {list(KERNEL_CHOICES)}")
        if self.bits == 4 and self.kernel == "dynamic":
            raise self._fail("kernel", "needs bits=8: 4-bit weights have only the weight_only kernel")

    @property
    def group(self) -> int | None:
        """Group size of the stored format (None: one scale per output channel)."""
        return self.group_size if self.bits == 4 else None

    @property
    def resolved_kernel(self) -> str:
        """The Int8Linear kernel this config builds ("weight_only" for 4-bit formats)."""
        kernel = getattr(self, "kernel", "weight_only")
        if self.bits != 8:
            return "weight_only"
        return DEFAULT_INT8_KERNEL if kernel == "auto" else kernel


@dataclass(frozen=True)
class Int8Config(_QuantConfig):
    """Round-to-nearest symmetric int8, one scale per output channel."""

    pass_name: ClassVar[str] = "quant.int8"
    allowed_bits: ClassVar[tuple[int, ...]] = (8,)
    bits: int = 8
    targets: tuple[str, ...] = PROJECTIONS
    embeddings: bool = False
    kernel: str = "auto"  # auto | weight_only | dynamic (W8A8 dynamic activations)

    def __post_init__(self) -> None:
        self._check_common()
        self._check_embeddings()
        self._check_kernel()

    @property
    def group(self) -> int | None:
        return None


@dataclass(frozen=True)
class Int4Config(_QuantConfig):
    """Round-to-nearest asymmetric int4 with a scale and integer zero point per group of input columns."""

    pass_name: ClassVar[str] = "quant.int4"
    allowed_bits: ClassVar[tuple[int, ...]] = (4,)
    bits: int = 4
    group_size: int = 128
    targets: tuple[str, ...] = PROJECTIONS
    embeddings: bool = False
    format: str = "minmax"  # minmax | q4_0 | q4_1 (exact GGUF blocks): how group parameters are fitted

    def __post_init__(self) -> None:
        self._check_common()
        self._check_group()
        self._check_embeddings()
        self._check_format()


@dataclass(frozen=True)
class GPTQConfig(_QuantConfig):
    """GPTQ: bits=4 (grouped, asymmetric) or bits=8 (per channel, symmetric; group_size unused)."""

    pass_name: ClassVar[str] = "quant.gptq"
    allowed_bits: ClassVar[tuple[int, ...]] = (4, 8)
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    targets: tuple[str, ...] = PROJECTIONS
    kernel: str = "auto"  # for bits=8: auto | weight_only | dynamic; bits=4 runs weight_only
    format: str = "minmax"  # for bits=4: minmax | q4_0 | q4_1 (exact GGUF blocks)

    def __post_init__(self) -> None:
        self._check_common()
        self._check_group()
        self._check_kernel()
        self._check_format()
        if not isinstance(self.act_order, bool):
            raise self._fail("act_order", "must be true or false")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise self._fail("damp", "must be in (0, 1): the fraction of the mean Hessian diagonal added to it")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise self._fail("block_size", "must be a positive integer")
        if self.bits == 4 and self.block_size % self.group_size:
            raise self._fail("block_size", f"must be a multiple of group_size={self.group_size} so that no "
                                           f"quantization group straddles two blocks")


# -- finding targets ----------------------------------------------------------------------------------------

def int4_layer_format(in_features: int, group_size: int) -> tuple[int, int | None]:
    """(bits, group size) a layer of this input width gets under int4 with `group_size`: the group itself if
    it divides the width, else the largest of FALLBACK_GROUP_SIZES below it that does, else (8, None)."""
    for g in (group_size, *(g for g in FALLBACK_GROUP_SIZES if g < group_size)):
        if in_features % g == 0:
            return 4, g
    return 8, None


def _fallback_record(in_features: int, group_size: int) -> dict | None:
    """How a layer of this width departs from int4 with `group_size` (None: it does not)."""
    bits, group = int4_layer_format(in_features, group_size)
    if bits == 4 and group == group_size:
        return None
    why = f"group_size={group_size} does not divide in_features={in_features}"
    if bits == 4:
        return {"bits": 4, "group_size": group, "reason": why}
    return {"bits": 8, "kernel": "weight_only", "reason": why}


def layer_fallbacks(widths: dict[str, int], cfg: _QuantConfig) -> dict[str, dict]:
    """{module name: fallback record} for every module (name -> input width) whose width the pass's group
    size does not divide; empty for per-channel formats."""
    if cfg.group is None:
        return {}
    records = {name: _fallback_record(width, cfg.group) for name, width in widths.items()}
    return {name: fb for name, fb in records.items() if fb is not None}


def layer_format(cfg: _QuantConfig, fallback: dict | None) -> tuple[int, int | None, str]:
    """(bits, group size, int8 kernel) one module is stored in: its fallback's, else the pass's."""
    if fallback is None:
        return cfg.bits, cfg.group, cfg.resolved_kernel
    return fallback["bits"], fallback.get("group_size"), fallback.get("kernel", cfg.resolved_kernel)


def fallback_report(fallbacks: dict[str, dict]) -> dict:
    """The report entries of a pass's fallbacks: replayed on load (`restructure`) and listed under the pass's
    row in `slm compress`."""
    return {"fallbacks": fallbacks, "notes": _fallback_notes(fallbacks)} if fallbacks else {}


def _fallback_notes(fallbacks: dict[str, dict]) -> list[str]:
    """One line per (format, reason): a 30-layer model's fallbacks read as a few lines, not 180."""
    grouped: dict[tuple, list[str]] = {}
    for name, fb in fallbacks.items():
        fmt = f"int4 group_size={fb['group_size']}" if fb["bits"] == 4 else "int8 per channel (no group >= 16 fits)"
        grouped.setdefault((fmt, fb["reason"]), []).append(name)
    notes = []
    for (fmt, why), names in grouped.items():
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        notes.append(f"{fmt} on {len(names)} module(s) ({', '.join(kinds)}): {why}")
    return notes


def find_quant_targets(model: nn.Module, cfg: _QuantConfig) -> tuple[dict[str, nn.Linear], list[dict]]:
    """({name: Linear} to quantize, [skipped modules]); validates everything before any weight changes.

    With `embeddings=true` and tied embeddings, `lm_head` is never a Linear target (the tied table is
    quantized by `_quantize_tied_embeddings`); untied, `lm_head` joins the targets. A layer whose width
    `group_size` does not divide is a target too: it gets a fallback format (`layer_fallbacks`)."""
    plan = embedding_plan(model, cfg)
    wanted = set(cfg.targets) | ({"lm_head"} if plan == "untied" else set())
    if plan == "tied":
        wanted.discard("lm_head")
    found: dict[str, nn.Linear] = {}
    skipped: list[dict] = []
    tied = _is_tied(model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in wanted:
            continue
        if isinstance(module, QUANTIZED_LINEARS):
            raise PassError(f"{cfg.pass_name}: {name} is already quantized by {module.quantized_by} "
                            f"({type(module).__name__}); quantize each module once — drop it from targets")
        if not isinstance(module, nn.Linear):
            skipped.append({"module": name, "type": type(module).__name__})
            continue
        if name == "lm_head" and (tied or _is_tied_to_embedding(model, module)):
            raise PassError(f"{cfg.pass_name}: targets includes lm_head, but lm_head is tied to the input embeddings "
                            "(tie_word_embeddings=true); quantizing it would change the embeddings too — drop "
                            "lm_head from targets, or set embeddings=true to quantize the tied matrix once")
        found[name] = module
    if not found and plan != "tied":
        raise PassError(f"{cfg.pass_name}: targets={list(cfg.targets)} matched no nn.Linear in the model")
    return found, skipped


def _is_tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def embedding_plan(model: nn.Module, cfg: _QuantConfig) -> str | None:
    """None (embeddings not asked for), "tied" or "untied"; validates the embedding side of the pass."""
    if not getattr(cfg, "embeddings", False):
        return None
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if isinstance(emb, QuantizedEmbedding) or isinstance(head, (TiedQuantizedHead, *QUANTIZED_LINEARS)):
        raise PassError(f"{cfg.pass_name}: embeddings=true, but the embeddings/lm_head are already quantized; "
                        "quantize them once — set embeddings=false")
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise PassError(f"{cfg.pass_name}: embeddings=true needs model.embed_tokens (nn.Embedding) and lm_head "
                        f"(nn.Linear); found {type(emb).__name__} and {type(head).__name__}")
    if not (_is_tied(model) or _is_tied_to_embedding(model, head)):
        return "untied"
    return "tied"


def _tie_quantized(model: nn.Module, emb: QuantizedEmbedding) -> None:
    model.model.embed_tokens = emb
    model.lm_head = TiedQuantizedHead(emb)


def _is_tied_to_embedding(model: nn.Module, lm_head: nn.Linear) -> bool:
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb is not None and emb.weight is lm_head.weight


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def _report(cfg: _QuantConfig, method: str, before: dict[str, int], model: nn.Module,
            skipped: list[dict], **extra: Any) -> dict:
    after = {n: _module_bytes(model.get_submodule(n)) for n in before}
    fmt = {"format": cfg.int4_format} if cfg.bits == 4 else {}
    return {"modules": list(before), "bits": cfg.bits, "group_size": cfg.group, **fmt,
            "scheme": "symmetric per-channel" if cfg.bits == 8 else "asymmetric per-group, integer zero point",
            "kernel": cfg.resolved_kernel, "method": method,
            "target_bytes_before": sum(before.values()), "target_bytes_after": sum(after.values()),
            "skipped": skipped, **extra}


def _quantized_module(linear: nn.Linear, fmt: tuple[int, int | None, str], codes: torch.Tensor,
                      scales: torch.Tensor, zeros: torch.Tensor | None, pass_name: str) -> nn.Module:
    """The module storing `codes` in `fmt` = (bits, group size, int8 kernel), as `layer_format` gives it."""
    bits, group, kernel = fmt
    if bits == 8:
        m = Int8Linear.from_codes(linear, codes, scales, kernel)
    else:
        m = Int4Linear.from_codes(linear, codes, scales, zeros, group)
    m.quantized_by = pass_name
    return m


# -- round to nearest --------------------------------------------------------------------------------------

def _apply_rtn(model: nn.Module, cfg: _QuantConfig) -> tuple[nn.Module, dict]:
    targets, skipped = find_quant_targets(model, cfg)
    plan = embedding_plan(model, cfg)
    before = {n: _module_bytes(m) for n, m in targets.items()}
    extra: dict[str, Any] = {}
    widths = {n: m.in_features for n, m in targets.items()}
    if plan == "tied":
        emb_before = _module_bytes(model.model.embed_tokens)
        widths["model.embed_tokens"] = model.model.embed_tokens.embedding_dim
    elif plan == "untied":
        emb_before = _module_bytes(model.lm_head)
    fallbacks = layer_fallbacks(widths, cfg)
    for name, linear in targets.items():
        bits, group, kernel = layer_format(cfg, fallbacks.get(name))
        with torch.no_grad():
            new = (Int8Linear.from_linear(linear, kernel) if bits == 8
                   else Int4Linear.from_linear(linear, group, cfg.int4_format))
        new.quantized_by = cfg.pass_name
        set_module(model, name, new)
    if plan == "tied":
        old = model.model.embed_tokens
        bits, group, kernel = layer_format(cfg, fallbacks.get("model.embed_tokens"))
        with torch.no_grad():
            emb = QuantizedEmbedding.from_embedding(old, bits, group, kernel, cfg.int4_format)
        emb.packed.quantized_by = cfg.pass_name
        _tie_quantized(model, emb)
        extra = {"embeddings": "tied", "embedding_modules": ["model.embed_tokens", "lm_head"],
                 "embedding_bytes_before": emb_before, "embedding_bytes_after": _module_bytes(emb)}
    elif plan == "untied":
        extra = {"embeddings": "untied", "embedding_modules": ["lm_head"],
                 "embedding_bytes_before": emb_before, "embedding_bytes_after": _module_bytes(model.lm_head),
                 "embedding_note": "untied: lm_head quantized as a Linear target; model.embed_tokens stays float"}
    return model, _report(cfg, "round-to-nearest", before, model, skipped, **extra, **fallback_report(fallbacks))


def restructure(model: nn.Module, cfg: _QuantConfig, record: dict) -> nn.Module:
    """Swap the recorded modules for empty quantized ones of the same shapes (works on the meta device)."""
    bits = record.get("bits", cfg.bits)
    group = record.get("group_size", cfg.group)
    kernel = record.get("kernel", "weight_only")  # absent: recorded before the option existed
    if kernel not in INT8_KERNELS:
        raise PassError(f"{cfg.pass_name}: cannot replay: the recorded report has kernel={kernel!r}; "
                        f"expected one of {list(INT8_KERNELS)} (was slmkit.json edited?)")
    fmt = record.get("format", "minmax")  # absent: recorded before the option existed
    if fmt not in INT4_FORMATS:
        raise PassError(f"{cfg.pass_name}: cannot replay: the recorded report has format={fmt!r}; "
                        f"expected one of {list(INT4_FORMATS)} (was slmkit.json edited?)")
    fallbacks = record.get("fallbacks", {})  # per-layer formats that differ from the pass's (layer_fallbacks)
    for name in record["modules"]:
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise PassError(f"{cfg.pass_name}: cannot replay quantization of {name}: it is a {type(old).__name__}")
        kw = dict(device=old.weight.device, dtype=old.weight.dtype)
        fb = fallbacks.get(name, {})
        layer_bits, layer_group = fb.get("bits", bits), fb.get("group_size", group)
        if layer_bits == 8:
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None,
                             kernel=fb.get("kernel", kernel), **kw)
        else:
            new = Int4Linear(old.in_features, old.out_features, old.bias is not None, layer_group, **kw)
        new.quantized_by = cfg.pass_name
        set_module(model, name, new)
    if record.get("embeddings") == "tied":
        old = model.model.embed_tokens
        if not isinstance(old, nn.Embedding):
            raise PassError(f"{cfg.pass_name}: cannot replay quantization of the tied embeddings: "
                            f"model.embed_tokens is a {type(old).__name__}")
        fb = fallbacks.get("model.embed_tokens", {})
        emb = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, fb.get("bits", bits),
                                 fb.get("group_size", group), kernel=fb.get("kernel", kernel),
                                 device=old.weight.device, dtype=old.weight.dtype)
        emb.packed.quantized_by = cfg.pass_name
        _tie_quantized(model, emb)
    return model


@register_pass("quant.int8", Int8Config, restructure=restructure)
def apply_int8(model: nn.Module, cfg: Int8Config, calib: Calibration | None = None) -> tuple[nn.Module, dict]:
    """Weight-only int8, symmetric per output channel, round-to-nearest (~1/4 of fp32 bytes).

    Scales are fp16 values (rounded up, codes computed after), so `slm export gguf` writes each module as an
    exact GGUF Q8_0 tensor."""
    return _apply_rtn(model, cfg)


@register_pass("quant.int4", Int4Config, restructure=restructure)
def apply_int4(model: nn.Module, cfg: Int4Config, calib: Calibration | None = None) -> tuple[nn.Module, dict]:
    """Weight-only int4, asymmetric per group with zero points, round-to-nearest (~1/8 of fp32 bytes).

    `format`: `minmax` (default; fp32 scales, which GGUF holds only approximately), `q4_0` (symmetric, z = 8,
    llama.cpp's scale rule, fp16 scales: exact GGUF Q4_0) or `q4_1` (minmax with 7-bit scales, so d = s and
    m = −z·s are exact fp16 values for z <= 15: exact GGUF Q4_1). See the module docstring."""
    return _apply_rtn(model, cfg)


# -- GPTQ --------------------------------------------------------------------------------------------------------

@dataclass
class QuantizedWeight:
    """Codes (out, in) — int8 in [-127, 127] or uint8 in [0, 15] —, scales (out,) or (out, groups),
    zero points (out, groups) for 4-bit, and the GPTQ objective Σ (w − ŵ)² / [H⁻¹]_qq / 2 it reached."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    loss: float
    damp: float

    def dequantize(self) -> torch.Tensor:
        if self.zeros is None:
            return self.codes.float() * self.scales.float()[:, None]
        g = self.codes.shape[1] // self.scales.shape[1]
        return ((self.codes.float() - self.zeros.float().repeat_interleave(g, 1))
                * self.scales.float().repeat_interleave(g, 1))


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
                 format: str = "minmax") -> QuantizedWeight:
    """Round-to-nearest in the same formats as GPTQ (the baseline GPTQ is compared with)."""
    if bits == 8:
        s = int8_scales(weight, torch.float32)
        return QuantizedWeight(quantize_int8(weight, s), s, None, float("nan"), 0.0)
    s, z = int4_params(weight, group_size, torch.float32, format)
    return QuantizedWeight(quantize_int4(weight, s, z), s, z, float("nan"), 0.0)
