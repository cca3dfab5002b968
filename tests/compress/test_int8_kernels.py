"""Int8Linear's two kernels: weight_only (float activations) and dynamic (per-row 7-bit activations, fbgemm).

The dynamic kernel approximates the weight-only reference F.linear(x, dequantize(W)); its documented bound:
each activation moves by at most half a quantization step, so |y_rj − ref_rj| ≤ (max(x_r, 0) − min(x_r, 0)) /
254 · ‖w_j‖₁ for row r, output j. The kernel is an execution choice: the state dict is the same plain tensors.
"""

import copy
import os
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.compress import cpu_kernels, qlinear
from slmkit.compress.base import PassError, get_pass, make_config
from slmkit.compress.qlinear import Int8Linear, QuantizedEmbedding, dynamic_kernel_available
from slmkit.compress.quantize import DEFAULT_INT8_KERNEL
from slmkit.model import CausalLM, ModelConfig
from pinned_kernels import each_kernel_choice

torch.set_num_threads(1)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
needs_fbgemm = pytest.mark.skipif(not dynamic_kernel_available(), reason="no fbgemm dynamic linear in this build")


def random_int8(in_f=256, out_f=96, bias=False, kernel="dynamic", seed=0) -> Int8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        nn.init.normal_(lin.bias)
    q = Int8Linear.from_linear(lin, kernel)
    q.kernel_choice = "packed"  # these tests are about the kernels, not the measured choice (test_kernel_choice.py)
    q.use_cpu_kernels = False  # fbgemm's dynamic kernel; slmkit's C kernel has its own tests below
    return q


def bound(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    """(rows, out) worst-case error of the dynamic kernel against the weight-only reference."""
    x2 = x.reshape(-1, q.in_features).float()
    row_range = x2.amax(1).clamp(min=0) - x2.amin(1).clamp(max=0)  # (rows,)
    w_l1 = q.dequantize(torch.float32).abs().sum(1)  # (out,)
    return (row_range / 254)[:, None] * w_l1[None, :]


def tiny_model(seed=0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**TINY, **overrides})).eval()


@needs_fbgemm
@pytest.mark.parametrize("shape", [(1, 256), (2, 3, 256), (64, 256)], ids=["1-row", "6-rows", "64-rows"])
@pytest.mark.parametrize("bias", [False, True])
def test_dynamic_within_documented_bound_of_reference(shape, bias):
    q = random_int8(bias=bias)
    x = torch.randn(*shape)
    ref = F.linear(x, q.dequantize(), q.bias)
    with torch.no_grad():
        y = q(x)
    assert q._kernel_cache[0] is qlinear._DYNAMIC and q._dynamic_ok  # the integer kernel really ran
    err = (y - ref).reshape(-1, q.out_features).abs()
    assert bool((err <= 1.01 * bound(x, q) + 1e-5).all())
    assert err.max() > 0  # activations really were quantized (not the weight-only path in disguise)
    assert float((y - ref).norm() / ref.norm()) < 0.015  # typical error on Gaussian inputs: ~0.5%


@needs_fbgemm
def test_rows_are_quantized_independently():
    """A token with a 100x range (an outlier) does not coarsen the other rows' steps: per-row scales."""
    q = random_int8()
    x = torch.randn(8, 256)
    x[3] *= 100
    ref = F.linear(x, q.dequantize())
    with torch.no_grad():
        y = q(x)
        alone = torch.cat([q(x[r:r + 1]) for r in range(8)])
        shared = torch.ops.quantized.linear_dynamic(x, q._kernel_tensors(qlinear._DYNAMIC)[0], True)  # per tensor
    calm = [r for r in range(8) if r != 3]
    err = (y - ref).abs()[calm]
    assert bool((err <= 1.01 * bound(x, q)[calm] + 1e-5).all())
    assert (shared - ref)[calm].norm() > 20 * (y - ref)[calm].norm()  # what one shared step would have cost
    assert torch.allclose(y, alone, rtol=0, atol=float(2 * bound(x, q).max()))  # batch 8 ≈ each row alone


@needs_fbgemm
def test_all_positive_inputs_do_not_saturate():
    """u8·s8 pairs overflow fbgemm's int16 sums without VNNI: 7-bit activations (reduce_range) must not."""
    q = random_int8(out_f=16)
    q.weight_int8.fill_(127)
    x = torch.ones(1, 256)
    with torch.no_grad():
        y = q(x)
    ref = F.linear(x, q.dequantize())
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-3


