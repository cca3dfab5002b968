"""Weight-only quantized Linear layers and the routines that pack their weights.

Two drop-in replacements for `nn.Linear` (the gpt-fast pattern: a module, a function that swaps it in,
an offline routine that computes the packed weights):

- `Int8Linear`: symmetric per-output-channel int8, w = q · s with q in [-127, 127]. State dict:
  `weight_int8` (out, in) int8 and `scales` (out,) in the activation dtype — 1 byte per weight.
- `Int4Linear`: asymmetric group-wise int4 with integer zero points, w = (q − z) · s for each group of
  `group_size` consecutive input columns, q and z in [0, 15]. State dict (the portable on-disk layout):
  `weight_int4` (out, in/2) uint8 — column 2j in the low nibble, column 2j+1 in the high nibble —,
  `scales` (out, in/group) in the activation dtype and `zeros` (out, in/group) uint8: 0.5 byte per weight.

Scales are chosen so that llama.cpp's GGUF blocks (32 consecutive weights of a row, fp16 parameters) hold the
same numbers, and `slm export gguf` writes the codes as they are (`slmkit/export/gguf_blocks.py`):
- int8 scales are rounded *up* to an fp16 value before the codes are computed (`round_scale_up`): every
  32-block of row r is then a GGUF Q8_0 block with d = s_r. Rounding up keeps |w|/s ≤ 127 (no clamping) and
  grows the step by at most 2^-10 of itself.
- int4 has three ways to fit a group's parameters (`INT4_FORMATS`, the passes' `format` option); the stored
  layout is the same for all three:
  `minmax`: the group's range [min(w, 0), max(w, 0)] in 15 steps, s in the storage dtype (fp32 scales: GGUF
  holds them only approximately);
  `q4_0`: symmetric, z = 8 and s = (the value of largest magnitude) / −8, llama.cpp's rule (s is negative when
  that value is positive: the grid −8..7 then spends its extra level on it), |s| rounded up to fp16 — exactly a
  GGUF Q4_0 block, w = (q − 8) · d;
  `q4_1`: `minmax` with s rounded up to 7 significant bits (a · 2^k, a < 128, k ≥ −24): then s and −z · s
  (z ≤ 15, so z · a < 2^11) are both exact fp16 values, which is a GGUF Q4_1 block, w = q · d + m with d = s
  and m = −z · s. The step grows by at most 2^-6 of itself against `minmax`.
  A group size that is a multiple of 32 splits into 32-blocks that repeat the group's parameters.

Forward on the CPU uses torch's packed weight-only kernels, `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`. The int4 kernel wants its own, machine-specific tile layout
(`aten._convert_weight_to_int4pack_for_cpu`) and one (in/group, out, 2) tensor of scales and zeros in
the convention w = (q − 8) · s + zero; both are derived lazily on the first CPU forward and cached in a
plain (non-state) attribute, so checkpoints stay portable. Zero points convert exactly: zero = (8 − z) · s.

Two measured facts (AMD EPYC, AVX2, torch 2.13, one thread) shape the dispatch:
- the kernels' fp32-activation path is scalar: 4-7x *slower* than an fp32 matmul, while their bf16 path
  is 2-3x faster than fp32 for a 1024→4096 layer at batch 1. So fp32 activations run the kernel in
  `kernel_dtype` (bf16 by default; ~0.3% relative rounding, result cast back to fp32). Set
  `module.kernel_dtype = torch.float32` (or on the class) for bit-faithful fp32 kernel results;
- for many rows (prefill, evaluation, calibration) dequantize-then-matmul beats both kernels, so the
  kernels only serve inputs of at most `KERNEL_MAX_ROWS` rows; larger inputs, CUDA, autograd, and shapes
  a kernel rejects take the exact dequantize-then-matmul path in the activation dtype;
- for small layers the kernels lose to a plain fp32 matmul even at batch 1 (128x128: 31 us int4, 33 us int8,
  35 us int8 dynamic against 10 us fp32; 768x2048: 281 / 169 / 79 against 167 us), because their fixed cost per
  call dominates. So decode-sized inputs go through a choice, `kernel_choice` (per module or on the class):
  `packed` (the kernel), `dense` (F.linear with a dequantized copy of the weight, cached like the kernel
  tensors: the exact reference, 4 bytes per weight in memory) or `auto` (default): both are timed on the first
  such input (min of 5 interleaved calls; one row and several rows are measured apart) and `dense` is kept
  only if it is at least 10% faster, and only for layers of at most `DENSE_MAX_WEIGHTS` weights. The file on
  disk is the same either way: the choice trades a little memory for speed where a kernel does not pay.

`Int8Linear` has a second execution path, `kernel="dynamic"`: W8A8 with activations quantized on the fly per
row (per token, asymmetric, 7 bits; Jacob et al., 2018 for the integer arithmetic, per-token scales as in
LLM.int8()/SmoothQuant), multiplied in integers against the same stored int8 codes by fbgemm
(`quantized::linear_dynamic`, int32 accumulation) and rescaled to fp32. fbgemm quantizes its input *per
tensor*; a shared step over a whole (B·T, in) batch cost a trained model 2.4% bits/byte (60% on memorized
text), so each row is first mapped onto [-1, 1] by its own midpoint and half-range, x' = (x − m)/h, and
y = h · (W x') + m · W·1: every row gets its own step whatever else is in the batch. (A single row goes to fbgemm as
it is: per tensor is then per row, with the range widened to contain 0 — the same step for the usual row that
has both signs, a grid that may sit differently by a fraction of a step.) Error: each activation moves by at
most half a step, so |y_j − ŷ_j| ≤ (max(x, 0) − min(x, 0))/254 · ‖w_j‖₁ per row. 7 bits, not 8: without
AVX-512 VNNI, fbgemm sums pairs of u8·s8 products in saturating int16 (`vpmaddubsw`); 255·127·2 overflows (we
measured 49% errors on an all-positive input), 127·127·2 cannot. On the AVX2 EPYC, one thread, it was 1.3x
(768→768) to 4.7x (768→8192) faster than an fp32 matmul at batch 1, 2.4-7.8x at batch 8, and ~1.7x at 512
rows, so it serves every row count. The fbgemm weight object and the row sums W·1 are built from `weight_int8`
and `scales` on first use and cached like the other derived tensors (an extra int8 copy of the weight in
memory; never in the state dict). Where fbgemm is missing (non-x86 builds, another
`torch.backends.quantized.engine`), on CUDA and under autograd the module takes the weight-only path instead:
the value the dynamic kernel approximates.

slmkit's own C kernels (`cpu_kernels`, llama.cpp's Q4 x Q8 and Q8 x Q8 design: each activation row rounded
per block of 32 columns to int8 with its own scale, integer dot products, AVX2 with a scalar fallback, built
on first use) take over where they are available: `Int4Linear` runs decode-sized inputs through
`cpu_kernels.q4_gemv` (2x torch's int4 kernel on the AVX2 EPYC at 1-16 rows), and `Int8Linear(kernel=
"dynamic")` runs inputs of up to KERNEL_MAX_ROWS rows through `cpu_kernels.q8_gemv` and larger inputs through
the exact dequantize-then-matmul path, so fbgemm's per-row 7-bit activations serve only where no C compiler
was found. Why: on SmolLM2-135M, whose activations have outlier channels, fbgemm's one step per row cost +8.7%
negative log-likelihood against +0.1% for weight-only int8, while one step per block of 32 keeps an outlier
from coarsening the rest of its row. The error of both C kernels is bounded in `cpu_kernels`' docstring.
`use_cpu_kernels = False` or `kernel_dtype = torch.float32` (per module or on the class) keeps torch's and
fbgemm's kernels (for int4, torch's kernel in fp32: no activation rounding).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

KERNEL_MAX_ROWS = 16  # decode-sized inputs use the packed kernels; larger ones dequantize once per call
KERNEL_CHOICES = ("auto", "packed", "dense")
# `auto` may keep a dequantized copy of layers up to this size (1 MiB in fp32). Larger ones stay packed: in a
# real decode step the other layers have pushed them out of the cache, and reading 4x fewer bytes is what
# pays there, which a hot-cache timing of the layer alone cannot see.
DENSE_MAX_WEIGHTS = 1 << 18
TUNE_TRIALS = 5
TUNE_MARGIN = 0.9  # `dense` must be at least 10% faster to be chosen
INT8_QMAX = 127
INT4_QMAX = 15
INT4_KERNEL_OFFSET = 8  # torch's int4 kernel computes w = (q - 8) * scale + zero
INT8_KERNELS = ("weight_only", "dynamic")  # how an Int8Linear multiplies (the stored format is the same)
INT4_FORMATS = ("minmax", "q4_0", "q4_1")  # how int4 group parameters are fitted (the stored layout is the same)
FP16_BITS = 11  # significant bits of an IEEE half (10 stored + the implicit one)
FP16_MIN_EXPONENT = -24  # fp16's smallest subnormal is 2^-24: every a · 2^k with k >= -24, a < 2^11 is a half
Q4_1_SCALE_BITS = FP16_BITS - 4  # a 7-bit scale times a 4-bit zero point still fits fp16's 11 bits
_SIGNIFICANT_BITS = {torch.float32: 24, torch.float64: 53, torch.float16: 11, torch.bfloat16: 8}

_PREFILL = threading.local()  # `prompt_prefill()`'s flag, per thread (the serving engine prefills on its own)


@contextlib.contextmanager
def prompt_prefill():
    """Inside, on CPUs that multiply bf16 natively (AVX-512 BF16 or AMX; elsewhere nothing changes), quantized
    layers multiply many-row fp32 inputs in bf16: the exact dequantized weight and the activations rounded to
    bf16, accumulated in fp32 by oneDNN, the result back in fp32. That is what a prompt's prefill needs (the
    decode kernels round activations to int8 per block of 32, a coarser step); evaluation, calibration and
    everything outside this context keep the exact fp32 product. `generate` and the serving engine prefill
    inside it."""
    from ..train.loop import cpu_has_fast_bf16

    before = getattr(_PREFILL, "bf16", False)
    _PREFILL.bf16 = cpu_has_fast_bf16()
    try:
        yield
    finally:
        _PREFILL.bf16 = before


# -- offline packing ---------------------------------------------------------------------------------

def round_scale_up(s: torch.Tensor, bits: int = FP16_BITS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """|s| rounded up, sign kept, to the nearest a · 2^k with integers 0 <= a < 2^bits and k >= -24, returned in
    `dtype` (default: s's). With bits <= 11 that is an exact fp16 value (up to fp16's largest, 65504), and an exact
    value of any float type with at least `bits` significant bits: `bits` is capped at the storage dtype's
    (bf16: 8), so the result is exact in both. Rounding the magnitude up means a grid fitted to cover a range
    still covers it."""
    dtype = dtype or s.dtype
    bits = min(bits, _SIGNIFICANT_BITS.get(dtype, bits))
    x = s.detach().double()
    _, exponent = torch.frexp(x.abs())  # |x| = m · 2^e, m in [0.5, 1): 2^(e-1) <= |x| < 2^e
    ulp = torch.exp2((exponent - bits).clamp(min=FP16_MIN_EXPONENT).double())  # `bits` significant bits
    return (torch.ceil(x.abs() / ulp) * ulp * torch.sign(x)).to(dtype)


def int8_scales(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric per-output-channel scales (out,), rounded up to fp16 values that the storage dtype holds exactly
    (GGUF Q8_0's d; see the module docstring). weight: (out, in)."""
    s = weight.detach().float().abs().amax(dim=1) / INT8_QMAX
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row quantizes to zeros with any scale
    return round_scale_up(s, FP16_BITS, dtype or weight.dtype)


