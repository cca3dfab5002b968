"""The measured choice between a quantized Linear's packed kernel and a dense dequantized copy for
decode-sized inputs (`kernel_choice="auto"`), and the forced choices."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.compress import qlinear
from slmkit.compress.qlinear import Int4Linear, Int8Linear, dynamic_kernel_available

torch.set_num_threads(1)

MAKERS = {
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "int8-dynamic": lambda lin: Int8Linear.from_linear(lin, "dynamic"),
    "int4": lambda lin: Int4Linear.from_linear(lin, 64),
}


def make(kind: str, in_f=128, out_f=64, bias=True, seed=0):
    if kind == "int8-dynamic" and not dynamic_kernel_available():
        pytest.skip("no fbgemm dynamic linear in this build")
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.bias)
    return MAKERS[kind](lin)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_forced_dense_is_the_exact_dequantized_matmul(kind):
    q = make(kind)
    q.kernel_choice = "dense"
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y, F.linear(x, q.dequantize(), q.bias))
    assert q._dense_cache is not None  # the copy is kept for the next call


@pytest.mark.parametrize("kind", list(MAKERS))
def test_forced_packed_never_builds_a_dense_copy(kind):
    q = make(kind)
    q.kernel_choice = "packed"
    with torch.no_grad():
        q(torch.randn(1, 128))
    assert q._dense_cache is None  # the packed kernel ran: torch's, fbgemm's or slmkit's C kernel
    assert q._kernel_cache is not None or getattr(q, "_q8_cache", None) is not None


@pytest.mark.parametrize("kind", list(MAKERS))
def test_auto_measures_once_per_input_kind_and_stays_close_to_the_reference(kind, monkeypatch):
    q = make(kind)
    calls = []
    real = q._small_input_choice

    def spy(x, packed_fn):
        calls.append(tuple(x.shape))
        return real(x, packed_fn)

    monkeypatch.setattr(q, "_small_input_choice", spy)
    x1, x4 = torch.randn(1, 128), torch.randn(4, 128)
    with torch.no_grad():
        for x in (x1, x1, x4, x4):
            ref = F.linear(x, q.dequantize(), q.bias)
            assert float((q(x) - ref).norm() / ref.norm()) < 0.02  # dense is exact; kernels within rounding
    assert len(calls) == 4 and set(q._choices) == {(torch.float32, True), (torch.float32, False)}
    assert set(q._choices.values()) <= {"packed", "dense"}
    if "dense" not in q._choices.values():
        assert q._dense_cache is None  # no copy kept when the kernel won everywhere


def test_auto_picks_the_faster_path(monkeypatch):
    q = make("int4")
    clock = iter(range(10**6))
    slow = {"packed": 10, "dense": 1}  # fake clock ticks per call: dense is 10x faster

    def fake_counter():
        return next(clock)

    # Make each path advance the clock by its cost: wrap F.linear (dense) and the packed matmul.
    ticks = {"n": 0}
    real_linear, real_mm = F.linear, q._matmul

    def dense_linear(*a, **k):
        ticks["n"] += slow["dense"]
        return real_linear(*a, **k)

    def packed_mm(*a, **k):
        ticks["n"] += slow["packed"]
        return real_mm(*a, **k)

    monkeypatch.setattr(qlinear.time, "perf_counter", lambda: ticks["n"])
    monkeypatch.setattr(qlinear.F, "linear", dense_linear)
    monkeypatch.setattr(q, "_matmul", packed_mm)
    with torch.no_grad():
        q(torch.randn(1, 128))
    assert q._choices[(torch.float32, True)] == "dense"
    slow.update(packed=1, dense=10)
    q._choices.clear()
    with torch.no_grad():
        q(torch.randn(1, 128))
    assert q._choices[(torch.float32, True)] == "packed"
    assert q._dense_cache is None


def test_large_layers_never_get_a_dense_copy(monkeypatch):
    monkeypatch.setattr(qlinear, "DENSE_MAX_WEIGHTS", 128 * 63)
    q = make("int4")  # 128 x 64 weights: over the limit
    with torch.no_grad():
        q(torch.randn(1, 128))
    assert q._choices == {} and q._dense_cache is None


def test_state_dict_load_forgets_the_choice_and_the_copy():
    a, b = make("int8", seed=0), make("int8", seed=1)
    a.kernel_choice = "dense"
    x = torch.randn(1, 128)
    with torch.no_grad():
        a(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), F.linear(x, b.dequantize(), b.bias))


def test_unknown_choice_is_a_clear_error():
    q = make("int8")
    q.kernel_choice = "fast"
    with pytest.raises(ValueError, match="kernel_choice='fast' must be one of"):
        with torch.no_grad():
            q(torch.randn(1, 128))


def test_grad_and_many_rows_take_the_reference_path():
    q = make("int4")
    q.kernel_choice = "dense"
    x = torch.randn(64, 128)  # > KERNEL_MAX_ROWS rows
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.dequantize(), q.bias))
    assert q._dense_cache is None  # large inputs dequantize per call; the small-input copy is not built
