"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): the `quant.gptq` pass and the column-by-column quantizer behind it. The formats, modules and
config are those of `quantize.py`; only how the integer codes are chosen differs, and a layer whose width
`group_size` does not divide falls back per layer exactly as in `quant.int4` (`quantize.layer_fallbacks`).

Speed (SmolLM2's layer shapes, 4 bits, group 64, on a shared 2-core machine: ~20 s per decoder layer before,
~7 s on 2 threads and ~2.3 s on 1 thread now; `benchmarks/gptq_speed.py`), with the same codes:
- the column loop works on a transposed copy of each block, so a column is a contiguous row, in a handful of
  in-place operations, on one thread (`_one_thread`): thousands of operations on a few thousand values each gain
  nothing from a second thread and lose a lot when it has to wait for a busy core; the Hessian factorisation runs
  on one thread too (multi-threaded LAPACK also made the factor's last bits depend on the thread count);
- a stage's calibration forward stops once every module of the stage has its input (q/k/v need only the
  normalised input), and quantized modules are stood in for by float Linears holding their dequantized weight
  until the pass ends, so later forwards do not dequantize them again.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .base import Calibration, PassError, collect_inputs, decoder_layers, pass_progress, register_pass, set_module
from .qlinear import INT4_QMAX, INT8_QMAX, int4_params, int8_scales
from .quantize import (GPTQConfig, QuantizedWeight, _module_bytes, _quantized_module, _report, fallback_report,
                       find_quant_targets, layer_fallbacks, layer_format, restructure)


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), raising damp tenfold (up to
    three times) when H is numerically not positive definite. Returns (U, damp used)."""
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        with _one_thread():  # multi-threaded LAPACK here ran 2.2 s per 576x576 call on a busy 2-core machine, 0.03 s on one
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
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  format: str = "minmax") -> QuantizedWeight:
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

    8-bit uses one symmetric scale per row fitted from the original row (an fp16 value: GGUF Q8_0); 4-bit one
    scale and integer zero point per group of `group_size` columns, fitted as `format` says (`minmax`, or the
    GGUF-exact `q4_0` / `q4_1`: `qlinear.int4_params`). With H ∝ I (uncorrelated, equal-variance inputs)
    U is diagonal, nothing is propagated, and the result equals round-to-nearest.
    """
    W = weight.detach().float().clone()  # (rows, cols)
    sdtype = weight.dtype  # scales are rounded to values this dtype (their storage) holds exactly
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
        scales, zeros = int8_scales(W, sdtype).float(), None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        if grouped:  # static groups, fitted from the original weights in the original order
            scales, zeros = int4_params(W, g, sdtype, format)
            scales = scales.float()
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    group_of = perm // g  # group (in the stored order) of each processed column

    U, damp_used = _inverse_hessian_factor(H, damp)
    del H
    groups = group_of.tolist()
    if grouped and act_order:  # static groups: each column reads its group's row of these
        s_rows, z_rows = scales.t().contiguous(), zeros.t().float().contiguous()  # (groups, rows)
    codes = torch.empty(cols, rows, dtype=torch.int16, device=W.device)  # row c: codes of processed column c
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # (B, rows) each, one row per column of the block: its codes, its w − ŵ, its error scaled by 1/U_qq
        Q1, R1, E1 = (torch.empty(i2 - i1, rows, device=W.device) for _ in range(3))
        with _one_thread():
            W1 = W[:, i1:i2].t().contiguous()  # (B, rows): column i of the block is the contiguous row W1[i]
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                w, q, r = W1[i], Q1[i], R1[i]
                if grouped:
                    if act_order:
                        s, z = s_rows[groups[col]], z_rows[groups[col]]
                    elif col % g == 0:  # fit the group when its first column is reached
                        s_g, z_g = int4_params(W1[i:i + g].t(), g, sdtype, format)  # (rows, 1) each
                        s, z = s_g[:, 0].float(), z_g[:, 0].float()
                        scales[:, groups[col]], zeros[:, groups[col]] = s, z_g[:, 0]
                    torch.div(w, s, out=q).round_().add_(z).clamp_(0, INT4_QMAX)
                    torch.sub(q, z, out=r).mul_(s)  # ŵ
                else:
                    torch.div(w, scales, out=q).round_().clamp_(-INT8_QMAX, INT8_QMAX)
                    torch.mul(q, scales, out=r)  # ŵ
                torch.sub(w, r, out=r)  # w − ŵ
                torch.div(r, U1[i, i], out=E1[i])  # (rows,)
                W1[i:] -= U1[i, i:, None] * E1[i]  # (B − i, rows): the rank-1 update of the block's later columns
        codes[i1:i2] = Q1
        loss += (R1.pow_(2) / U1.diagonal()[:, None].pow(2) / 2).sum(0)  # Σ (w − ŵ)² / U_qq² / 2
        W[:, i2:] -= E1.t().contiguous() @ U[i1:i2, i2:]  # lazy batch update of every later column

    codes = codes[torch.argsort(perm)].t()  # back to the original column order: (rows, cols)
    codes = codes.to(torch.uint8 if grouped else torch.int8).contiguous()
    return QuantizedWeight(codes, scales, zeros, float(loss.sum()), damp_used)


