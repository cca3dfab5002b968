"""Quantization passes (quant.int8, quant.int4, quant.gptq) and the quantized Linear modules."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.checkpoint import state_dict_for_save
from slmkit.compress.base import (Calibration, PassError, config_to_dict, count_parameters, get_pass, make_config,
                                  state_bytes)
from slmkit.compress.qlinear import Int4Linear, Int8Linear, pack_int4, unpack_int4
from slmkit.compress.gptq import gptq_quantize
from slmkit.compress.quantize import rtn_quantize
from slmkit.model import CausalLM, ModelConfig
from slmkit.model.rope import rope_inverse_frequencies
from pinned_kernels import each_kernel_choice

torch.set_num_threads(1)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

# (pass, options, max relative logit error vs the float model)
PASSES = [
    ("quant.int8", {"kernel": "weight_only"}, 0.01),
    ("quant.int8", {"kernel": "dynamic"}, 0.03),  # + per-token 7-bit activations: ~1.2% here
    ("quant.int4", {"group_size": 32}, 0.08),
    ("quant.gptq", {"bits": 4, "group_size": 32}, 0.08),
    ("quant.gptq", {"bits": 4, "group_size": 32, "act_order": True}, 0.08),
    ("quant.gptq", {"bits": 8, "kernel": "weight_only"}, 0.01),
]
IDS = ["int8", "int8-dynamic", "int4-g32", "gptq4-g32", "gptq4-g32-act", "gptq8"]


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def calib() -> Calibration:
    return Calibration(torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(1)))


def run_pass(model, name, options, calib):
    cfg = make_config(name, options)
    return (*get_pass(name).apply(model, cfg, calib), cfg)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reload(model: CausalLM, passes: list[tuple[str, object, dict]], tmp_path) -> CausalLM:
    """Save as safetensors, rebuild on meta, replay the passes from (name, config, JSON report), load."""
    f = tmp_path / "model.safetensors"
    save_file(state_dict_for_save(model), str(f))
    state = load_file(str(f))
    with torch.device("meta"):
        fresh = CausalLM(model.config)
    for name, cfg, report in passes:
        cfg = make_config(name, json.loads(json.dumps(config_to_dict(cfg))))
        fresh = get_pass(name).restructure(fresh, cfg, json.loads(json.dumps(report)))
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    fresh.tie_weights()
    fresh.model.rotary_emb.inv_freq = rope_inverse_frequencies(fresh.config)
    return fresh.eval()


# -- the contract ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,tol", PASSES, ids=IDS)
def test_pass_contract(name, options, tol, calib, tmp_path):
    model = tiny_model()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(x)
    total_before, _ = count_parameters(model)
    model, report, cfg = run_pass(model, name, options, calib)
    quantized = (Int8Linear if cfg.bits == 8 else Int4Linear)
    assert len(report["modules"]) == 14 and all(isinstance(model.get_submodule(n), quantized)
                                                  for n in report["modules"])
    json.dumps(report)  # JSON-serialisable
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < tol
    # size accounting is the real state dict; logical parameter count unchanged
    assert state_bytes(model) == sum(t.numel() * t.element_size() for t in state_dict_for_save(model).values())
    assert count_parameters(model)[0] == total_before
    assert report["target_bytes_after"] < report["target_bytes_before"] / 3
    # save -> meta build + restructure + load -> identical outputs (dequantize path and CPU kernel path)
    loaded = reload(model, [(name, cfg, report)], tmp_path)
    step = x[:1, :1]
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
        # One-row inputs take the decode kernels; `auto` times them per model, so under load the two models could
        # pick different ones: compare each kernel choice on both.
        for choice in each_kernel_choice(model, loaded):
            assert torch.equal(loaded(step), model(step)), choice
    assert count_parameters(loaded) == count_parameters(model)


@pytest.mark.parametrize("name,options,field", [
    ("quant.int8", {"bits": 4}, "bits"),
    ("quant.int4", {"bits": 3}, "bits"),
    ("quant.gptq", {"bits": 3}, "bits"),
    ("quant.int4", {"group_size": 48}, "group_size"),
    ("quant.gptq", {"damp": 0.0}, "damp"),
    ("quant.gptq", {"group_size": 128, "block_size": 64}, "block_size"),
    ("quant.int4", {"targets": ("q_proj", "embed_tokens")}, "targets"),
    ("quant.int8", {"kernel": "vnni"}, "kernel"),
    ("quant.gptq", {"bits": 4, "kernel": "dynamic"}, "kernel"),
])
def test_invalid_config_names_pass_and_field(name, options, field):
    with pytest.raises(PassError, match=rf"{name}: .*{field}"):
        make_config(name, options)


@pytest.mark.parametrize("name,options", [(n, o) for n, o, _ in PASSES], ids=IDS)
def test_model_errors_raise_before_any_change(name, options, calib):
    # tied lm_head
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match=rf"{name}: targets .*lm_head.*tied"):
        run_pass(model, name, {**options, "targets": ("q_proj", "lm_head")}, calib)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # group_size not dividing in_features (down_proj has in_features=96): quant.int4 and quant.gptq fall back
    # for that layer alone to the largest power-of-two group >= 16 that divides (32)
    if name in ("quant.int4", "quant.gptq") and options.get("bits", 4) == 4:
        model, report, _ = run_pass(tiny_model(intermediate_size=96), name, {**options, "group_size": 64}, calib)
        down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
        assert sorted(report["fallbacks"]) == down
        assert all(report["fallbacks"][n]["group_size"] == 32 for n in down)
        for n, m in model.named_modules():
            if isinstance(m, Int4Linear):
                assert m.group_size == (32 if n in down else 64), n
    # double quantization
    model = tiny_model()
    model, _, _ = run_pass(model, name, options, calib)
    with pytest.raises(PassError, match=rf"{name}: .*already quantized by {name}"):
        run_pass(model, name, options, calib)
    with pytest.raises(PassError, match="already quantized by"):
        run_pass(model, "quant.int8", {}, calib)


def test_gptq_needs_calibration():
    with pytest.raises(PassError, match="quant.gptq: needs calibration"):
        get_pass("quant.gptq").apply(tiny_model(), make_config("quant.gptq", {}), None)


@pytest.mark.parametrize("name,options", [("quant.int4", {"group_size": 32}), ("quant.gptq", {"group_size": 32})])
def test_untied_lm_head_is_quantized_and_reloads(name, options, calib, tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(x)
    model, report, cfg = run_pass(model, name, {**options, "targets": ("down_proj", "lm_head")}, calib)
    assert report["modules"][-1] == "lm_head" and isinstance(model.lm_head, Int4Linear)
    with torch.no_grad():
        out = model(x)
    assert relative_error(out, ref) < 0.08
    assert torch.equal(reload(model, [(name, cfg, report)], tmp_path)(x), out)


def test_quantize_after_pruning_keeps_zeros(calib, tmp_path):
    model = tiny_model()
    model, prune_report = get_pass("prune.magnitude").apply(model, make_config("prune.magnitude", {"sparsity": 0.5}))
    model, report, cfg = run_pass(model, "quant.int4", {"group_size": 32}, calib)
    total, nonzero = count_parameters(model)
    q = model.model.layers[0].mlp.up_proj
    assert torch.count_nonzero(q.dequantize()) <= q.in_features * q.out_features // 2
    assert nonzero < 0.6 * total
    prune_cfg = make_config("prune.magnitude", {"sparsity": 0.5})
    loaded = reload(model, [("prune.magnitude", prune_cfg, prune_report), ("quant.int4", cfg, report)], tmp_path)
    x = torch.randint(0, 97, (1, 8))  # 8 rows: the decode kernels, so both models pinned to each
    with torch.no_grad():
        for choice in each_kernel_choice(model, loaded):
            assert torch.equal(loaded(x), model(x)), choice


# -- modules and kernels ------------------------------------------------------------------------------------

def random_linear(in_f: int, out_f: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, 0, 0.02)
    if bias:
        nn.init.normal_(lin.bias, 0, 0.02)
    return lin


def test_int4_pack_roundtrip():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # documented nibble order


@pytest.mark.parametrize("make", [
    lambda lin: Int8Linear.from_linear(lin),
    lambda lin: Int4Linear.from_linear(lin, 32),
    lambda lin: Int4Linear.from_linear(lin, 128),
], ids=["int8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_dequantized_reference(make, bias):
    q = make(random_linear(256, 96, bias))
    x = torch.randn(2, 3, 256)  # 6 rows: the kernel path
    ref = nn.functional.linear(x, q.dequantize(), q.bias)
    scale = ref.abs().max()
    q.kernel_dtype = torch.float32  # the kernel's exact fp32 path
    with torch.no_grad():
        y = q(x)
    assert q._kernel_cache is not None and q._kernel_ok  # the kernel really ran
    assert torch.allclose(y, ref, atol=1e-4 * scale, rtol=0)
    q.kernel_dtype = torch.bfloat16  # the fast default for fp32 activations
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.float32 and relative_error(y, ref) < 1e-2
    with torch.no_grad():  # bf16 activations go straight in
        yb = q.to(torch.bfloat16)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and relative_error(yb.float(), ref) < 2e-2
    # many rows take the exact dequantize-then-matmul path
    xl = torch.randn(64, 256)
    with torch.no_grad():
        assert torch.allclose(q.float()(xl), nn.functional.linear(xl, q.dequantize(), q.bias), atol=1e-6)


def test_kernel_fallback_for_unsupported_shape():
    q = Int4Linear.from_linear(random_linear(64, 40), 8)  # groups of 8: torch's int4 kernel takes 32..256 only
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = q(x)
    assert not q._kernel_ok
    assert torch.allclose(y, x @ q.dequantize().t(), atol=1e-6)


def test_int4_kernel_serves_output_widths_that_are_not_whole_tiles():
    """The packing needs output rows in tiles of 16: 40 rows (a trimmed vocabulary's 20,175) are padded with
    zero-scale rows and sliced off, instead of dequantizing the whole matrix on every call."""
    q = Int4Linear.from_linear(random_linear(64, 40), 32)
    q.kernel_choice = "packed"
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = q(x)
    assert q._kernel_ok and q._kernel_cache is not None and y.shape == (1, 40)
    assert torch.allclose(y, x @ q.dequantize().t(), rtol=2e-2, atol=2e-2)  # bf16 kernel rounding


def test_kernel_cache_follows_state_dict_loads():
    a = Int4Linear.from_linear(random_linear(64, 32, seed=0), 32)
    b = Int4Linear.from_linear(random_linear(64, 32, seed=1), 32)
    x = torch.randn(1, 64)
    with torch.no_grad():
        a(x)  # fills a's kernel cache
        a.load_state_dict(b.state_dict())  # in-place copy
        assert torch.equal(a(x), b(x))


def test_kernel_cache_follows_in_place_edits_and_inference_tensors():
    lin = random_linear(64, 32)
    x = torch.randn(1, 64)
    for make in (lambda: Int8Linear.from_linear(lin), lambda: Int4Linear.from_linear(lin, 32)):
        q = make()
        with torch.no_grad():
            y = q(x)
            q.scales.mul_(2)  # an in-place edit of a source buffer
            assert torch.allclose(q(x), 2 * y, rtol=1e-2, atol=1e-6)
        with torch.inference_mode():  # a module built in inference mode still uses (and caches) the kernel
            qi = make()
            assert torch.allclose(qi(x), y, rtol=0, atol=0)
            assert qi._kernel_ok and qi._kernel_cache is not None


def test_meta_construction_and_state_dict_layout():
    with torch.device("meta"):
        q8, q4 = Int8Linear(256, 96, bias=True), Int4Linear(256, 96, group_size=64)
    assert q8.logical_parameters() == (256 * 96 + 96,) * 2
    assert {k: (tuple(v.shape), v.dtype) for k, v in q4.state_dict().items()} == {
        "weight_int4": ((96, 128), torch.uint8), "scales": ((96, 4), torch.float32),
        "zeros": ((96, 4), torch.uint8)}
    assert {k: v.dtype for k, v in q8.state_dict().items()} == {
        "bias": torch.float32, "weight_int8": torch.int8, "scales": torch.float32}


def test_rtn_output_error():
    lin = random_linear(256, 128)
    x = torch.randn(64, 256)
    ref = lin(x).detach()
    with torch.no_grad():
        e8 = relative_error(Int8Linear.from_linear(lin)(x), ref)
        e4 = relative_error(Int4Linear.from_linear(lin, 32)(x), ref)
        e4_128 = relative_error(Int4Linear.from_linear(lin, 128)(x), ref)
    assert e8 < 0.01
    assert e4 < 0.1
    assert e4 < e4_128  # smaller groups, smaller error


def test_state_bytes_ratios(calib):
    model = tiny_model()
    proj = [n for n, m in model.named_modules() if n.endswith("_proj")]

    def proj_bytes(m):
        sd = state_dict_for_save(m)
        return sum(t.numel() * t.element_size() for k, t in sd.items() if k.rsplit(".", 1)[0] in proj)

    fp32 = proj_bytes(model)
    int8 = proj_bytes(run_pass(tiny_model(), "quant.int8", {}, calib)[0])
    int4 = proj_bytes(run_pass(tiny_model(), "quant.int4", {"group_size": 32}, calib)[0])
    weights = fp32 // 4
    assert int8 == weights + 2 * sum(model.get_submodule(n).out_features for n in proj)  # + one fp16 scale per row
    assert 0.25 <= int8 / fp32 < 0.27
    # 0.5 byte per weight + one fp32 scale (`minmax`: not fp16 values) and one uint8 zero per 32 weights
    assert int4 == weights // 2 + weights * 5 // 32
    assert 0.125 <= int4 / fp32 < 0.17
    # q4_1 / q4_0 scales are fp16 values: stored as fp16, as in GGUF's blocks
    int4_q41 = proj_bytes(run_pass(tiny_model(), "quant.int4", {"group_size": 32, "format": "q4_1"}, calib)[0])
    assert int4_q41 == weights // 2 + weights * 3 // 32


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "minmax", "int8"])
def test_scales_that_are_fp16_values_are_stored_as_fp16_and_load_exactly(fmt, tmp_path):
    """On disk, fp16-valued scales take 2 bytes; the loaded module holds the same fp32 numbers and computes the
    same outputs; scales fp16 cannot hold (`minmax`) stay fp32; the bytes a pass reports are the file's."""
    from slmkit.compress.base import state_bytes

    name, opts = ("quant.int8", {}) if fmt == "int8" else ("quant.int4", {"group_size": 32, "format": fmt})
    q, report, cfg = run_pass(tiny_model(), name, opts, None)
    back = reload(q, [(name, cfg, report)], tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    scale_dtypes = {v.dtype for k, v in stored.items() if k.endswith(".scales")}
    assert scale_dtypes == ({torch.float32} if fmt == "minmax" else {torch.float16})
    assert state_bytes(q) == sum(t.numel() * t.element_size() for t in stored.values())
    for (n, a), (_, b) in zip(q.named_modules(), back.named_modules()):
        if isinstance(a, (Int4Linear, Int8Linear)):
            assert b.scales.dtype == torch.float32 and torch.equal(a.scales, b.scales), n
    ids = torch.randint(0, q.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(q(ids), back(ids))


# -- GPTQ ----------------------------------------------------------------------------------------------------

def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs driven by a few latent factors plus small noise, with a few loud features: X (n, d)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)
    x = latent + 0.1 * torch.randn(n, d, generator=g)
    return x * torch.linspace(0.2, 3.0, d)[torch.randperm(d, generator=g)]


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float((X @ W.t() - X @ W_hat.t()).norm())  # ‖WXᵀ − ŴXᵀ‖


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, None)])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, bits, group_size):
    W = random_linear(256, 64).weight.detach()
    X = correlated_inputs(2048, 256)
    H = 2 * X.t() @ X / X.shape[0]
    gptq = gptq_quantize(W, H, bits=bits, group_size=group_size, act_order=act_order, block_size=128)
    rtn = rtn_quantize(W, bits, group_size)
    e_gptq = reconstruction_error(W, gptq.dequantize(), X)
    e_rtn = reconstruction_error(W, rtn.dequantize(), X)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    assert gptq.codes.dtype == (torch.uint8 if bits == 4 else torch.int8)


