"""Integer CPU kernels for quantized Linear layers at decode-sized inputs (a few rows), built on first use.

torch's int4 weight-only kernel (`aten._weight_int4pack_mm_for_cpu`) is slower than an fp32 matmul at small-model
shapes on AVX2 CPUs. `q4_gemv` follows llama.cpp's Q4 x Q8 design instead: every activation row is rounded per
block of 32 columns to int8 with one fp32 scale, and each (output row, block) is an integer dot product of the
4-bit codes with those int8 values (AVX2 `maddubs`/`madd`), scaled once per block. See qgemv.c for the
arithmetic and the weight layout. `q8_gemv` does the same for int8 weights with one scale per output row
(`Int8Linear`), llama.cpp's Q8 x Q8 with the sign trick.

Error bound. With d[m, b] = max_{j in b} |x[m, j]| / 127 the rounded activations differ from x by at most
d[m, b] / 2 per element, and the kernel computes the dequantized product with them exactly up to fp32 rounding, so

    |y[m, n] - sum_j w[n, j] x[m, j]|  <=  sum_b d[m, b] / 2 * sum_{j in b} |w[n, j]|        (+ fp32 accumulation)

where w = (q - z) s (int8: w = q s) is the exact dequantized weight. `q4_error_bound` computes it (for either).

Build. qgemv.c is compiled with the system C compiler (`$CC`, else `cc`) with -O3 -fopenmp into
`$SLMKIT_CACHE_DIR/kernels/<hash>/` (default `~/.cache/slmkit`), the hash covering the source, the compiler's
identity and the flags, so an edit or another compiler builds anew. The build writes a temporary file and renames
it into place, so processes building at once never load a half-written library. No compiler, a failed build or a
library that will not load: one warning, `available()` is False and callers keep torch's kernels.

Dispatch. Three code levels, compiled for their targets by attribute only (the rest is portable C): AVX-512 VNNI
(`vpdpbusd`: four u8 x s8 products summed per instruction, 512-bit vectors taking four blocks at once; needs
AVX-512 F/BW/VL and VNNI), AVX2 + FMA, and scalar. The C code checks what the CPU reports, and the caller caps the
level by torch's (`ATEN_CPU_CAPABILITY`): `default` runs the scalar code, `avx2` the AVX2 code, so one variable
pins torch and these kernels to the same instructions (tests run each level in a subprocess). Threads: OpenMP over
output rows with `torch.get_num_threads()` threads; the library links the same libgomp soname torch ships, so the two share one runtime rather than spinning two thread pools."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["available", "q4_supported", "prepare_q4", "Q4Weights", "q4_gemv", "q8_supported", "prepare_q8",
           "Q8Weights", "q8_gemv", "row_caller", "q4_error_bound", "q4_dequantize", "q8_dequantize", "kernel_level", "cpu_level", "LEVELS",
           "KernelBuildWarning"]

SOURCE = Path(__file__).with_name("qgemv.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11")
OPENMP = ("-fopenmp",)
BLOCK = 32  # activation quantization block (input columns)
BUILD_TIMEOUT_S = 180


class KernelBuildWarning(RuntimeWarning):
    """The C kernels could not be built or loaded; torch's kernels are used instead."""


_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once tried


def cache_root() -> Path:
    """Where slmkit caches built things: $SLMKIT_CACHE_DIR, else ~/.cache/slmkit."""
    return Path(os.environ.get("SLMKIT_CACHE_DIR") or Path.home() / ".cache" / "slmkit")


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC") or "") or ["cc"]
    exe = shutil.which(cc[0])
    return None if exe is None else [exe, *cc[1:]]