@contextmanager
def _one_thread():
    """Run the per-column work on one thread. Its operations touch a few thousand values each, thousands of times
    per matrix: split over threads they cost more in wake-ups than they save, and on a 2-core machine shared with
    other work a waiting thread stalls every one of them (measured: 1536x576 at 4 bits, 0.5 s on one thread,
    4-8 s on two). The block's matrix product after the loop still uses every thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _HessianAccumulator:
    """Σ xxᵀ over calibration rows for several modules; modules fed the very same tensor in one forward
    (q/k/v, gate/up) share one product per batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._batch: list[tuple[torch.Tensor, list[str]]] = []

    def hook(self, name: str, *, stop_when_complete: bool = False):
        """A forward pre-hook recording `name`'s input; with `stop_when_complete`, once every module of the
        accumulator has its input for this batch it raises `_StopForward`: the rest of the forward is not needed."""
        def fn(module, args):
            self._record(name, args[0])
            if stop_when_complete and sum(len(names) for _, names in self._batch) == len(self.modules):
                raise _StopForward
        return fn

    def _record(self, name: str, x: torch.Tensor) -> None:
        for seen, names in self._batch:
            if seen is x:  # identity, not equality: the same activation object
                names.append(name)
                return
        self._batch.append((x, [name]))

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
    """GPTQ weight quantization (int8 per channel or int4 grouped) from calibration activations.

    `format` (bits=4): `minmax`, `q4_0` or `q4_1`, as in quant.int4 (the last two export exactly to GGUF)."""
    if calib is None:
        raise PassError("quant.gptq: needs calibration data (input Hessians); pass a Calibration / --data DATASET")
    targets, skipped = find_quant_targets(model, cfg)
    fallbacks = layer_fallbacks({n: m.in_features for n, m in targets.items()}, cfg)
    before = {n: _module_bytes(m) for n, m in targets.items()}
    layers_report: dict[str, dict] = {}

    packed: dict[str, nn.Module] = {}

    def quantize(name: str, H: torch.Tensor, X_rows: int) -> None:
        """GPTQ for one module. Until the pass ends, the model holds a float Linear with the dequantized weight
        in its place: later calibration forwards then compute exactly what the quantized module's dense path
        computes (its path for more than KERNEL_MAX_ROWS rows), without dequantizing it again on every call. MoE
        experts routed at most that many rows used to take the decode kernels here, bf16 and chosen by timing;
        they now get the exact product too. An int8 `dynamic` module stays itself: it quantizes activations at
        every size, and later stages calibrate on what it outputs."""
        linear = targets[name]
        fmt = layer_format(cfg, fallbacks.get(name))  # a fallback group divides group_size, so block_size too
        qw = gptq_quantize(linear.weight, H, bits=fmt[0], group_size=fmt[1], act_order=cfg.act_order,
                           damp=cfg.damp, block_size=cfg.block_size, format=cfg.int4_format)
        scales = qw.scales.to(linear.weight.dtype)
        packed[name] = _quantized_module(linear, fmt, qw.codes, scales, qw.zeros, cfg.pass_name)
        if getattr(packed[name], "kernel", None) == "dynamic":  # W8A8 at every size: later stages see its outputs
            set_module(model, name, packed[name])
            layers_report[name] = {"loss": qw.loss, "damp": qw.damp, "calibration_rows": X_rows}
            return
        stand_in = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)
        # the module's own dequantization, without unpacking the codes it was just given (same arithmetic in fp32)
        dense = qw.dequantize() if linear.weight.dtype == torch.float32 else packed[name].dequantize()
        stand_in.weight.data = dense.to(linear.weight.device)
        if linear.bias is not None:
            stand_in.bias.data = linear.bias.detach()
        set_module(model, name, stand_in.requires_grad_(False))
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
            advance = pass_progress("GPTQ (decoder layers)", len(layers))
            for i, layer in enumerate(layers):
                here = {n: m for n, m in targets.items() if owner.get(id(m)) == i}
                for stage in _stages(here):
                    acc = _HessianAccumulator({n: here[n] for n in stage})
                    handles = [here[n].register_forward_pre_hook(acc.hook(n, stop_when_complete=True))
                               for n in stage]
                    try:
                        for args, kwargs in inputs:
                            try:
                                layer(*args, **kwargs)  # stops once the stage's inputs are all seen
                            except _StopForward:
                                pass
                            acc.flush()
                    finally:
                        for h in handles:
                            h.remove()
                    for n in stage:
                        quantize(n, acc.hessian(n), acc.rows.get(n, 0))
                        done.add(n)
                if i + 1 < len(layers):  # the next layer sees this one's quantized output
                    inputs = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
                advance(1)
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
    for name, module in packed.items():
        set_module(model, name, module)
    order = "descending Hessian diagonal (act_order)" if cfg.act_order else "natural"
    return model, _report(cfg, "gptq", before, model, skipped, act_order=cfg.act_order, damp=cfg.damp,
                          block_size=cfg.block_size, column_order=order, layers=layers_report,
                          calibration="sequential by decoder layer and by projection stage inside each layer "
                                      "(each stage sees the already-quantized ones before it)",
                          **fallback_report(fallbacks))