def test_gptq_identity_hessian_equals_rtn():
    W = random_linear(128, 48).weight.detach()
    H = torch.eye(128) * 2.0  # uncorrelated, equal-variance inputs
    for bits, g in [(4, 32), (8, None)]:
        for act_order in (False, True):
            gptq = gptq_quantize(W, H, bits=bits, group_size=g, act_order=act_order, block_size=64)
            rtn = rtn_quantize(W, bits, g)
            assert torch.equal(gptq.codes, rtn.codes)
            assert torch.equal(gptq.scales, rtn.scales)


def test_gptq_dead_inputs_get_zero_weight():
    W = random_linear(64, 16).weight.detach()
    X = torch.randn(256, 64)
    X[:, 5] = 0
    q = gptq_quantize(W, X.t() @ X, bits=4, group_size=32, block_size=64)
    assert torch.all(q.dequantize()[:, 5] == 0)


def test_gptq_model_error_not_worse_than_rtn(calib):
    x = calib.input_ids[:4]
    ref = tiny_model()(x).detach()
    rtn = run_pass(tiny_model(), "quant.int4", {"group_size": 32}, calib)[0]
    gptq, report, _ = run_pass(tiny_model(), "quant.gptq", {"group_size": 32}, calib)
    with torch.no_grad():
        e_rtn, e_gptq = relative_error(rtn(x), ref), relative_error(gptq(x), ref)
    assert e_gptq < e_rtn
    assert all(r["loss"] >= 0 and r["calibration_rows"] == 8 * 32 for r in report["layers"].values())