@needs_fbgemm
def test_bf16_activations_and_in_place_edits():
    q = random_int8().to(torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    ref = F.linear(x.float(), q.dequantize(torch.float32))
    with torch.no_grad():
        y = q(x)
        assert y.dtype == torch.bfloat16 and float((y.float() - ref).norm() / ref.norm()) < 0.02
        q.scales.mul_(2)  # the cached fbgemm weight and row sums follow the buffers
        assert torch.allclose(q(x).float(), 2 * y.float(), rtol=2e-2, atol=1e-2)


def test_fallback_without_fbgemm_is_the_weight_only_path(monkeypatch):
    x = torch.randn(3, 256)
    with torch.no_grad():
        weight_only = random_int8(kernel="weight_only")(x)
    monkeypatch.setattr(qlinear, "_LINEAR_DYNAMIC", None)  # a build without quantized ops
    assert not dynamic_kernel_available()
    q = random_int8(kernel="dynamic")
    with torch.no_grad():
        y = q(x)
    assert not q._dynamic_ok and torch.equal(y, weight_only)
    monkeypatch.undo()
    if "qnnpack" in torch.backends.quantized.supported_engines:  # another engine (e.g. Arm's default)
        monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack")
        q = random_int8(kernel="dynamic")
        with torch.no_grad():
            assert torch.equal(q(x), weight_only) and not q._dynamic_ok


def test_autograd_takes_the_exact_path():
    q = random_int8(kernel="dynamic")
    x = torch.randn(2, 256, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, F.linear(x, q.dequantize()), atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(2, -1), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_takes_the_dequantized_path():
    q = random_int8(kernel="dynamic").cuda()
    x = torch.randn(3, 256, device="cuda")
    with torch.no_grad():
        assert torch.allclose(q(x), F.linear(x, q.dequantize()), atol=1e-4)
    assert q._kernel_cache is None


def test_state_dict_stays_plain_tensors_and_deepcopies():
    q = random_int8(bias=True)
    with torch.no_grad():
        y = q(torch.randn(1, 256))  # fills the kernel cache with fbgemm's object where it exists
    sd = q.state_dict()
    assert set(sd) == {"bias", "weight_int8", "scales"} and all(type(t) is torch.Tensor for t in sd.values())
    # int8 scales are fp16 values: stored as fp16 (as GGUF's Q8_0 stores them), loaded back as fp32
    assert {k: t.dtype for k, t in sd.items()} == {"bias": torch.float32, "weight_int8": torch.int8,
                                                   "scales": torch.float16}
    assert torch.equal(sd["scales"].float(), q.scales)
    c = copy.deepcopy(q)
    with torch.no_grad():
        assert c.kernel == "dynamic" and torch.equal(c(torch.ones(1, 256)), q(torch.ones(1, 256)))
    assert y.shape == (1, 96)


@pytest.mark.parametrize("kernel", ["weight_only", "dynamic"])
def test_checkpoint_roundtrip_keeps_kernel_and_outputs(kernel, tmp_path):
    model = tiny_model()
    model, report = get_pass("quant.int8").apply(model, make_config("quant.int8", {"kernel": kernel,
                                                                                    "embeddings": True}))
    assert report["kernel"] == kernel
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    save_checkpoint(model, tmp_path / "ck", tokenizer_from=tok, provenance={
        "passes": [{"name": "quant.int8", "config": {"kernel": kernel, "embeddings": True}, "report": report}]})
    assert all(type(t) is torch.Tensor for t in load_file(str(tmp_path / "ck" / "model.safetensors")).values())
    loaded = load_checkpoint(tmp_path / "ck").model
    ints = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(ints) == 15 and {m.kernel for m in ints} == {kernel}  # 14 projections + the tied table
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        for choice in each_kernel_choice(loaded, model):  # the one-row decode path too
            assert torch.equal(loaded(x[:1, :1]), model(x[:1, :1])), choice


def test_config_and_replay():
    assert make_config("quant.int8", {}).resolved_kernel == DEFAULT_INT8_KERNEL
    assert make_config("quant.gptq", {"bits": 8, "kernel": "weight_only"}).resolved_kernel == "weight_only"
    assert make_config("quant.gptq", {"bits": 4}).resolved_kernel == "weight_only"  # int4 has one kernel
    with pytest.raises(PassError, match=r"quant.int8: kernel='fast' must be one of"):
        make_config("quant.int8", {"kernel": "fast"})
    with pytest.raises(PassError, match=r"quant.gptq: kernel='dynamic' needs bits=8"):
        make_config("quant.gptq", {"bits": 4, "kernel": "dynamic"})
    with pytest.raises(ValueError, match="kernel"):
        Int8Linear(64, 32, kernel="dynamc")
    cfg = make_config("quant.int8", {"kernel": "dynamic"})
    _, report = get_pass("quant.int8").apply(tiny_model(), cfg)
    report = json.loads(json.dumps(report))
    with torch.device("meta"):
        fresh = get_pass("quant.int8").restructure(CausalLM(ModelConfig(**TINY)), cfg, report)
    assert fresh.model.layers[0].mlp.down_proj.kernel == "dynamic"
    old = {k: v for k, v in report.items() if k != "kernel"}  # recorded before the option existed
    with torch.device("meta"):
        fresh = get_pass("quant.int8").restructure(CausalLM(ModelConfig(**TINY)), cfg, old)
    assert fresh.model.layers[0].mlp.down_proj.kernel == "weight_only"
    with pytest.raises(PassError, match="kernel='turbo'"), torch.device("meta"):
        get_pass("quant.int8").restructure(CausalLM(ModelConfig(**TINY)), cfg, {**report, "kernel": "turbo"})


def test_safetensors_of_a_used_module(tmp_path):
    """A module whose cache holds fbgemm's object still saves as plain safetensors and reloads identically."""
    q = random_int8(bias=True)
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = q(x)
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    fresh = Int8Linear(256, 96, bias=True, kernel="dynamic")
    fresh.kernel_choice, fresh.use_cpu_kernels = "packed", False
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="slmkit's C kernels did not build here")


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 6, 16])
def test_dynamic_runs_the_c_kernel_within_its_block_bound(rows):
    """With slmkit's C kernel, up to KERNEL_MAX_ROWS rows are rounded per block of 32 (cpu_kernels' bound)."""
    q = random_int8(bias=True)
    q.use_cpu_kernels = True
    x = torch.randn(rows, 256)
    x[:, 7] *= 50  # an outlier channel coarsens only its own block
    ref = F.linear(x, q.dequantize(), q.bias)
    with torch.no_grad():
        y = q(x)
    assert q._q8_cache is not None and q._kernel_cache is None  # the C kernel ran, fbgemm did not
    err = (y - ref).abs()
    assert bool((err <= 1.01 * cpu_kernels.q4_error_bound(x, q.dequantize()) + 1e-4).all())
    assert err.max() > 0
    q.use_cpu_kernels = False  # fbgemm's one step per row: the outlier coarsens the whole row
    with torch.no_grad():
        per_row = q(x)
    assert (per_row - ref).norm() > 2 * (y - ref).norm()  # measured 2.5-3x here