def quantize_int8(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest int8 codes (out, in) for per-row `scales` (out,)."""
    q = torch.round(weight.detach().float() / scales.float()[:, None])
    return q.clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)


def check_int4_format(fmt: str, where: str = "int4") -> str:
    if fmt not in INT4_FORMATS:
        raise ValueError(f"{where}: format={fmt!r} must be one of {list(INT4_FORMATS)}")
    return fmt


def int4_params(weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None,
                format: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zero points per group, each (out, in/group), fitted as `format` says (`INT4_FORMATS`,
    module docstring).

    `minmax` and `q4_1`: the range always contains 0 (as GPTQ's quantizer does) so the zero point is an integer
    in [0, 15] and an exact zero weight stays exactly zero. `q4_0`: z = 8, so zero is a grid point too."""
    check_int4_format(format)
    dtype = dtype or weight.dtype
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    if format == "q4_0":
        idx = w.abs().argmax(dim=2, keepdim=True)
        s = torch.gather(w, 2, idx).squeeze(2) / -(INT4_KERNEL_OFFSET)  # the largest magnitude lands on code 0
        s = torch.where(s != 0, s, torch.ones_like(s))
        s = round_scale_up(s, FP16_BITS, dtype)
        return s, torch.full(s.shape, INT4_KERNEL_OFFSET, dtype=torch.uint8, device=s.device)
    lo = w.amin(dim=2).clamp(max=0)
    hi = w.amax(dim=2).clamp(min=0)
    s = (hi - lo) / INT4_QMAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    s = round_scale_up(s, Q4_1_SCALE_BITS, dtype) if format == "q4_1" else s.to(dtype)
    z = torch.round(-lo / s.float()).clamp_(0, INT4_QMAX).to(torch.uint8)
    return s, z


def quantize_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest int4 codes (out, in) as uint8 in [0, 15] for group `scales`/`zeros` (out, in/group)."""
    group_size = weight.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    q = torch.round(weight.detach().float() / s) + z
    return q.clamp_(0, INT4_QMAX).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> (out, in/2) uint8: even columns in the low nibble, odd in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (out, in/2) uint8 -> (out, in) uint8 codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)  # (out, in/2, 2) -> (out, in)


_KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The resolved overloads: calling the op packet (`torch.ops.aten.x(...)`) costs ~10 us of Python dispatch per
# call, as much as the kernel itself for a 256x256 layer.
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
INT4_KERNEL_ROW_TILE = 16  # _convert_weight_to_int4pack_for_cpu needs the output width to be a multiple of this


def _dynamic_ops():
    """fbgemm's (prepack, dynamic linear) overloads, or (None, None) in a build without quantized ops."""
    try:
        return torch.ops.quantized.linear_prepack.default, torch.ops.quantized.linear_dynamic.default
    except (AttributeError, RuntimeError):
        return None, None


_PREPACK, _LINEAR_DYNAMIC = _dynamic_ops()


def cpu_capability() -> str:
    """The kernel level torch dispatches to in this process: `DEFAULT`, `AVX2`, `AVX512` (x86), or another
    architecture's name. `ATEN_CPU_CAPABILITY` lowers it; it is fixed for the life of the process."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # very old builds: assume the generic kernels
        return "DEFAULT"


CPU_CAPABILITY = cpu_capability()


def int8_kernel_safe(capability: str, rows: int, dtype: torch.dtype, in_features: int | None = None) -> bool:
    """Whether `aten._weight_int8pack_mm` may be called for `rows` input rows of `dtype` and width `in_features`
    (None: unknown) at kernel level `capability` (`cpu_capability()`).

    Why: torch 2.13's AVX-512 int8 weight-only kernel fails for reduced-precision (bf16/fp16) inputs. Measured on
    an AMD EPYC with AVX-512 BF16/VNNI (each shape probed in a fresh process): with an input width
    that is not a multiple of 16 (K = 24, 40, 104) one row returns garbage (relative errors 1e8 to 1e37, no
    crash) and two or more rows segfault; K = 16, 32, 48, 64, 96, 128, 576, 1536 were right at 1-16 rows. An
    earlier machine's kernel tests also crashed at K = 64 with several rows, so several reduced-precision rows
    are not trusted at any width. fp32 inputs are right at every width and row count, and the AVX2 and generic
    kernels are fine everywhere. So on AVX-512 a reduced-precision input runs the same kernel in fp32 (exact;
    see `_QuantizedLinear.forward`) unless it is one row of a width that is a multiple of 16: a kernel that
    misbehaves may cost speed, never the process or a wrong number."""
    if not capability.upper().startswith("AVX512") or dtype is torch.float32:
        return True
    return rows <= 1 and in_features is not None and in_features % 16 == 0
_DYNAMIC_ENGINES = ("x86", "fbgemm")  # engines whose dynamic linear is fbgemm's (qnnpack's differs)
_DYNAMIC = "dynamic"  # the kernel-cache key of the fbgemm weight object (compared by identity)
_Q4, _Q8 = "q4", "q8"  # kernel-cache keys of cpu_kernels' prepared weights


def dynamic_kernel_available() -> bool:
    """Whether `Int8Linear(kernel="dynamic")` can run its integer kernel here (else it takes the weight-only path)."""
    return _LINEAR_DYNAMIC is not None and torch.backends.quantized.engine in _DYNAMIC_ENGINES


def _dynamic_per_row(x2: torch.Tensor, packed, row_sums: torch.Tensor) -> torch.Tensor:
    """x2 (rows, in) fp32 -> (rows, out): per-row asymmetric activation quantization through fbgemm's
    per-tensor kernel, by mapping every row onto [-1, 1] first (see the module docstring)."""
    lo, hi = x2.amin(1, keepdim=True), x2.amax(1, keepdim=True)  # (rows, 1) each; torch.aminmax is 4x slower
    half = (hi - lo).mul_(0.5).clamp_min_(1e-30)  # a constant row maps to zeros; its value lives in `mid`
    mid = lo + half
    y = _LINEAR_DYNAMIC((x2 - mid).div_(half), packed, True)  # (rows, out): W x', activations u7 on [-1, 1]
    return torch.addcmul(y.mul_(half), mid, row_sums)  # h · W x' + m · W·1


def x_cpu_layer(module: nn.Module) -> bool:
    """Whether a quantized layer's codes live on the CPU (where slmkit's C kernels run)."""
    return module.scales.device.type == "cpu"


def _store_scales_as_fp16(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """On disk, fp32 scales that are fp16 values (int8 scales always; int4 `format=q4_0`/`q4_1`) are written as
    fp16, as GGUF stores them: 2 bytes per group instead of 4, the same numbers. Other scales stay as they are."""
    key = prefix + "scales"
    s = state_dict.get(key)
    if s is None or s.is_meta or s.dtype != torch.float32:
        return
    half = s.to(torch.float16)
    if torch.equal(half.float(), s):
        state_dict[key] = half


def _load_scales_in_module_dtype(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """fp16 scales from disk (`_store_scales_as_fp16`) come back in the module's scale dtype, exactly."""
    key = prefix + "scales"
    s = state_dict.get(key)
    if s is not None and s.dtype == torch.float16 and module.scales.dtype == torch.float32:
        state_dict[key] = s.float()


