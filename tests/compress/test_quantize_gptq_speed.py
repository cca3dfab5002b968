"""The fast GPTQ column loop gives what the straightforward one gives (`gptq_reference.py`), bit for bit, and the
pass's calibration shortcuts (float stand-ins for quantized modules, forwards stopped once a stage's inputs are
seen) leave its codes as they were."""

import pytest
import torch

from gptq_reference import gptq_quantize_reference
from slmkit.compress.base import Calibration, get_pass, make_config
from slmkit.compress.gptq import gptq_quantize
from slmkit.compress.qlinear import Int4Linear, Int8Linear
from slmkit.model import CausalLM, ModelConfig

torch.set_num_threads(1)


def correlated(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    X = torch.randn(512, cols, generator=g) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))
    X[:, 3] = 0  # a dead input
    return W, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("options", [
    dict(bits=4, group_size=32), dict(bits=4, group_size=64, act_order=True), dict(bits=8),
    dict(bits=8, act_order=True), dict(bits=4, group_size=32, format="q4_0"),
    dict(bits=4, group_size=64, format="q4_1", act_order=True), dict(bits=4, group_size=32, block_size=64),
], ids=["g32", "g64-act", "int8", "int8-act", "q4_0", "q4_1-act", "block64"])
@pytest.mark.parametrize("shape", [(96, 256), (40, 192)], ids=["96x256", "40x192"])
def test_fast_column_loop_equals_the_reference(options, shape):
    W, H = correlated(*shape)
    fast, ref = gptq_quantize(W, H, **options), gptq_quantize_reference(W, H, **options)
    assert torch.equal(fast.codes, ref.codes) and fast.codes.dtype == ref.codes.dtype
    assert torch.equal(fast.scales, ref.scales)
    assert (fast.zeros is None) == (ref.zeros is None) and (fast.zeros is None or torch.equal(fast.zeros, ref.zeros))
    assert fast.loss == pytest.approx(ref.loss, rel=1e-5)  # summed per block instead of per column
    assert fast.damp == ref.damp


def test_the_thread_count_is_restored():
    W, H = correlated(32, 64)
    torch.set_num_threads(2)
    try:
        gptq_quantize(W, H, bits=4, group_size=32, block_size=64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("options", [dict(bits=4, group_size=32), dict(bits=8, kernel="weight_only"),
                                     dict(bits=8, kernel="dynamic")], ids=["int4", "int8", "int8-dynamic"])
def test_the_pass_leaves_packed_modules_and_the_codes_sequential_calibration_gives(options):
    """Stage by stage with plain full-layer forwards through the packed modules (how the pass first worked) gives
    the same codes as the pass, which stops forwards early and calibrates through float stand-ins."""
    from slmkit.compress.gptq import _HessianAccumulator, _capture_first_layer_inputs, _hidden, _stages
    from slmkit.compress.quantize import _quantized_module, layer_format

    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    calib = Calibration(torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1)))
    cfg = make_config("quant.gptq", options)
    torch.manual_seed(0)
    fast, _ = get_pass("quant.gptq").apply(CausalLM(config).eval(), cfg, calib)
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    with torch.no_grad():
        layers = list(model.model.layers)
        inputs = _capture_first_layer_inputs(model, layers[0], calib)
        for i, layer in enumerate(layers):
            here = {f"model.layers.{i}.{n}": m for n, m in layer.named_modules() if n.endswith("_proj")}
            for stage in _stages(here):
                acc = _HessianAccumulator({n: here[n] for n in stage})
                handles = [here[n].register_forward_pre_hook(acc.hook(n)) for n in stage]
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
                    acc.flush()
                for h in handles:
                    h.remove()
                for n in stage:
                    linear = here[n]
                    fmt = layer_format(cfg, None)
                    qw = gptq_quantize(linear.weight, acc.hessian(n), bits=fmt[0], group_size=fmt[1],
                                       block_size=cfg.block_size)
                    parent, child = n.rsplit(".", 1)
                    setattr(model.get_submodule(parent), child,
                            _quantized_module(linear, fmt, qw.codes, qw.scales, qw.zeros, "quant.gptq"))
            inputs = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
    kinds = (Int8Linear, Int4Linear)
    ours = {n: m for n, m in fast.named_modules() if isinstance(m, kinds)}
    theirs = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    assert not any(type(m) is torch.nn.Linear for n, m in fast.named_modules() if n.endswith("_proj"))
    for n in ours:
        a, b = ours[n].state_dict(), theirs[n].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), n