def test_gptq_on_mixture_of_experts_reloads(tmp_path):
    """Experts see only their routed tokens (possibly none: then GPTQ falls back to round-to-nearest)."""
    model = tiny_model(num_local_experts=4, num_experts_per_tok=1)
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(x)
    model, report, cfg = run_pass(model, "quant.gptq", {"group_size": 32}, Calibration(torch.randint(0, 97, (1, 3))))
    rows = {n: r["calibration_rows"] for n, r in report["layers"].items() if ".experts." in n}
    assert len(rows) == 2 * 4 * 3 and sum(rows.values()) == 2 * 3 * 3  # each token to one expert, 3 projections
    with torch.no_grad():
        out = model(x)
    assert relative_error(out, ref) < 0.1
    loaded = reload(model, [("quant.gptq", cfg, report)], tmp_path)
    # Experts see a few rows each, so they take the decode kernels: pin both models to each (auto times them per
    # model). Not torch.equal: the MoE forward differs by ~1e-8 between two copies of one fp32 model.
    with torch.no_grad():
        for choice in each_kernel_choice(model, loaded):
            assert torch.allclose(loaded(x), model(x), rtol=0, atol=1e-5), choice


@pytest.mark.parametrize("name,options", [("quant.gptq", {"bits": 4, "group_size": 32}),
                                          ("quant.int8", {"kernel": "weight_only"})], ids=["gptq4", "int8"])
