"""The packed quantized kernels on awkward shapes: odd widths (24, 40, 104, not multiples of 16), one and
several rows, fp32 and bf16 inputs, every module that calls a kernel (int8 weight-only, int8 dynamic, int4,
quantized tied embeddings) and whole models (dense with odd widths, Linformer, MoE) that compress and generate
batched.

These tests run in the main suite at the CPU's own kernel level, and `test_cpu_capabilities.py` runs this file
again in subprocesses under every lower `ATEN_CPU_CAPABILITY` the machine supports, so one machine proves each
dispatch level it has (an AVX2 machine: `default` and `avx2`; an AVX-512 one: all three).

Tolerances come from the kernels' rounding, not from one machine's numbers. With unit roundoff u (2^-8 for bf16,
2^-24 for fp32) the weight-only kernels round the input, the scales (and int4 zero offsets) and the output to the
kernel dtype and accumulate in fp32, so for y = x Wᵀ with W = A + B (int4: A = (q − 8)·s, B = (8 − z)·s; int8:
A = q·s, B = 0), |ŷ_j − y_j| ≤ 4u · Σ_i |x_i| (|A_ji| + |B_ji|) (three roundings plus slack for products of
them and fp32 accumulation). The dynamic W8A8 kernel's bound is in `qlinear`'s docstring: each activation moves
by at most half a step of (max(x,0) − min(x,0))/127, so |ŷ_j − y_j| ≤ (max(x,0) − min(x,0))/254 · ‖w_j‖₁."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from slmkit.compress.base import get_pass, make_config
from slmkit.compress.qlinear import (INT4_KERNEL_OFFSET, Int4Linear, Int8Linear,
                                     QuantizedEmbedding, dynamic_kernel_available, int8_kernel_safe)
from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.generate import SamplingParams, generate

torch.set_num_threads(1)

WIDTHS = [24, 40, 104, 64, 96]  # input widths: three not multiples of 16, two that are
ROWS = [1, 2, 3, 5, 16]  # 16 = KERNEL_MAX_ROWS, the largest input the kernels serve
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def _linear(in_f: int, out_f: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    nn.init.normal_(lin.bias)
    return lin


def _weight_parts(q: nn.Module) -> torch.Tensor:
    """Σ-ready |A| + |B| (out, in) of the module's weight in the kernel's convention (module docstring)."""
    if isinstance(q, Int8Linear):
        return (q.weight_int8.float() * q.scales.float()[:, None]).abs()
    g = q.group_size
    s = q.scales.float().repeat_interleave(g, dim=1)
    z = q.zeros.float().repeat_interleave(g, dim=1)
    return ((q.codes().float() - INT4_KERNEL_OFFSET) * s).abs() + ((INT4_KERNEL_OFFSET - z) * s).abs()


def _check_weight_only(q: nn.Module, x: torch.Tensor, kernel_dtype: torch.dtype, *, kernel: bool = True) -> None:
    """`kernel`: whether the packed kernel must have served `x` (else the exact dequantized path did)."""
    with torch.no_grad():
        y = q(x)
        bias = q.bias.float() if q.bias is not None else torch.zeros(q.out_features)
        ref = F.linear(x.float(), q.dequantize(torch.float32), bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # The kernel ran (out widths 40 and 300 are not whole tiles of 16 rows: int4 pads them), not the exact path.
    assert (q._kernel_ok and q._kernel_cache is not None) == kernel
    u = max(UNIT_ROUNDOFF[kernel_dtype], UNIT_ROUNDOFF[x.dtype])
    bound = 4 * u * (x.float().abs() @ _weight_parts(q).t() + bias.abs()) + 1e-6
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over the rounding bound (worst ratio " \
                                 f"{(err / bound).max():.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_f", WIDTHS)
def test_int8_weight_only_kernel(in_f, rows, dtype):
    q = Int8Linear.from_linear(_linear(in_f))
    q.kernel_choice = "packed"  # the kernel, not a faster dense copy, is what is under test
    _check_weight_only(q, torch.randn(rows, in_f).to(dtype), torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("in_f", WIDTHS)
def test_int8_weight_only_kernel_in_fp32(in_f, rows):
    q = Int8Linear.from_linear(_linear(in_f))
    q.kernel_choice, q.kernel_dtype = "packed", torch.float32
    _check_weight_only(q, torch.randn(rows, in_f), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_f", WIDTHS)
def test_int4_kernel(in_f, rows, dtype):
    """torch's int4 CPU kernel takes groups of 32..256 only: widths that group 32 divides run it (at 40 output
    rows, padded to whole tiles of 16), the others (groups of 8) the exact dequantized path — both correct."""
    group = 32 if in_f % 32 == 0 else 8
    q = Int4Linear.from_linear(_linear(in_f), group_size=group)
    q.kernel_choice = "packed"
    _check_weight_only(q, torch.randn(rows, in_f).to(dtype), torch.bfloat16, kernel=group == 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_f", WIDTHS)
def test_int8_dynamic_kernel(in_f, rows, dtype):
    if not dynamic_kernel_available():
        pytest.skip("no fbgemm dynamic linear in this build: Int8Linear(kernel='dynamic') runs weight-only")
    q = Int8Linear.from_linear(_linear(in_f), kernel="dynamic")
    q.kernel_choice = "packed"
    x = torch.randn(rows, in_f).to(dtype)
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    xf = x.float()
    step = (xf.amax(1, keepdim=True).clamp(min=0) - xf.amin(1, keepdim=True).clamp(max=0)) / 254  # (rows, 1)
    bound = step * q.dequantize(torch.float32).abs().sum(1) + 1e-5 * (1 + ref.abs())  # (rows, out)
    if dtype is torch.bfloat16:
        bound = bound + UNIT_ROUNDOFF[dtype] * ref.abs()  # the result is rounded to the input's dtype
    err = (y.float() - ref).abs()
    assert y.dtype == dtype and (err <= bound).all(), f"worst error/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_quantized_embedding_logits(bits, dtype, rows):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 40)  # vocabulary and width not multiples of 16
    emb = nn.Embedding(300, 64) if bits == 4 else emb  # int4's kernel needs groups of >= 32
    qe = QuantizedEmbedding.from_embedding(emb, bits, group_size=32 if bits == 4 else None)
    qe.packed.kernel_choice = "packed"
    _check_weight_only(qe.packed, torch.randn(rows, emb.embedding_dim).to(dtype), torch.bfloat16)
    ids = torch.tensor([[0, 7, 299]])
    assert torch.equal(qe(ids), qe.dequantize()[ids])


# -- the guard -------------------------------------------------------------------------------------------

def test_int8_guard_covers_the_avx512_fault_and_nothing_else():
    for rows in (2, 3, 5, 8, 16):
        for dtype in (torch.bfloat16, torch.float16):
            for k in (24, 64, 576):
                assert not int8_kernel_safe("AVX512", rows, dtype, k)  # several rows: segfaults
    for k in (8, 24, 40, 104, 1400):
        assert not int8_kernel_safe("AVX512", 1, torch.bfloat16, k)  # one row, K % 16 != 0: wrong numbers
    assert not int8_kernel_safe("AVX512", 1, torch.bfloat16)  # width unknown
    for k in (16, 64, 576, 1536):
        assert int8_kernel_safe("AVX512", 1, torch.bfloat16, k)  # one row of a whole number of 16s
    assert int8_kernel_safe("AVX512", 8, torch.float32, 24)  # fp32 input
    for level in ("AVX2", "DEFAULT"):
        assert int8_kernel_safe(level, 8, torch.bfloat16, 24)


def test_unsafe_inputs_reach_the_int8_kernel_only_in_fp32(monkeypatch):
    """On an AVX-512 process several bf16 rows run the kernel in fp32 (safe, and exact)."""
    from slmkit.compress import qlinear

    monkeypatch.setattr(qlinear, "CPU_CAPABILITY", "AVX512")
    calls = []
    real = qlinear._INT8_MM

    def spy(x2, w, s):
        calls.append((x2.shape[0], x2.dtype))
        return real(x2, w, s)

    monkeypatch.setattr(qlinear, "_INT8_MM", spy)
    q = Int8Linear.from_linear(_linear(40))
    q.kernel_choice = "packed"
    for x in (torch.randn(4, 40), torch.randn(4, 40).bfloat16()):  # fp32 input runs the kernel in bf16 by default
        with torch.no_grad():
            y = q(x)
        assert y.dtype == x.dtype
        assert torch.allclose(y.float(), F.linear(x.float(), q.dequantize(), q.bias), rtol=1e-5, atol=1e-5) \
            if x.dtype is torch.float32 else y.isfinite().all()
    x = torch.randn(1, 40)
    with torch.no_grad():
        y = q(x)  # one row of a width that is not a multiple of 16: wrong numbers in bf16, so fp32
        torch.testing.assert_close(y, F.linear(x, q.dequantize(), q.bias), rtol=1e-5, atol=1e-5)
    wide = Int8Linear.from_linear(_linear(64))
    wide.kernel_choice = "packed"
    with torch.no_grad():
        wide(torch.randn(1, 64))  # one row, K a multiple of 16: safe in bf16
    assert calls == [(4, torch.float32), (4, torch.float32), (1, torch.float32), (1, torch.bfloat16)]


# -- whole models ----------------------------------------------------------------------------------------

def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n",
            "for i in range(10):\n    print(i)\n"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


MODELS = {
    "dense-odd": dict(hidden_size=40, intermediate_size=104, num_attention_heads=5, num_key_value_heads=1),
    "linformer": dict(hidden_size=40, intermediate_size=104, num_attention_heads=5, num_key_value_heads=5,
                      attention_type="linformer", linformer_k=2, linformer_block=4, linformer_window=1),
    "moe": dict(hidden_size=40, intermediate_size=24, num_attention_heads=5, num_key_value_heads=1,
                num_local_experts=4, num_experts_per_tok=2),
}
QUANT = {
    "int8": ("quant.int8", {"kernel": "weight_only", "embeddings": True}),
    "int8-dynamic": ("quant.int8", {"kernel": "dynamic", "embeddings": True}),
    "int4-g32": ("quant.int4", {"group_size": 32, "embeddings": True}),
}
# quant.int4 groups are 32, 64 or 128 columns, so its model cases use widths it can group (the kernel itself is
# checked on odd widths above, with groups of 8)
INT4_WIDTHS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return _tokenizer()


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("arch", list(MODELS))
def test_odd_width_models_compress_and_generate_batched(arch, quant, tokenizer):
    name, options = QUANT[quant]
    torch.manual_seed(0)
    shape = {**MODELS[arch], **(INT4_WIDTHS if name == "quant.int4" else {})}
    if name == "quant.int4" and arch == "moe":
        shape["intermediate_size"] = 32
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), num_hidden_layers=2, max_position_embeddings=128,
                      **shape)
    model = CausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 21))
    with torch.no_grad():
        ref = model(x)
    model, _ = get_pass(name).apply(copy.deepcopy(model), make_config(name, options), None)
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.kernel_choice = "packed"  # exercise the kernels, whatever `auto` would measure here
    with torch.no_grad():
        full = model(x)  # 63 rows: the exact path
        cache = model.new_cache(3, 32)
        steps = torch.cat([model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache)
                                                            for t in range(5, 21)], 1)  # 15 rows, then 3
    assert torch.isfinite(steps).all()
    assert float((full - ref).norm() / ref.norm()) < 0.15  # int4 g8 on random weights errs most
    assert float((steps - full).norm() / full.norm()) < 0.02  # the bf16 kernels' rounding, through 2 layers
    prompts = ["def add(a, b):", "class Point:", "for i in"]
    for dtype in (None, torch.bfloat16):
        out = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[]),
                       dtype=dtype, bos=False)
        assert [len(o.token_ids) for o in out] == [6, 6, 6]


def test_dispatch_level_is_the_one_requested():
    """Under `ATEN_CPU_CAPABILITY` (the subprocess runs of `test_cpu_capabilities.py`) the guard sees that level."""
    import os

    from slmkit.compress.qlinear import CPU_CAPABILITY

    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    if requested:
        assert CPU_CAPABILITY == requested.upper()
    else:
        assert CPU_CAPABILITY == torch.backends.cpu.get_cpu_capability()