def _compiler_identity(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as e:
        return repr(e)


def _compile(cc: list[str], flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCE into `target` atomically; None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            return (run.stderr or run.stdout).strip()[-2000:] or f"exit status {run.returncode}"
        os.replace(tmp, target)  # atomic: a concurrent builder's identical file is replaced whole
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return repr(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.slm_q4_gemv.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i, i]
    lib.slm_q4_gemv.restype = i
    lib.slm_q8_gemv.argtypes = [p, p, p, p, p, i, i, i, i, i]
    lib.slm_q8_gemv.restype = i
    lib.slm_cpu_has_avx2.argtypes = []
    lib.slm_cpu_has_avx2.restype = i
    lib.slm_cpu_level.argtypes = []
    lib.slm_cpu_level.restype = i
    lib.slm_q4_dequant.argtypes = [p, p, p, p, i, i, i, i]
    lib.slm_q4_dequant.restype = None
    lib.slm_q8_dequant.argtypes = [p, p, p, i, i, i]
    lib.slm_q8_dequant.restype = None
    return lib


def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        name = os.environ.get("CC") or "cc"
        warnings.warn(f"slmkit: no C compiler ({name!r} not found; set CC to one): int4/int8 decode uses torch's "
                      f"slower kernels", KernelBuildWarning, stacklevel=4)
        return None
    ident = _compiler_identity(cc)
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):  # a compiler without OpenMP still gets the single-thread kernel
        key = hashlib.sha256(SOURCE.read_bytes() + ident.encode() + " ".join(cc + list(flags)).encode()).hexdigest()
        target = cache_root() / "kernels" / key[:16] / "qgemv.so"
        if not target.exists():
            err = _compile(cc, flags, target)
            if err is not None:
                errors.append(f"{' '.join(cc + list(flags))}: {err}")
                continue
        try:
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, AttributeError) as e:
            errors.append(f"loading {target}: {e}")
    warnings.warn("slmkit: building the C kernels failed, so int4/int8 decode uses torch's slower kernels:\n"
                  + "\n".join(errors), KernelBuildWarning, stacklevel=4)
    return None


def _lib() -> ctypes.CDLL | None:
    try:
        return _state["lib"]
    except KeyError:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
        return _state["lib"]


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call; never raises)."""
    return _lib() is not None


LEVELS = ("scalar", "avx2", "avx512vnni")  # the C code's levels, by number


def kernel_level() -> str:
    """The code `q4_gemv` and `q8_gemv` run here: `avx512vnni` (AVX-512 F/BW/VL + VNNI), `avx2` (AVX2 + FMA) or
    `scalar`, capped by torch's kernel level (`ATEN_CPU_CAPABILITY`): `default` runs the scalar code, `avx2` the
    AVX2 code even on an AVX-512 CPU, so one environment variable pins both libraries to the same instructions."""
    lib = _lib()
    if lib is None:
        return "scalar"
    cpu = lib.slm_cpu_level()
    try:
        torch_level = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        torch_level = os.environ.get("ATEN_CPU_CAPABILITY", "")
    torch_level = torch_level.upper()
    cap = 0 if torch_level == "DEFAULT" else 1 if torch_level in ("AVX2", "ZVECTOR", "VSX") else 2
    return LEVELS[min(cpu, cap)]


def q4_supported(in_features: int, group_size: int) -> bool:
    """Whether `prepare_q4` accepts a layer of this width and group size."""
    return group_size > 0 and group_size % BLOCK == 0 and in_features % group_size == 0


@dataclass(frozen=True, eq=False)
class Q4Weights:
    """An int4 layer in the kernel's layout (see qgemv.c), made by `prepare_q4`; it owns the tensors whose
    addresses the kernel reads.

    codes:  (out, in/2) uint8; per output row, per block of 32 input columns, 16 bytes whose byte i holds
            column i (low nibble) and column i + 16 (high nibble)
    scale:  (out, in/32/blocks_per_scale) fp32: the group scales, repeated per block when a group is an odd
            number of blocks
    szero:  (out, groups rounded up to 8) fp32: scale * zero per group, zero padded"""

    codes: torch.Tensor
    scale: torch.Tensor
    szero: torch.Tensor
    in_features: int
    out_features: int
    group_size: int
    blocks_per_scale: int

    @property
    def padded_groups(self) -> int:
        return self.szero.shape[1]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8, column 2j low nibble and 2j+1 high -> (out, in) uint8 codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def prepare_q4(weight_int4: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Q4Weights:
    """`Int4Linear`'s buffers (codes `weight_int4` (out, in/2) uint8, `scales` (out, in/group) float, `zeros`
    (out, in/group) uint8; w = (q - z) s) -> the kernel's layout. Done once per layer; costs a few ms."""
    n, half = weight_int4.shape
    k = 2 * half
    if not q4_supported(k, group_size):
        raise ValueError(f"prepare_q4: group_size={group_size} must be a multiple of {BLOCK} that divides "
                         f"in_features={k}")
    groups = k // group_size
    if tuple(scales.shape) != (n, groups) or tuple(zeros.shape) != (n, groups):
        raise ValueError(f"prepare_q4: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
                         f"(out, in/group) = {(n, groups)}")
    with torch.no_grad():
        q = _unpack(weight_int4.detach().cpu()).view(n, k // BLOCK, 2, BLOCK // 2)  # (out, blocks, half, 16)
        codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, half).contiguous()
        s = scales.detach().cpu().float()
        bpg = group_size // BLOCK
        bps = bpg if bpg % 2 == 0 else 1
        scale = (s if bps == bpg else s.repeat_interleave(bpg, dim=1)).contiguous()
        pad = -groups % 8
        szero = torch.nn.functional.pad(s * zeros.detach().cpu().float(), (0, pad)).contiguous()
    return Q4Weights(codes, scale, szero, k, n, group_size, bps)