def test_linformer_model_quantizes_reloads_and_decodes(name, options, calib, tmp_path):
    """Linformer's E, F are parameters, not Linears: passes quantize q/k/v/o around them, and the reloaded model
    decodes with its KV cache as its own full forward does (the batched path at T >= (W + 2) b)."""
    model = tiny_model(attention_type="linformer", linformer_k=2, linformer_block=4, linformer_window=1)
    x = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        ref = model(x)
    model, report, cfg = run_pass(model, name, options, calib)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, (Int4Linear, Int8Linear)) and isinstance(attn.proj_k, nn.Parameter)
    loaded = reload(model, [(name, cfg, report)], tmp_path)
    for m in loaded.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            # The full forward (38 rows) takes the exact path and the decode steps the kernels: compare them with
            # the kernels' fp32 arithmetic, not bf16 rounding (whose bounds test_kernel_matrix.py checks), and
            # always through the kernels, whatever `auto` measures on this CPU.
            m.kernel_dtype, m.kernel_choice = torch.float32, "packed"
    with torch.no_grad():
        full = loaded(x)
        cache = loaded.new_cache(2, 32)
        steps = [loaded(x[:, :7], cache=cache)] + [loaded(x[:, t:t + 1], cache=cache) for t in range(7, 19)]
    assert relative_error(full, ref) < 0.1
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_prompt_prefill_multiplies_in_bf16_only_where_native_and_only_inside(cls):
    """`prompt_prefill()` (generate's and the engine's prefill): many-row fp32 inputs of a quantized layer multiply
    in bf16 on CPUs with native bf16 (the exact weight rounded to bf16, fp32 accumulation), the exact fp32 product
    elsewhere; outside the context, and with gradients on, always the exact product."""
    from slmkit.compress import qlinear
    from slmkit.train.loop import cpu_has_fast_bf16

    lin = random_linear(256, 96, bias=True)
    q = cls.from_linear(lin)
    x = torch.randn(40, 256)  # more rows than the decode kernels take
    exact = torch.nn.functional.linear(x, q.dequantize(torch.float32), q.bias)
    with torch.no_grad():
        assert torch.equal(q(x), exact)
        with qlinear.prompt_prefill():
            inside = q(x)
            with torch.enable_grad():
                assert torch.equal(q(x), exact)
        assert torch.equal(q(x), exact)  # the flag is restored
    if cpu_has_fast_bf16():
        bf16 = torch.nn.functional.linear(x.bfloat16(), q.dequantize(torch.float32).bfloat16()).float() + q.bias
        assert torch.equal(inside, bf16) and not torch.equal(inside, exact)
        assert (inside - exact).abs().max() < 0.02 * exact.abs().max()
    else:
        assert torch.equal(inside, exact)