class _QuantizedLinear(nn.Module):
    """What both modules share: bias, shapes, the forward dispatch, parameter counting, the on-disk scales.

    The forward's kernel branch is written for per-call overhead (a decode step calls it ~7 times per
    layer): derived kernel tensors are cached with the identity and version counter of the buffers they
    come from, so `.to()`, `load_state_dict` (in place or `assign=True`), buffer reassignment and in-place
    edits all invalidate the cache."""

    kernel_dtype: torch.dtype | None = torch.bfloat16
    kernel_choice: str = "auto"  # decode-sized inputs: "auto" (measured), "packed" or "dense"
    use_cpu_kernels: bool = True  # slmkit's C kernels where they build (False: torch's and fbgemm's kernels)
    quantized_by: str = ""
    _source_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                                     requires_grad=False) if bias else None)
        self._kernel_ok = True
        self._kernel_cache: tuple | None = None  # (dtype, ((buffer, tensor, version), ...), derived), never saved
        self._dense_cache: tuple | None = None  # the same for the dequantized weight of the `dense` path
        self._choices: dict = {}  # (input dtype, one row?) -> "packed" | "dense", measured by `auto`
        self._decode: tuple | None = None  # the one-row C-kernel call, bound once (see `_planned`)
        self._register_state_dict_hook(_store_scales_as_fp16)
        self._register_load_state_dict_pre_hook(_load_scales_in_module_dtype, with_module=True)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _derive(self, dtype: torch.dtype) -> tuple:
        """Kernel-ready tensors for activations in `dtype` (computed once, cached)."""
        raise NotImplementedError

    def _matmul(self, x2: torch.Tensor, derived: tuple) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype activations of `dtype` enter the packed kernel in (also the kernel cache's key)."""
        return self.kernel_dtype if dtype is torch.float32 and self.kernel_dtype is not None else dtype

    def _kernel_safe(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether the packed kernel is known not to fault for `rows` inputs in `dtype` on this CPU (when not,
        the kernel runs in fp32, which is safe everywhere)."""
        return True

    def _cached(self, slot: str, key, make):
        """`make()` cached in attribute `slot` under `key`, valid while the source buffers are the same tensors
        at the same version (see the class docstring)."""
        c, buffers = getattr(self, slot), self._buffers
        if c is not None and c[0] is key:
            for name, t, version in c[1]:
                now = buffers[name]
                if now is not t or (version >= 0 and now._version != version):
                    break
            else:
                return c[2]
        # inference tensors have no version counter (and cannot be edited outside inference mode): -1
        sources = tuple((n, buffers[n], -1 if buffers[n].is_inference() else buffers[n]._version)
                        for n in self._source_buffers)
        value = make()
        setattr(self, slot, (key, sources, value))
        return value

    def _kernel_tensors(self, dtype) -> tuple:
        return self._cached("_kernel_cache", dtype, lambda: self._derive(dtype))

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized (out, in) weight in `dtype`, kept for the `dense` small-input path."""
        return self._cached("_dense_cache", dtype, lambda: self.dequantize(dtype).contiguous())

    def _small_input_choice(self, x: torch.Tensor, packed_fn) -> str:
        """`packed` or `dense` for a decode-sized input like `x`: the module's `kernel_choice`, or with `auto`
        the faster of the two timed on this input (min of interleaved calls), remembered per (dtype, one row
        or several; a state-dict load measures again). Only layers of at most DENSE_MAX_WEIGHTS weights
        may keep a dense copy."""
        choice = self.kernel_choice
        if choice != "auto":
            if choice not in KERNEL_CHOICES:
                raise ValueError(f"{type(self).__name__}.kernel_choice={choice!r} must be one of {list(KERNEL_CHOICES)}")
            return choice
        if self.in_features * self.out_features > DENSE_MAX_WEIGHTS:
            return "packed"
        key = (x.dtype, x.numel() == self.in_features)
        found = self._choices.get(key)
        if found is None:
            dense_fn = lambda: F.linear(x, self._dense_weight(x.dtype))  # noqa: E731
            packed_fn(), dense_fn()  # warm: derive and cache both, first-call allocations
            best = {"packed": float("inf"), "dense": float("inf")}
            for _ in range(TUNE_TRIALS):
                for name, fn in (("packed", packed_fn), ("dense", dense_fn)):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
            found = self._choices[key] = "dense" if best["dense"] < TUNE_MARGIN * best["packed"] else "packed"
            if "dense" not in self._choices.values():
                self._dense_cache = None  # keep no copy that is not used
        return found

    def _settings(self) -> tuple:
        return self.kernel_choice, self.kernel_dtype, self.use_cpu_kernels

    def _plan_decode(self, cache: tuple | None) -> None:
        """After a one-row C-kernel call: bind the next ones (`cpu_kernels.row_caller`), valid while the source
        buffers are the same tensors at the same versions (`cache`'s record) and the settings are unchanged."""
        bias = self._parameters["bias"]
        if cache is None or (bias is not None and bias.dtype is not torch.float32):
            return
        weights = cache[2][0] if isinstance(cache[2], tuple) else cache[2]
        self._decode = (cache[1], self._settings(), cpu_kernels.row_caller(weights), weights)

    def _planned(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decode step's fast path: one contiguous fp32 row straight into the bound C call, or None (then
        the full dispatch runs, and decides again)."""
        plan = self._decode
        if (x.dtype is not torch.float32 or x.numel() != self.in_features or not x.is_contiguous()
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        buffers = self._buffers
        for name, t, version in plan[0]:
            now = buffers[name]
            if now is not t or (version >= 0 and now._version != version):
                self._decode = None
                return None
        if plan[1] != self._settings():
            self._decode = None
            return None
        y = torch.empty(x.shape[:-1] + (self.out_features,))
        if plan[2](x.data_ptr(), y.data_ptr()) != 0:
            raise MemoryError(f"{type(self).__name__}: no memory for one row's quantized activations")
        bias = self._parameters["bias"]
        return y if bias is None else y.add_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._decode is not None and (y := self._planned(x)) is not None:
            return y
        bias = self._parameters["bias"]
        if (x.is_cpu and self._kernel_ok and x.numel() <= KERNEL_MAX_ROWS * self.in_features
                and x.dtype in _KERNEL_INPUT_DTYPES and not (x.requires_grad and torch.is_grad_enabled())):
            dtype = self._kernel_input_dtype(x.dtype)
            x2 = x.reshape(-1, self.in_features)
            if not self._kernel_safe(x2.shape[0], dtype):
                dtype = torch.float32
            try:
                packed_fn = lambda: self._matmul(x2.to(dtype), self._kernel_tensors(dtype))  # noqa: E731 (rows, out)
                if self._small_input_choice(x, packed_fn) == "dense":
                    return F.linear(x, self._dense_weight(x.dtype), None if bias is None else bias.to(x.dtype))
                y = packed_fn()
                if x.numel() == self.in_features and x.dtype is torch.float32 and self._kernel_cache[0] is _Q4:
                    self._plan_decode(self._kernel_cache)
            except RuntimeError:
                self._kernel_ok = False  # no kernel for this shape/build: remember, take the exact path
            else:
                y = y.view(x.shape[:-1] + (self.out_features,))
                if y.dtype is not x.dtype:
                    y = y.to(x.dtype)
                return y if bias is None else y + bias.to(x.dtype)
        if x.dtype is torch.float32 and x.is_cpu and getattr(_PREFILL, "bf16", False) and not torch.is_grad_enabled():
            y = F.linear(x.bfloat16(), self.dequantize(torch.float32).bfloat16()).float()
            return y if bias is None else y + bias.float()
        return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    def _nonzero_weights(self) -> int:
        raise NotImplementedError

    def logical_parameters(self) -> tuple[int, int]:
        """(total, nonzero) as if the weight were a dense (out, in) matrix, plus the bias."""
        total = self.out_features * self.in_features
        b = self.bias.numel() if self.bias is not None else 0
        if self.scales.is_meta:
            return total + b, total + b
        b_nz = int(torch.count_nonzero(self.bias)) if self.bias is not None else 0
        return total + b, self._nonzero_weights() + b_nz

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache, self._dense_cache, self._kernel_ok, self._choices = None, None, True, {}
        self._decode = None
        super()._load_from_state_dict(*args, **kwargs)


class Int8Linear(_QuantizedLinear):
    """Weight-only int8 Linear: symmetric, one scale per output channel."""

    quantized_by = "quant.int8"
    _source_buffers = ("weight_int8", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 kernel: str = "weight_only", device=None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, device, dtype)
        if kernel not in INT8_KERNELS:
            raise ValueError(f"Int8Linear: kernel={kernel!r} must be one of {list(INT8_KERNELS)}")
        self.kernel = kernel  # an execution choice recorded by the pass, not state: the same tensors serve both
        self._dynamic_ok = True
        self._q8_cache: tuple | None = None
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, linear: nn.Linear, q: torch.Tensor, scales: torch.Tensor,
                   kernel: str = "weight_only") -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel=kernel,
                device=linear.weight.device, dtype=linear.weight.dtype)
        m.weight_int8.copy_(q)
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "weight_only") -> Int8Linear:
        """Round-to-nearest quantization of a float Linear."""
        s = int8_scales(linear.weight)
        return cls.from_codes(linear, quantize_int8(linear.weight, s), s, kernel)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        if dtype is torch.float32 and (w := cpu_kernels.q8_dequantize(self.weight_int8, self.scales)) is not None:
            return w  # the same numbers, one threaded pass
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]  # (out, in)

    def _derive(self, dtype) -> tuple:
        if dtype is _DYNAMIC:
            row_sums = self.weight_int8.sum(dim=1, dtype=torch.int32).float() * self.scales.float()  # W·1: (out,)
            return self._prepack(), row_sums
        return self.weight_int8, self.scales.to(dtype)

    def _prepack(self) -> torch.ScriptObject:
        """fbgemm's packed form of the stored codes and per-channel scales (symmetric: zero points 0)."""
        if not dynamic_kernel_available():
            raise RuntimeError(f"no fbgemm dynamic linear (quantized engine {torch.backends.quantized.engine!r})")
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch >= 2.10 flags quantized tensors as deprecated; this one is transient
            warnings.simplefilter("ignore", UserWarning)
            w = torch._make_per_channel_quantized_tensor(self.weight_int8, self.scales.double(), zero_points, 0)
        return _PREPACK(w, None)

    def _matmul(self, x2: torch.Tensor, derived: tuple) -> torch.Tensor:
        return _INT8_MM(x2, *derived)

    def _kernel_safe(self, rows: int, dtype: torch.dtype) -> bool:
        return dtype is torch.float32 or int8_kernel_safe(CPU_CAPABILITY, rows, dtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._decode is not None and (y := self._planned(x)) is not None:
            return y
        if (self.kernel == "dynamic" and self._dynamic_ok and x.is_cpu and x.dtype in _KERNEL_INPUT_DTYPES
                and x.numel() and not (x.requires_grad and torch.is_grad_enabled())):
            bias = self._parameters["bias"]
            if self._q8_usable():  # slmkit's C kernel: activations in blocks of 32, as llama.cpp's Q8_0 x Q8_0
                if x.numel() > KERNEL_MAX_ROWS * self.in_features:
                    return super().forward(x)  # many rows: the exact weights, dequantized once for the call
                fast = lambda: self._q8(x)  # noqa: E731
                if self._small_input_choice(x, fast) == "dense":
                    return F.linear(x, self._dense_weight(x.dtype), None if bias is None else bias.to(x.dtype))
                y = fast()
                if x.numel() == self.in_features and x.dtype is torch.float32:
                    self._plan_decode(self._q8_cache)
                return y if bias is None else y + bias.to(x.dtype)
            try:
                derived = self._kernel_tensors(_DYNAMIC)
            except RuntimeError:
                self._dynamic_ok = False  # no fbgemm here: remember, take the weight-only path
            else:
                if (x.numel() <= KERNEL_MAX_ROWS * self.in_features
                        and self._small_input_choice(x, lambda: self._dynamic(x, derived)) == "dense"):
                    return F.linear(x, self._dense_weight(x.dtype), None if bias is None else bias.to(x.dtype))
                y = self._dynamic(x, derived)
                return y if bias is None else y + bias.to(x.dtype)
        return super().forward(x)

    def _q8_usable(self) -> bool:
        """Whether `kernel="dynamic"` runs on slmkit's C kernel (see the module docstring); `use_cpu_kernels =
        False` or `kernel_dtype = torch.float32` keeps fbgemm."""
        key = (self.kernel_dtype, self.use_cpu_kernels)
        ok = self.__dict__.get("_q8_ok")
        if ok is None or ok[0] != key:
            usable = (self.use_cpu_kernels and self.kernel_dtype is not torch.float32 and x_cpu_layer(self)
                      and cpu_kernels.q8_supported(self.in_features) and cpu_kernels.available())
            ok = self._q8_ok = (key, usable)
        return ok[1]

    def _q8(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) through cpu_kernels.q8_gemv (activations rounded per block of 32 to int8), without the bias."""
        w = self._cached("_q8_cache", _Q8, lambda: cpu_kernels.prepare_q8(self.weight_int8, self.scales))
        y = cpu_kernels.q8_gemv(x.reshape(-1, self.in_features), w).view(x.shape[:-1] + (self.out_features,))
        return y if y.dtype is x.dtype else y.to(x.dtype)

    def _dynamic(self, x: torch.Tensor, derived: tuple) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype through fbgemm's W8A8 kernel (`derived`: the prepacked weight
        and its row sums), without the bias."""
        packed, row_sums = derived
        xf = x if x.dtype is torch.float32 else x.float()
        if x.numel() == self.in_features:  # one row (decode at batch 1): per tensor is per row already
            y = _LINEAR_DYNAMIC(xf, packed, True)  # (..., out): the op keeps leading dims
        else:
            y = _dynamic_per_row(xf.reshape(-1, self.in_features), packed, row_sums)  # (rows, out) fp32
            y = y.view(x.shape[:-1] + (self.out_features,))
        return y if y.dtype is x.dtype else y.to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dynamic_ok, self._q8_cache = True, None
        super()._load_from_state_dict(*args, **kwargs)

    def _nonzero_weights(self) -> int:
        return int(torch.count_nonzero(self.weight_int8))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=8, kernel={self.kernel}")


class Int4Linear(_QuantizedLinear):
    """Weight-only int4 Linear: asymmetric, one scale and integer zero point per group of input columns."""

    quantized_by = "quant.int4"
    _source_buffers = ("weight_int4", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128, *,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, device, dtype)
        if in_features % group_size or group_size % 2:
            raise ValueError(f"Int4Linear: group_size={group_size} must be even and divide in_features={in_features}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_codes(cls, linear: nn.Linear, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=linear.weight.device, dtype=linear.weight.dtype)
        m.weight_int4.copy_(pack_int4(q))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, format: str = "minmax") -> Int4Linear:
        """Round-to-nearest quantization of a float Linear, group parameters fitted as `format` says."""
        s, z = int4_params(linear.weight, group_size, format=format)
        return cls.from_codes(linear, quantize_int4(linear.weight, s, z), s, z, group_size)

    def codes(self) -> torch.Tensor:
        """The unpacked (out, in) uint8 codes."""
        return unpack_int4(self.weight_int4)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        if dtype is torch.float32 and (w := cpu_kernels.q4_dequantize(self.weight_int4, self.scales, self.zeros,
                                                                       self.group_size)) is not None:
            return w  # the same numbers, one threaded pass instead of ~6
        g = self.group_size
        q = self.codes().to(dtype).view(self.out_features, -1, g)  # (out, groups, g)
        w = (q - self.zeros.to(dtype)[:, :, None]) * self.scales.to(dtype)[:, :, None]
        return w.reshape(self.out_features, self.in_features)

    def _derive(self, dtype: torch.dtype) -> tuple:
        codes = self.codes().to(torch.int32)
        s = self.scales.float()
        zero = (INT4_KERNEL_OFFSET - self.zeros.float()) * s  # (q - z) s == (q - 8) s + (8 - z) s
        # The CPU packing takes whole tiles of 16 output rows: pad with rows of scale 0 (outputs 0, sliced off),
        # so widths like a trimmed vocabulary's 20,175 rows keep the kernel instead of dequantizing each call.
        pad = -self.out_features % INT4_KERNEL_ROW_TILE
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=INT4_KERNEL_OFFSET)
            s, zero = F.pad(s, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_and_zeros = torch.stack([s.t(), zero.t()], dim=2).contiguous().to(dtype)  # (groups, out, 2)
        return packed, self.group_size, scales_and_zeros

    def _q4_usable(self) -> bool:
        """Whether decode-sized inputs run cpu_kernels.q4_gemv (llama.cpp's Q4 x Q8 arithmetic: activations
        rounded per block of 32 to int8), 2x faster than torch's int4 kernel on AVX2. `kernel_dtype =
        torch.float32` (fp32 activations, no rounding) or `use_cpu_kernels = False` keeps torch's kernel."""
        key = (self.kernel_dtype, self.use_cpu_kernels)
        ok = self.__dict__.get("_q4_ok")
        if ok is None or ok[0] != key:
            usable = (self.use_cpu_kernels and self.kernel_dtype is not torch.float32 and x_cpu_layer(self)
                      and cpu_kernels.q4_supported(self.in_features, self.group_size) and cpu_kernels.available())
            ok = self._q4_ok = (key, usable)
        return ok[1]

    def _kernel_input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self._q4_usable() else super()._kernel_input_dtype(dtype)

    def _kernel_tensors(self, dtype) -> tuple:
        if self._q4_usable():
            return self._cached("_kernel_cache", _Q4, lambda: (cpu_kernels.prepare_q4(
                self.weight_int4, self.scales, self.zeros, self.group_size),))
        return super()._kernel_tensors(dtype)

    def _matmul(self, x2: torch.Tensor, derived: tuple) -> torch.Tensor:
        if len(derived) == 1:  # cpu_kernels' prepared weights
            return cpu_kernels.q4_gemv(x2, derived[0])
        y = _INT4_MM(x2, *derived)
        return y if y.shape[-1] == self.out_features else y[:, :self.out_features].contiguous()

    def _nonzero_weights(self) -> int:
        z = self.zeros.repeat_interleave(self.group_size, dim=1)
        return int(torch.count_nonzero(self.codes() != z))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=4, group_size={self.group_size}")


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


# -- quantized (tied) embeddings ------------------------------------------------------------------------

class QuantizedEmbedding(nn.Module):
    """Weight-only quantized token embedding: one packed (V, d) table, stored as an `Int8Linear` (per-row
    scales) or `Int4Linear` (groups of `group_size` along d) named `packed`, so the same packed tensors
    serve both directions: `forward(ids)` gathers rows and dequantizes only those, (B, T) -> (B, T, d) in
    the scales' dtype; `logits(x)` is the packed matmul x Wᵀ (B, T, d) -> (B, T, V) with the kernels and
    dispatch of the quantized Linears. State dict: `packed.weight_int8` + `packed.scales`, or
    `packed.weight_int4` + `packed.scales` + `packed.zeros`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None, *,
                 kernel: str = "weight_only", device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedEmbedding: bits={bits} must be 4 or 8")
        if bits == 4 and kernel != "weight_only":
            raise ValueError(f"QuantizedEmbedding: kernel={kernel!r} needs bits=8 (int4 has only weight_only)")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:  # `kernel` serves logits(); the lookup gathers and dequantizes rows either way
            self.packed = Int8Linear(embedding_dim, num_embeddings, False, kernel=kernel, device=device, dtype=dtype)
        else:
            self.packed = Int4Linear(embedding_dim, num_embeddings, False, group_size, device=device, dtype=dtype)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None = None,
                       kernel: str = "weight_only", format: str = "minmax") -> QuantizedEmbedding:
        """Round-to-nearest quantization of a float embedding table (out = V rows, in = d columns); `format`:
        how int4 group parameters are fitted (`INT4_FORMATS`)."""
        w = emb.weight.detach()
        m = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, kernel=kernel, device=w.device, dtype=w.dtype)
        if bits == 8:
            s = int8_scales(w)
            m.packed.weight_int8.copy_(quantize_int8(w, s))
            m.packed.scales.copy_(s)
        else:
            s, z = int4_params(w, group_size, format=format)
            m.packed.weight_int4.copy_(pack_int4(quantize_int4(w, s, z)))
            m.packed.scales.copy_(s)
            m.packed.zeros.copy_(z)
        return m

    @property
    def quantized_by(self) -> str:
        return self.packed.quantized_by

    @property
    def weight(self) -> torch.Tensor:
        """A dense (V, d) dequantized copy (costly: for code that reads `embed_tokens.weight`, e.g. for its
        device and dtype); never a parameter, never saved."""
        return self.packed.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.packed.dequantize(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        p = self.packed
        dtype = p.scales.dtype
        if self.bits == 8:
            return p.weight_int8[input_ids].to(dtype) * p.scales[input_ids].unsqueeze(-1)  # (..., d)
        packed = p.weight_int4[input_ids]  # (..., d/2)
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).to(dtype)  # (..., d/2, 2)
        q = q.view(*input_ids.shape, -1, self.group_size)  # (..., groups, g)
        z = p.zeros[input_ids].to(dtype).unsqueeze(-1)  # (..., groups, 1)
        s = p.scales[input_ids].unsqueeze(-1)
        return ((q - z) * s).view(*input_ids.shape, self.embedding_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{g}"


class TiedQuantizedHead(nn.Module):
    """The output projection of a model whose lm_head is tied to a `QuantizedEmbedding`: logits = x Wᵀ
    from the embedding's packed table. The embedding is held in a plain attribute (not a submodule), so the
    head owns no tensors: the state dict, `count_parameters` and `.to()` see the table once, under
    `model.embed_tokens`. `copy.deepcopy` keeps the sharing (its memo maps the reference to the copy)."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self.tie(embedding)

    def tie(self, embedding: QuantizedEmbedding) -> None:
        object.__setattr__(self, "embedding", embedding)  # bypass Module.__setattr__: no registration

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(x)

    def extra_repr(self) -> str:
        return f"tied to a QuantizedEmbedding({self.embedding.extra_repr()})"