def q4_gemv(x2: torch.Tensor, w: Q4Weights, bias: torch.Tensor | None = None, *, level: str | None = None) -> torch.Tensor:
    """(rows, in) activations -> (rows, out) fp32: x2 @ dequantized(w).T (+ bias), with the activations
    rounded to int8 per block of 32 (see the module docstring for the error bound). Meant for a few rows
    (decode: 1-16); it is correct for any number. `level` (one of `LEVELS`, capped at what the CPU runs) picks
    the code; None runs `kernel_level()`'s. Raises RuntimeError when `available()` is False."""
    lib = _lib()
    x2, bias = _checked_input("q4_gemv", lib, x2, w.in_features, bias)
    rows = x2.shape[0]
    y = torch.empty(rows, w.out_features, dtype=torch.float32)
    rc = lib.slm_q4_gemv(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.szero.data_ptr(),
                         None if bias is None else bias.data_ptr(), y.data_ptr(), rows, w.in_features,
                         w.out_features, w.blocks_per_scale, w.group_size // BLOCK, w.padded_groups,
                         torch.get_num_threads(), _level(level))
    if rc != 0:
        raise MemoryError(f"q4_gemv: no memory for the quantized activations of {rows} rows")
    return y


def _level(name: str | None = None) -> int:
    if name is not None:
        if name not in LEVELS:
            raise ValueError(f"unknown kernel level {name!r}; choose one of {', '.join(LEVELS)}")
        return LEVELS.index(name)
    level = _state.get("level")
    if level is None:
        level = _state["level"] = LEVELS.index(kernel_level())
    return level


def cpu_level() -> str:
    """The highest code level this CPU runs, whatever torch's kernel level ("scalar" without the library)."""
    lib = _lib()
    return "scalar" if lib is None else LEVELS[lib.slm_cpu_level()]


def _checked_input(name: str, lib, x2: torch.Tensor, in_features: int, bias: torch.Tensor | None):
    if lib is None:
        raise RuntimeError(f"{name}: the C kernels are not available (see the earlier KernelBuildWarning)")
    if x2.dim() != 2 or x2.shape[1] != in_features:
        raise ValueError(f"{name}: input {tuple(x2.shape)} must be (rows, {in_features})")
    if x2.dtype is not torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    return x2, bias


def q8_supported(in_features: int) -> bool:
    """Whether `prepare_q8` accepts a layer of this width (whole blocks of 32 input columns)."""
    return in_features > 0 and in_features % BLOCK == 0