@needs_cpu_kernels
def test_dynamic_takes_the_exact_weights_for_many_rows():
    q = random_int8()
    q.use_cpu_kernels = True
    x = torch.randn(qlinear.KERNEL_MAX_ROWS + 1, 256)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.dequantize()))


@needs_cpu_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_one_row_decode_plan_follows_edits_and_settings(kind):
    """After one C-kernel call a one-row input takes a bound call (`_planned`); an in-place edit, a replaced
    buffer or a changed setting drops the plan, and the result is always what the full dispatch gives."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    q = Int8Linear.from_linear(lin, "dynamic") if kind == "int8" else qlinear.Int4Linear.from_linear(lin, 32)
    q.kernel_choice = "packed"
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        first = q(x)
        assert q._decode is not None
        assert torch.equal(q(x), first)  # the bound call computes what the dispatch did
        codes = "weight_int8" if kind == "int8" else "weight_int4"
        q.scales.mul_(2)  # in place: the version moves, the plan is dropped, the kernel tensors are rebuilt
        doubled = q(x)
        assert torch.allclose(doubled - q.bias, 2 * (first - q.bias), rtol=1e-5, atol=1e-5)
        setattr(q, codes, getattr(q, codes).clone())  # a replaced buffer
        assert torch.equal(q(x), doubled)
        q.kernel_choice = "dense"  # a changed setting: the exact dequantized matmul
        assert torch.allclose(q(x), F.linear(x, q.dequantize(), q.bias), rtol=0, atol=1e-5)
        assert q._decode is None
        q.kernel_choice = "packed"
        x_bf16 = x.to(torch.bfloat16)  # not the fp32 row the plan binds: the dispatch runs
        assert q(x_bf16).dtype == torch.bfloat16


def test_cpu_kernels_built_where_required():
    """CI sets SLMKIT_REQUIRE_CPU_KERNELS=1, so that the C-kernel tests cannot silently skip there."""
    if os.environ.get("SLMKIT_REQUIRE_CPU_KERNELS") == "1":
        assert cpu_kernels.available(), "slmkit's C kernels did not build (is a C compiler installed?)"
