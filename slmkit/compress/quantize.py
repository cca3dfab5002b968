"""Weight-only quantization passes: `quant.int8`, `quant.int4`, `quant.gptq`.

- `quant.int8`: symmetric per-output-channel int8, round-to-nearest (RTN). No calibration. ~1/4 of fp32.
- `quant.int4`: asymmetric int4 per group of `group_size` input columns with integer zero points, RTN.
  No calibration. ~1/8 of fp32 plus one scale and zero point per group.
- `quant.gptq`: the same two formats (bits=8 per channel, bits=4 grouped), with the codes chosen by GPTQ
  (Frantar et al., 2023) from calibration activations; see `gptq_quantize` for the algorithm.

Each pass swaps the target projections for `Int8Linear` / `Int4Linear` (`qlinear.py`), whose state dicts
are the packed on-disk form and whose CPU forward runs torch's packed weight-only kernels. Targets are
plain `nn.Linear` modules and pruned `SparseLinear` ones (quantize after pruning: a zero weight stays an
exact zero in both formats); modules of other types under a target name (e.g. low-rank factors) are skipped
and listed in the report. `lm_head` may be a target only when it is not tied to the input embeddings.

`embeddings=true` (quant.int8 / quant.int4 only) also quantizes the vocabulary matrix, round-to-nearest in
the pass's format (int4: groups of `group_size` along hidden_size, which it must divide):
- tied embeddings: `model.embed_tokens` becomes a `QuantizedEmbedding` holding the one packed (V, d) table
  and `lm_head` a `TiedQuantizedHead` computing logits from that same table (stored once, under
  `model.embed_tokens.packed.*`; nothing under `lm_head`);
- untied: `lm_head` is quantized as an ordinary target (Int8Linear / Int4Linear); the input embedding stays
  in float (a gather reads only T rows, so it costs bytes on disk, not time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import PROJECTIONS, Calibration, PassError, collect_inputs, decoder_layers, register_pass, set_module
from .qlinear import (INT4_QMAX, INT8_QMAX, QUANTIZED_LINEARS, Int4Linear, Int8Linear, QuantizedEmbedding,
                      TiedQuantizedHead, int4_params, int8_scales, quantize_int4, quantize_int8)

GROUP_SIZES = (32, 64, 128)
ALLOWED_TARGETS = (*PROJECTIONS, "lm_head")


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

    @property
    def group(self) -> int | None:
        """Group size of the stored format (None: one scale per output channel)."""
        return self.group_size if self.bits == 4 else None


@dataclass(frozen=True)
class Int8Config(_QuantConfig):
    """Round-to-nearest symmetric int8, one scale per output channel."""

    pass_name: ClassVar[str] = "quant.int8"
    allowed_bits: ClassVar[tuple[int, ...]] = (8,)
    bits: int = 8
    targets: tuple[str, ...] = PROJECTIONS
    embeddings: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        self._check_embeddings()

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

    def __post_init__(self) -> None:
        self._check_common()
        self._check_group()
        self._check_embeddings()


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

    def __post_init__(self) -> None:
        self._check_common()
        self._check_group()
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

def find_quant_targets(model: nn.Module, cfg: _QuantConfig) -> tuple[dict[str, nn.Linear], list[dict]]:
    """({name: Linear} to quantize, [skipped modules]); validates everything before any weight changes.

    With `embeddings=true` and tied embeddings, `lm_head` is never a Linear target (the tied table is
    quantized by `_quantize_tied_embeddings`); untied, `lm_head` joins the targets."""
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
        g = cfg.group
        if g is not None and module.in_features % g:
            raise PassError(f"{cfg.pass_name}: group_size={g} does not divide in_features={module.in_features} of "
                            f"{name}; choose a group_size dividing it, or drop {name.rsplit('.', 1)[-1]} from targets")
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
    g = cfg.group
    if g is not None and emb.embedding_dim % g:
        raise PassError(f"{cfg.pass_name}: group_size={g} does not divide hidden_size={emb.embedding_dim} of the "
                        "tied embeddings (embeddings=true); choose a group_size dividing it, or set embeddings=false")
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
    return {"modules": list(before), "bits": cfg.bits, "group_size": cfg.group,
            "scheme": "symmetric per-channel" if cfg.bits == 8 else "asymmetric per-group, integer zero point",
            "method": method, "target_bytes_before": sum(before.values()), "target_bytes_after": sum(after.values()),
            "skipped": skipped, **extra}


def _quantized_module(linear: nn.Linear, cfg: _QuantConfig, codes: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor | None, pass_name: str) -> nn.Module:
    if cfg.bits == 8:
        m = Int8Linear.from_codes(linear, codes, scales)
    else:
        m = Int4Linear.from_codes(linear, codes, scales, zeros, cfg.group)
    m.quantized_by = pass_name
    return m


# -- round to nearest --------------------------------------------------------------------------------------

def _apply_rtn(model: nn.Module, cfg: _QuantConfig) -> tuple[nn.Module, dict]:
    targets, skipped = find_quant_targets(model, cfg)
    plan = embedding_plan(model, cfg)
    before = {n: _module_bytes(m) for n, m in targets.items()}
    extra: dict[str, Any] = {}
    if plan == "tied":
        emb_before = _module_bytes(model.model.embed_tokens)
    elif plan == "untied":
        emb_before = _module_bytes(model.lm_head)
    for name, linear in targets.items():
        with torch.no_grad():
            new = Int8Linear.from_linear(linear) if cfg.bits == 8 else Int4Linear.from_linear(linear, cfg.group)
        new.quantized_by = cfg.pass_name
        set_module(model, name, new)
    if plan == "tied":
        with torch.no_grad():
            emb = QuantizedEmbedding.from_embedding(model.model.embed_tokens, cfg.bits, cfg.group)
        emb.packed.quantized_by = cfg.pass_name
        _tie_quantized(model, emb)
        extra = {"embeddings": "tied", "embedding_modules": ["model.embed_tokens", "lm_head"],
                 "embedding_bytes_before": emb_before, "embedding_bytes_after": _module_bytes(emb)}
    elif plan == "untied":
        extra = {"embeddings": "untied", "embedding_modules": ["lm_head"],
                 "embedding_bytes_before": emb_before, "embedding_bytes_after": _module_bytes(model.lm_head),
                 "embedding_note": "untied: lm_head quantized as a Linear target; model.embed_tokens stays float"}
    return model, _report(cfg, "round-to-nearest", before, model, skipped, **extra)


def restructure(model: nn.Module, cfg: _QuantConfig, record: dict) -> nn.Module:
    """Swap the recorded modules for empty quantized ones of the same shapes (works on the meta device)."""
    bits = record.get("bits", cfg.bits)
    group = record.get("group_size", cfg.group)
    for name in record["modules"]:
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise PassError(f"{cfg.pass_name}: cannot replay quantization of {name}: it is a {type(old).__name__}")
        kw = dict(device=old.weight.device, dtype=old.weight.dtype)
        if bits == 8:
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, **kw)
        else:
            new = Int4Linear(old.in_features, old.out_features, old.bias is not None, group, **kw)
        new.quantized_by = cfg.pass_name
        set_module(model, name, new)
    if record.get("embeddings") == "tied":
        old = model.model.embed_tokens
        if not isinstance(old, nn.Embedding):
            raise PassError(f"{cfg.pass_name}: cannot replay quantization of the tied embeddings: "
                            f"model.embed_tokens is a {type(old).__name__}")
        emb = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, bits, group,
                                 device=old.weight.device, dtype=old.weight.dtype)
        emb.packed.quantized_by = cfg.pass_name
        _tie_quantized(model, emb)
    return model


@register_pass("quant.int8", Int8Config, restructure=restructure)
def apply_int8(model: nn.Module, cfg: Int8Config, calib: Calibration | None = None) -> tuple[nn.Module, dict]:
    """Weight-only int8, symmetric per output channel, round-to-nearest (~1/4 of fp32 bytes)."""
    return _apply_rtn(model, cfg)


@register_pass("quant.int4", Int4Config, restructure=restructure)
def apply_int4(model: nn.Module, cfg: Int4Config, calib: Calibration | None = None) -> tuple[nn.Module, dict]:
    """Weight-only int4, asymmetric per group with zero points, round-to-nearest (~1/8 of fp32 bytes)."""
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


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest in the same formats as GPTQ (the baseline GPTQ is compared with)."""
    if bits == 8:
        s = int8_scales(weight, torch.float32)
        return QuantizedWeight(quantize_int8(weight, s), s, None, float("nan"), 0.0)
    s, z = int4_params(weight, group_size, torch.float32)
    return QuantizedWeight(quantize_int4(weight, s, z), s, z, float("nan"), 0.0)


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), raising damp tenfold (up to
    three times) when H is numerically not positive definite. Returns (U, damp used)."""
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp = min(damp * 10, 1.0)
    raise PassError("quant.gptq: the calibration Hessian is not positive definite even with damp="
                    f"{damp}; use more calibration samples or a larger damp")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int | None = 128,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128) -> QuantizedWeight:
    """GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, 2023, "GPTQ: Accurate Post-Training Quantization for
    Generative Pre-trained Transformers").

    Goal: choose codes for W (rows × cols) minimising the layer's output error ‖WX − ŴX‖² over calibration
    inputs X (cols × n), whose Hessian with respect to any one row is H = 2XXᵀ (the same for every row,
    which is what makes the method cheap). It descends from Optimal Brain Surgeon: quantize one input column
    q at a time, then move all not-yet-quantized columns F to compensate,

        δ_F = −(w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q},

    where H_F⁻¹ is the inverse Hessian restricted to the remaining columns. Three observations make it
    practical:
    1. Order barely matters for large layers, so every row uses the same column order and shares one
       H_F⁻¹ sequence. Removing column q from H⁻¹ is a Gaussian elimination step, and the rows of the
       successive H_F⁻¹ needed are exactly the rows of the upper Cholesky factor U of H⁻¹ (scaled by its
       diagonal). So: factor once, then err = (w_q − ŵ_q) / U_qq and W_{:,q:} −= err · U_{q,q:}.
    2. Lazy batch updates: within a block of B columns the updates touch only the block; the accumulated
       errors E (rows × B) reach the columns after the block in one matrix product W −= E · U_{block,rest},
       turning a memory-bound rank-1 loop into compute-bound GEMMs.
    3. Damping: H + λI with λ = `damp` · mean(diag H) keeps the factorisation stable; dead inputs (a zero
       diagonal) get H_qq = 1 and their weights set to 0, since they never contribute.

    Activation order (`act_order`, the paper's "desc_act"): process columns by decreasing H_qq, so the
    columns fed by the loudest inputs are quantized first, while many columns remain to absorb their error.
    Groups then are not contiguous in processing order; to keep the stored format (contiguous groups in the
    original column order, one scale/zero per group) the group parameters are fixed up front from the
    original weights ("static groups"). Without act_order, a group's scale and zero point are fitted when
    its first column is reached, from the columns as already updated by the errors of earlier ones.

    8-bit uses one symmetric scale per row fitted from the original row; 4-bit one asymmetric scale and
    integer zero point per group of `group_size` columns. With H ∝ I (uncorrelated, equal-variance inputs)
    U is diagonal, nothing is propagated, and the result equals round-to-nearest.
    """
    W = weight.detach().float().clone()  # (rows, cols)
    rows, cols = W.shape
    if bits == 4 and (cols % group_size or block_size % group_size):
        raise ValueError(f"group_size={group_size} must divide in_features={cols} and block_size={block_size}")
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    grouped = bits == 4
    g = group_size if grouped else cols

    if grouped:
        scales = torch.empty(rows, cols // g, device=W.device)
        zeros = torch.empty(rows, cols // g, dtype=torch.uint8, device=W.device)
    else:
        scales, zeros = int8_scales(W, torch.float32), None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        if grouped:  # static groups, fitted from the original weights in the original order
            scales, zeros = int4_params(W, g, torch.float32)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    group_of = perm // g  # group (in the stored order) of each processed column

    U, damp_used = _inverse_hessian_factor(H, damp)
    del H
    codes = torch.empty(rows, cols, dtype=torch.int16, device=W.device)  # in processing order
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B): the block, updated column by column
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            gi = int(group_of[col])
            if grouped and not act_order and col % g == 0:  # fit the group when its first column is reached
                s_g, z_g = int4_params(W1[:, i:i + g], g, torch.float32)
                scales[:, gi], zeros[:, gi] = s_g[:, 0], z_g[:, 0]
            if grouped:
                s, z = scales[:, gi], zeros[:, gi].float()
                q = torch.clamp(torch.round(w / s) + z, 0, INT4_QMAX)
                w_hat = (q - z) * s
            else:
                q = torch.clamp(torch.round(w / scales), -INT8_QMAX, INT8_QMAX)
                w_hat = q * scales
            codes[:, col] = q.to(torch.int16)
            d = U1[i, i]
            loss += (w - w_hat) ** 2 / d ** 2 / 2
            err = (w - w_hat) / d  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of every later column

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    codes = codes.to(torch.uint8 if grouped else torch.int8)
    return QuantizedWeight(codes, scales, zeros, float(loss.sum()), damp_used)


class _HessianAccumulator:
    """Σ xxᵀ over calibration rows for several modules; modules fed the very same tensor in one forward
    (q/k/v, gate/up) share one product per batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._batch: list[tuple[torch.Tensor, list[str]]] = []

    def hook(self, name: str):
        def fn(module, args):
            x = args[0]
            for seen, names in self._batch:
                if seen is x:  # identity, not equality: the same activation object
                    names.append(name)
                    return
            self._batch.append((x, [name]))
        return fn

    def flush(self) -> None:
        for x, names in self._batch:
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
            xtx = x2.t() @ x2
            for n in names:
                if n in self.sums:
                    self.sums[n] += xtx
                else:
                    self.sums[n] = xtx.clone()
                self.rows[n] = self.rows.get(n, 0) + x2.shape[0]
        self._batch.clear()

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2/n · XᵀX; a module that saw no calibration rows (an expert no token was routed to) gets
        H = I, for which GPTQ reduces to round-to-nearest."""
        if not self.rows.get(name):
            m = self.modules[name]
            return torch.eye(m.in_features, device=m.weight.device)
        return self.sums.pop(name) * (2.0 / self.rows[name])


# Within a decoder layer, projections whose inputs depend on earlier projections of the same layer are
# quantized after them ("true sequential"): q/k/v, then o, then gate/up, then down.
_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class _StopForward(Exception):
    pass


def _capture_first_layer_inputs(model: nn.Module, first: nn.Module, calib: Calibration) -> list[tuple]:
    """(args, kwargs) of the first decoder layer for every calibration batch; the forward stops there."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in calib.batches():
                try:
                    model(ids.to(device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _stages(layer_targets: dict[str, nn.Module]) -> list[list[str]]:
    order = {short: i for i, stage in enumerate(_STAGES) for short in stage}
    by_stage: dict[int, list[str]] = {}
    for name in layer_targets:
        by_stage.setdefault(order.get(name.rsplit(".", 1)[-1], len(_STAGES)), []).append(name)
    return [by_stage[k] for k in sorted(by_stage)]


@register_pass("quant.gptq", GPTQConfig, needs_calibration=True, restructure=restructure)
def apply_gptq(model: nn.Module, cfg: GPTQConfig, calib: Calibration | None = None) -> tuple[nn.Module, dict]:
    """GPTQ weight quantization (int8 per channel or int4 grouped) from calibration activations."""
    if calib is None:
        raise PassError("quant.gptq: needs calibration data (input Hessians); pass a Calibration / --data DATASET")
    targets, skipped = find_quant_targets(model, cfg)
    before = {n: _module_bytes(m) for n, m in targets.items()}
    layers_report: dict[str, dict] = {}

    def quantize(name: str, H: torch.Tensor, X_rows: int) -> None:
        linear = targets[name]
        qw = gptq_quantize(linear.weight, H, bits=cfg.bits, group_size=cfg.group, act_order=cfg.act_order,
                           damp=cfg.damp, block_size=cfg.block_size)
        scales = qw.scales.to(linear.weight.dtype)
        set_module(model, name, _quantized_module(linear, cfg, qw.codes, scales, qw.zeros, cfg.pass_name))
        layers_report[name] = {"loss": qw.loss, "damp": qw.damp, "calibration_rows": X_rows}

    try:
        layers = list(decoder_layers(model))
    except AttributeError:
        layers = []
    done: set[str] = set()
    with torch.no_grad():
        if layers:
            inputs = _capture_first_layer_inputs(model, layers[0], calib)
            owner = {id(sub): i for i, layer in enumerate(layers) for sub in layer.modules()}
            for i, layer in enumerate(layers):
                here = {n: m for n, m in targets.items() if owner.get(id(m)) == i}
                for stage in _stages(here):
                    acc = _HessianAccumulator({n: here[n] for n in stage})
                    handles = [here[n].register_forward_pre_hook(acc.hook(n)) for n in stage]
                    try:
                        for args, kwargs in inputs:
                            layer(*args, **kwargs)
                            acc.flush()
                    finally:
                        for h in handles:
                            h.remove()
                    for n in stage:
                        quantize(n, acc.hessian(n), acc.rows.get(n, 0))
                        done.add(n)
                if i + 1 < len(layers):  # the next layer sees this one's quantized output
                    inputs = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
            del inputs
        rest = {n: m for n, m in targets.items() if n not in done}
        if rest:  # outside the decoder layers (lm_head): one full forward through the quantized model
            acc = _HessianAccumulator(rest)

            def observe(name: str, x: torch.Tensor) -> None:
                acc._batch.append((x, [name]))
                acc.flush()

            collect_inputs(model, rest, calib, observe)
            for n in rest:
                quantize(n, acc.hessian(n), acc.rows.get(n, 0))
    order = "descending Hessian diagonal (act_order)" if cfg.act_order else "natural"
    return model, _report(cfg, "gptq", before, model, skipped, act_order=cfg.act_order, damp=cfg.damp,
                          block_size=cfg.block_size, column_order=order, layers=layers_report,
                          calibration="sequential by decoder layer and by projection stage inside each layer "
                                      "(each stage sees the already-quantized ones before it)")