def _interleaved_columns(k: int) -> torch.Tensor:
    """(k,) source column of each position of the kernel's activation order: block pairs as
    (b[0:16], b+1[0:16], b[16:32], b+1[16:32]), an unpaired last block as it is (see qgemv.c)."""
    nb = k // BLOCK
    pairs = nb // 2
    cols = torch.arange(pairs * 2 * BLOCK).view(pairs, 2, 2, BLOCK // 2)  # (pair, block in pair, half, 16)
    order = [cols.transpose(1, 2).reshape(-1)]  # (pair, half, block in pair, 16)
    if nb % 2:
        order.append(torch.arange(pairs * 2 * BLOCK, k))
    return torch.cat(order)


@dataclass(frozen=True, eq=False)
class Q8Weights:
    """An int8 layer in the kernel's layout, made by `prepare_q8`.

    codes:  (out, in) int8, each row's columns in the activations' interleaved block-pair order
    scale:  (out,) fp32, one scale per output row (w = q * scale)"""

    codes: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int


def prepare_q8(weight_int8: torch.Tensor, scales: torch.Tensor) -> Q8Weights:
    """`Int8Linear`'s buffers (`weight_int8` (out, in) int8, `scales` (out,) float) -> the kernel's layout."""
    n, k = weight_int8.shape
    if not q8_supported(k):
        raise ValueError(f"prepare_q8: in_features={k} must be a multiple of {BLOCK}")
    if scales.numel() != n:
        raise ValueError(f"prepare_q8: scales {tuple(scales.shape)} must hold one scale per output row ({n})")
    with torch.no_grad():
        codes = weight_int8.detach().cpu()[:, _interleaved_columns(k)].contiguous()
        scale = scales.detach().cpu().float().reshape(n).contiguous()
    return Q8Weights(codes, scale, k, n)


def q8_gemv(x2: torch.Tensor, w: Q8Weights, bias: torch.Tensor | None = None, *, level: str | None = None) -> torch.Tensor:
    """(rows, in) activations -> (rows, out) fp32: x2 @ (codes * scale).T (+ bias), activations rounded to int8
    per block of 32 as in `q4_gemv` (the same error bound; `level` as there). Raises RuntimeError when
    `available()` is False."""
    lib = _lib()
    x2, bias = _checked_input("q8_gemv", lib, x2, w.in_features, bias)
    rows = x2.shape[0]
    y = torch.empty(rows, w.out_features, dtype=torch.float32)
    rc = lib.slm_q8_gemv(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(),
                         None if bias is None else bias.data_ptr(), y.data_ptr(), rows, w.in_features,
                         w.out_features, torch.get_num_threads(), _level(level))
    if rc != 0:
        raise MemoryError(f"q8_gemv: no memory for the quantized activations of {rows} rows")
    return y


def row_caller(w: "Q4Weights | Q8Weights"):
    """`f(x_ptr, y_ptr) -> status` for one contiguous fp32 row into a preallocated fp32 output row, every other
    argument bound now: the decode step's fast path (q4_gemv/q8_gemv cost ~8 us of argument handling per call
    on top of a ~7 us kernel for a 576x192 layer). The caller keeps `w` alive and checks its inputs."""
    lib, level = _lib(), _level()
    if lib is None:
        raise RuntimeError("row_caller: the C kernels are not available (see the earlier KernelBuildWarning)")
    threads = torch.get_num_threads
    if isinstance(w, Q4Weights):
        fn, args = lib.slm_q4_gemv, (w.codes.data_ptr(), w.scale.data_ptr(), w.szero.data_ptr(), None)
        shape = (1, w.in_features, w.out_features, w.blocks_per_scale, w.group_size // BLOCK, w.padded_groups)
        return lambda x, y: fn(x, *args, y, *shape, threads(), level)
    fn, args = lib.slm_q8_gemv, (w.codes.data_ptr(), w.scale.data_ptr(), None)
    shape = (1, w.in_features, w.out_features)
    return lambda x, y: fn(x, *args, y, *shape, threads(), level)


def _dequant_ready(*tensors: torch.Tensor) -> bool:
    return (_lib() is not None and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.is_contiguous() and not t.is_meta for t in tensors))


def q4_dequantize(weight_int4: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> torch.Tensor | None:
    """`Int4Linear`'s buffers -> the (out, in) fp32 weight (q - z) * s in one threaded pass, bit-identical to
    torch's elementwise version and several times faster (that takes ~6 passes over the weight, which cost more
    than the fp32 matmul of a 256-row prefill); None where it does not apply (library unavailable, non-CPU,
    non-contiguous or non-fp32 scales, while torch.compile traces), and the caller computes it with torch."""
    n, half = weight_int4.shape
    k = 2 * half
    if (scales.dtype is not torch.float32 or weight_int4.dtype is not torch.uint8 or zeros.dtype is not torch.uint8
            or group_size % 2 or k % group_size or tuple(scales.shape) != (n, k // group_size)
            or tuple(zeros.shape) != (n, k // group_size) or not _dequant_ready(weight_int4, scales, zeros)):
        return None
    out = torch.empty(n, k, dtype=torch.float32)
    _lib().slm_q4_dequant(weight_int4.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), n, k,
                          group_size, torch.get_num_threads())
    return out


def q8_dequantize(weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`Int8Linear`'s buffers -> the (out, in) fp32 weight q * s, one threaded pass (bit-identical to torch's);
    None where it does not apply, as `q4_dequantize`."""
    n, k = weight_int8.shape
    if (scales.dtype is not torch.float32 or weight_int8.dtype is not torch.int8 or scales.numel() != n
            or not _dequant_ready(weight_int8, scales)):
        return None
    out = torch.empty(n, k, dtype=torch.float32)
    _lib().slm_q8_dequant(weight_int8.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, torch.get_num_threads())
    return out


def q4_error_bound(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, out): the largest |q4_gemv(x2) - x2 @ weight.T| that rounding the activations to int8 per block
    of 32 can cause, for the exact dequantized `weight` (out, in), before fp32 accumulation error."""
    x = x2.double()
    rows, k = x.shape
    d = x.abs().view(rows, k // BLOCK, BLOCK).amax(2) / 127  # (rows, blocks)
    wsum = weight.double().abs().view(weight.shape[0], k // BLOCK, BLOCK).sum(2)  # (out, blocks)
    return (d / 2) @ wsum.T
