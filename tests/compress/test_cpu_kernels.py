"""The C int4 and int8 kernels (`slmkit.compress.cpu_kernels`): the exact dequantized matmul within the derived
bound of 8-bit activation rounding, exactly the rounded-activation product (up to fp32 accumulation), both
dispatch levels, the no-compiler fallback and concurrent first builds."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from slmkit.compress import cpu_kernels as ck
from slmkit.compress.qlinear import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not ck.available(), reason="no C compiler here: the fallback tests below cover it")

# (in, out, group, rows): SmolLM2-135M's layers (fused q|k|v, o, fused gate|up, down, a trimmed head), odd widths,
# groups of an odd number of blocks, one block
CASES = [(576, 960, 32, 1), (576, 576, 64, 2), (576, 3072, 64, 1), (576, 3072, 32, 4), (1536, 576, 128, 16),
         (576, 20175, 64, 1), (1536, 577, 128, 5), (96, 37, 96, 3), (192, 13, 96, 7), (64, 5, 32, 16),
         (32, 3, 32, 1), (256, 1, 128, 9), (128, 19, 64, 11)]


def layer(in_f: int, out_f: int, group: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    m = Int4Linear.from_linear(nn.Linear(in_f, out_f, bias=True), group)
    m.bias.data.normal_()
    return m


def prepared(m: Int4Linear) -> ck.Q4Weights:
    return ck.prepare_q4(m.weight_int4, m.scales, m.zeros, m.group_size)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x with each block of 32 rounded as the kernel does: d = max|x| / 127, x' = d * round(x / d)."""
    rows, k = x.shape
    xb = x.view(rows, k // 32, 32)
    amax = xb.abs().amax(2, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((xb * inv).round().clamp(-127, 127).double() * (amax.double() / 127)).view(rows, k)


@pytest.mark.parametrize("in_f,out_f,group,rows", CASES)
def test_within_bound_of_exact_dequantized_matmul(in_f, out_f, group, rows):
    m = layer(in_f, out_f, group)
    x = torch.randn(rows, in_f) * torch.rand(1, in_f) * 3  # uneven column magnitudes, as activations have
    w = m.dequantize(torch.float32)
    y = ck.q4_gemv(x, prepared(m), m.bias)
    exact = x.double() @ w.double().T + m.bias.double()
    bound = ck.q4_error_bound(x, w)
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6  # fp32 accumulation
    assert y.shape == (rows, out_f) and y.dtype is torch.float32
    assert ((y.double() - exact).abs() <= bound + slack).all()
    # the kernel computes the dequantized product with the rounded activations, to fp32 accuracy
    emulated = rounded(x) @ w.double().T + m.bias.double()
    assert ((y.double() - emulated).abs() <= slack).all()


@pytest.mark.parametrize("in_f,out_f,rows", [(576, 960, 1), (576, 3072, 3), (1536, 577, 16), (96, 37, 2), (32, 3, 5)])
def test_int8_within_bound_of_exact_dequantized_matmul(in_f, out_f, rows):
    torch.manual_seed(1)
    m = Int8Linear.from_linear(nn.Linear(in_f, out_f))
    x = torch.randn(rows, in_f) * torch.rand(1, in_f) * 3
    w = m.dequantize(torch.float32)
    y = ck.q8_gemv(x, ck.prepare_q8(m.weight_int8, m.scales), m.bias)
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    exact = x.double() @ w.double().T + m.bias.double()
    assert ((y.double() - exact).abs() <= ck.q4_error_bound(x, w) + slack).all()
    assert ((y.double() - (rounded(x) @ w.double().T + m.bias.double())).abs() <= slack).all()


def test_bound_is_the_activation_rounding():
    """The bound is nearly attained: with every activation just short of halfway between two int8 levels, on
    the side of its weight's sign, every rounding error adds up."""
    m = layer(64, 4, 32)
    w = m.dequantize(torch.float32)
    d = 1 / 127  # each block's max |x| is 1 (column 0 below)
    x = (torch.arange(64) % 32 + 0.49) * d * torch.sign(w[0])  # 0.49 d above a level: rounds down
    x[0], x[32] = 1.0, 1.0
    y = ck.q4_gemv(x[None], prepared(m), m.bias)
    err = (y[0, 0].double() - (x.double() @ w[0].double() + m.bias[0].double())).abs()
    bound = ck.q4_error_bound(x[None], w)[0, 0]
    assert err <= bound * (1 + 1e-4) + 1e-6
    assert err >= bound * 0.9  # the bound describes a real error, not a loose cap


def test_inputs_in_other_dtypes_and_layouts():
    m = layer(128, 40, 64)
    w = prepared(m)
    x = torch.randn(3, 256)[:, ::2]  # non-contiguous
    ref = ck.q4_gemv(x.contiguous(), w)
    assert torch.equal(ck.q4_gemv(x, w), ref)
    assert torch.equal(ck.q4_gemv(x, w, m.bias), ref + m.bias)
    xb = x.bfloat16()
    assert torch.equal(ck.q4_gemv(xb, w), ck.q4_gemv(xb.float(), w))
    assert torch.equal(ck.q4_gemv(torch.zeros(2, 128), w), torch.zeros(2, 40))


def test_threads_agree():
    m = layer(576, 1000, 64)
    w, x = prepared(m), torch.randn(3, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ck.q4_gemv(x, w)
        torch.set_num_threads(2)
        two = ck.q4_gemv(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # rows are split between threads, never a row's sum


def test_bad_shapes_are_refused():
    m = layer(96, 8, 32)
    with pytest.raises(ValueError, match="group_size=48 must be a multiple of 32"):
        ck.prepare_q4(m.weight_int4, m.scales, m.zeros, 48)
    with pytest.raises(ValueError, match="must both be"):
        ck.prepare_q4(m.weight_int4, m.scales[:, :1], m.zeros, 32)
    with pytest.raises(ValueError, match="in_features=48 must be a multiple of 32"):
        ck.prepare_q8(torch.zeros(4, 48, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match=r"must be \(rows, 96\)"):
        ck.q4_gemv(torch.randn(2, 64), prepared(m))
    assert ck.q4_supported(576, 64) and not ck.q4_supported(576, 128) and not ck.q4_supported(64, 16)


_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from torch import nn
    warnings.simplefilter("always")
    from slmkit.compress import cpu_kernels as ck
    from slmkit.compress.qlinear import Int4Linear, Int8Linear
    torch.manual_seed(0)
    m = Int4Linear.from_linear(nn.Linear(192, 37), 64)
    m8 = Int8Linear.from_linear(nn.Linear(192, 37))
    x = torch.randn(5, 192)
    with warnings.catch_warnings(record=True) as caught:
        ok = ck.available()
    y = ck.q4_gemv(x, ck.prepare_q4(m.weight_int4, m.scales, m.zeros, 64)).tolist() if ok else None
    y8 = ck.q8_gemv(x, ck.prepare_q8(m8.weight_int8, m8.scales)).tolist() if ok else None
    print(json.dumps({"available": ok, "level": ck.kernel_level(), "y": y, "y8": y8,
                      "warnings": [str(w.message) for w in caught]}))
""")


def _child(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_dispatch_levels_and_concurrent_first_builds(tmp_path):
    """Three processes build into an empty cache at once (each compiles to a temporary name and renames it into
    place); ATEN_CPU_CAPABILITY=default runs the scalar code, =avx2 the AVX2 code even on an AVX-512 CPU, unset
    the best this CPU has. All agree with this process."""
    cache = str(tmp_path / "cache")
    procs = [_child({"SLMKIT_CACHE_DIR": cache}), _child({"SLMKIT_CACHE_DIR": cache, "ATEN_CPU_CAPABILITY": "default"}),
             _child({"SLMKIT_CACHE_DIR": cache, "ATEN_CPU_CAPABILITY": "avx2"})]
    results = [_result(p) for p in procs]
    torch.manual_seed(0)
    m = Int4Linear.from_linear(nn.Linear(192, 37), 64)
    m8 = Int8Linear.from_linear(nn.Linear(192, 37))
    x = torch.randn(5, 192)
    mine = ck.q4_gemv(x, prepared(m))
    mine8 = ck.q8_gemv(x, ck.prepare_q8(m8.weight_int8, m8.scales))
    slack = 1e-5 * (x.abs() @ m.dequantize(torch.float32).abs().T) + 1e-6
    slack8 = 1e-5 * (x.abs() @ m8.dequantize(torch.float32).abs().T) + 1e-6
    for r in results:
        assert r["available"] and not r["warnings"], r
        assert ((torch.tensor(r["y"]) - mine).abs() <= slack).all()
        assert ((torch.tensor(r["y8"]) - mine8).abs() <= slack8).all()
    assert results[1]["level"] == "scalar"
    assert results[2]["level"] == ("scalar" if ck.cpu_level() == "scalar" else "avx2")
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert results[0]["level"] == ck.kernel_level() == ck.cpu_level()
    built = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert built == ["qgemv.so"]  # one library, no temporary files left behind


@pytest.mark.parametrize("in_f,out_f,group,rows", CASES + [(160, 33, 32, 2), (224, 17, 32, 3), (384, 40, 192, 1)])
def test_every_code_level_computes_the_same(in_f, out_f, group, rows):
    """Each level this CPU runs (levels above it run its best: on an AVX2-only CPU the AVX-512 VNNI code is not
    exercised here) gives the scalar code's result up to fp32 accumulation order, int4 and int8, with block
    counts that leave 0-3 blocks after the last whole quad and groups of 1, 2, 3, 4 and 6 blocks."""
    m = layer(in_f, out_f, group)
    lin = nn.Linear(in_f, out_f)
    m8 = Int8Linear.from_linear(lin)
    x = torch.randn(rows, in_f) * torch.rand(1, in_f) * 3
    w4, w8 = prepared(m), ck.prepare_q8(m8.weight_int8, m8.scales)
    ref4, ref8 = ck.q4_gemv(x, w4, m.bias, level="scalar"), ck.q8_gemv(x, w8, lin.bias, level="scalar")
    slack4 = 1e-5 * (x.abs() @ m.dequantize(torch.float32).abs().T) + 1e-6
    slack8 = 1e-5 * (x.abs() @ m8.dequantize(torch.float32).abs().T) + 1e-6
    for level in ck.LEVELS[1:]:
        assert ((ck.q4_gemv(x, w4, m.bias, level=level) - ref4).abs() <= slack4).all(), level
        assert ((ck.q8_gemv(x, w8, lin.bias, level=level) - ref8).abs() <= slack8).all(), level
    with pytest.raises(ValueError, match="unknown kernel level"):
        ck.q4_gemv(x, w4, level="avx9")


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "missing" / "cc"))
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ck, "_state", {})
    with pytest.warns(ck.KernelBuildWarning, match="no C compiler"):
        assert not ck.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ck.available()  # remembered: no second warning
    assert ck.kernel_level() == "scalar"
    with pytest.raises(RuntimeError, match="not available"):
        ck.q4_gemv(torch.randn(1, 64), prepared(layer(64, 4, 32)))


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake compiler: refusing' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ck, "_state", {})
    with pytest.warns(ck.KernelBuildWarning, match="refusing"):
        assert not ck.available()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half-built library left


@pytest.mark.parametrize("in_f,out_f,group,rows", CASES)
def test_dequantize_is_bit_identical_to_torch(in_f, out_f, group, rows):
    """The threaded one-pass dequantization (the many-row path: prefill, evaluation) gives exactly torch's
    elementwise (q - z) * s and q * s; non-fp32 scales and other dtypes keep torch's code."""
    m = layer(in_f, out_f, group, seed=rows)
    m8 = Int8Linear.from_linear(nn.Linear(in_f, out_f))
    q = m.codes().float().view(out_f, -1, group)
    ref4 = ((q - m.zeros.float()[:, :, None]) * m.scales[:, :, None]).reshape(out_f, in_f)
    ref8 = m8.weight_int8.float() * m8.scales[:, None]
    assert torch.equal(ck.q4_dequantize(m.weight_int4, m.scales, m.zeros, group), ref4)
    assert torch.equal(ck.q8_dequantize(m8.weight_int8, m8.scales), ref8)
    assert torch.equal(m.dequantize(torch.float32), ref4) and torch.equal(m8.dequantize(torch.float32), ref8)
    assert ck.q4_dequantize(m.weight_int4, m.scales.bfloat16(), m.zeros, group) is None
    assert ck.q8_dequantize(m8.weight_int8, m8.scales.half()) is None
    qb = m.codes().bfloat16().view(out_f, -1, group)  # another dtype: torch's code, in that dtype
    refb = ((qb - m.zeros.bfloat16()[:, :, None]) * m.scales.bfloat16()[:, :, None]).reshape(out_f, in_f)
    assert torch.equal(m.dequantize(torch.bfloat16), refb)
