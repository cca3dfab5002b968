import math

import pytest
import torch

from slmkit.distill.kd_losses import (
    DIVERGENCES, KDError, combine, dense_logprobs, forward_kl, jsd, kd_loss, reverse_kl, topk_logprobs,
    validate_kd_config,
)

NEG_INF = float("-inf")


def _logp(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def _random_logp(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)


# -- hand-computed values ----------------------------------------------------------------------------------

P, Q = (0.5, 0.5), (0.9, 0.1)  # P = teacher, Q = student


def _kl_by_hand(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_hand_computed_kls():
    t, s = _logp(*P), _logp(*Q)
    assert forward_kl(s, t).item() == pytest.approx(_kl_by_hand(P, Q), rel=1e-12)
    assert reverse_kl(s, t).item() == pytest.approx(_kl_by_hand(Q, P), rel=1e-12)
    assert forward_kl(s, t).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_hand_computed_jsd(beta):
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    expected = beta * _kl_by_hand(P, m) + (1 - beta) * _kl_by_hand(Q, m)
    assert jsd(_logp(*Q), _logp(*P), beta=beta).item() == pytest.approx(expected, rel=1e-12)


# -- identities ------------------------------------------------------------------------------------------

def test_nonnegative_and_zero_on_match():
    s, t = _random_logp(4, 3, 11, seed=1), _random_logp(4, 3, 11, seed=2)
    for name, fn in DIVERGENCES.items():
        assert fn(s, t).shape == (4, 3)
        assert (fn(s, t) >= 0).all(), name
        assert fn(t, t).abs().max() < 1e-12, name


def test_jsd_limits_approach_kls():
    s, t = _random_logp(5, 7, seed=3), _random_logp(5, 7, seed=4)
    b = 1e-4
    torch.testing.assert_close(jsd(s, t, beta=b) / b, forward_kl(s, t), rtol=1e-2, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1 - b) / b, reverse_kl(s, t), rtol=1e-2, atol=0)
    # Exactly at the ends the mixture equals one side: identically zero (documented; use the KLs instead).
    assert jsd(s, t, beta=0.0).abs().max() == 0 and jsd(s, t, beta=1.0).abs().max() == 0


def test_jsd_symmetric_at_half():
    s, t = _random_logp(5, 7, seed=5), _random_logp(5, 7, seed=6)
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    assert (jsd(s, t) <= math.log(2) + 1e-12).all()  # the symmetric JSD is bounded by log 2


def test_temperature_scaling_is_t_squared():
    s, t = _random_logp(2, 3, 5, seed=7), _random_logp(2, 3, 5, seed=8)
    for name in DIVERGENCES:
        base = kd_loss(name, s, t, temperature=1.0)
        assert kd_loss(name, s, t, temperature=3.0).item() == pytest.approx(9 * base.item(), rel=1e-12)


def test_temperature_softens_dense_logprobs():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    s, t = dense_logprobs(z, 2 * z, temperature=2.0)
    torch.testing.assert_close(s, torch.log_softmax(z / 2, -1))
    torch.testing.assert_close(t, torch.log_softmax(z, -1))
    s16, _ = dense_logprobs(z.half(), z.half(), temperature=1.0)
    assert s16.dtype == torch.float32


def test_mask_averages_only_kept_positions():
    s, t = _random_logp(2, 4, 6, seed=9), _random_logp(2, 4, 6, seed=10)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    t_garbage = t.clone()
    t_garbage[~mask] = 0.0  # not a distribution, and huge loss if it leaked
    s_garbage = s.clone()
    s_garbage[~mask] = NEG_INF  # forward KL would be +inf there
    for name in DIVERGENCES:
        expected = DIVERGENCES[name](s, t)[mask].mean()
        got = kd_loss(name, s_garbage, t_garbage, mask=mask)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12), name
    assert kd_loss("forward_kl", s, t, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_minus_inf_teacher_is_finite_with_correct_gradients():
    # Teacher puts zero mass on tokens 2 and 3.
    t = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0]], dtype=torch.float64))
    z = torch.tensor([[0.5, -0.2, 0.1, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = kd_loss("forward_kl", torch.log_softmax(z, -1), t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # d KL(P‖softmax(z)) / dz = softmax(z) − p
    torch.testing.assert_close(z.grad, torch.softmax(z.detach(), -1) - t.exp())
    for beta in (0.1, 0.5, 0.9):
        z.grad = None
        loss = kd_loss("jsd", torch.log_softmax(z, -1), t, beta=beta)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # Both sides zero on a token (e.g. a masked-out vocabulary slot): still finite, no NaN anywhere.
    zz = torch.tensor([[0.5, -0.2, NEG_INF, 1.0]], dtype=torch.float64, requires_grad=True)
    t2 = torch.log(torch.tensor([[0.5, 0.2, 0.0, 0.3]], dtype=torch.float64))
    for name in DIVERGENCES:
        zz.grad = None
        loss = kd_loss(name, torch.log_softmax(zz, -1), t2)
        loss.backward()
        assert torch.isfinite(loss) and not zz.grad.isnan().any(), name


def test_reverse_kl_is_infinite_off_teacher_support():
    t = torch.log(torch.tensor([1.0, 0.0], dtype=torch.float64))
    s = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert reverse_kl(s, t).item() == math.inf  # the true value; mode-seeking punishes it without bound
    assert forward_kl(s, t).item() == pytest.approx(math.log(2))


# -- top-k buckets ---------------------------------------------------------------------------------------

def _teacher_topk(teacher_logits, k, temperature):
    t_full = torch.log_softmax(teacher_logits / temperature, -1)
    vals, ids = t_full.topk(k, dim=-1)
    rest = t_full.scatter(-1, ids, NEG_INF)
    tail = torch.logsumexp(rest, -1) if k < t_full.shape[-1] else torch.full(vals.shape[:-1], NEG_INF)
    return ids, vals, tail


def test_topk_with_full_vocabulary_equals_dense():
    g = torch.Generator().manual_seed(11)
    zs, zt = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g) * 3
    T = 2.0
    ids, vals, tail = _teacher_topk(zt, 9, T)
    dense = dense_logprobs(zs, zt, T)
    bucket = topk_logprobs(zs, ids, vals.half(), tail.half(), T)  # fp16 as on disk
    assert bucket[0][..., -1].eq(NEG_INF).all()  # no tail left for the student either
    for name in DIVERGENCES:
        torch.testing.assert_close(kd_loss(name, *bucket, temperature=T), kd_loss(name, *dense, temperature=T),
                                   rtol=5e-3, atol=1e-4)
    # ... and gradients are finite although both tail buckets are empty
    zs.requires_grad_(True)
    kd_loss("reverse_kl", *topk_logprobs(zs, ids, vals, tail, T)).backward()
    assert torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_lower_bounds_dense(k):
    g = torch.Generator().manual_seed(12 + k)
    zs, zt = torch.randn(4, 5, 16, generator=g) * 2, torch.randn(4, 5, 16, generator=g) * 2
    ids, vals, tail = _teacher_topk(zt, k, 1.0)
    s_b, t_b = topk_logprobs(zs, ids, vals, tail, 1.0)
    assert s_b.shape == (4, 5, k + 1)
    torch.testing.assert_close(s_b.exp().sum(-1), torch.ones(4, 5))
    s_d, t_d = dense_logprobs(zs, zt, 1.0)
    for name in DIVERGENCES:  # data-processing inequality, per position
        assert (DIVERGENCES[name](s_b, t_b) <= DIVERGENCES[name](s_d, t_d) + 1e-5).all(), name


def test_topk_student_tail_is_accurate_when_topk_holds_almost_everything():
    # 1 − Σp would cancel to ~1e-7-level noise in fp32; the masked logsumexp keeps the true tail.
    z = torch.tensor([[20.0, 20.0, 0.0]])
    s_b, _ = topk_logprobs(z, torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.5]])),
                           torch.tensor([NEG_INF]), 1.0)
    expected = 0.0 - torch.logsumexp(z[0].double(), 0).item()
    assert s_b[0, -1].item() == pytest.approx(expected, rel=1e-5)


def test_topk_rejects_ids_beyond_student_vocabulary():
    with pytest.raises(KDError, match="different tokenizer"):
        topk_logprobs(torch.zeros(1, 4), torch.tensor([[7]]), torch.tensor([[-0.1]]), torch.tensor([-2.0]), 1.0)


# -- gradients -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, lambda s, t: jsd(s, t, beta=0.3)])
def test_gradcheck(fn):
    g = torch.Generator().manual_seed(13)
    zs = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn(torch.log_softmax(a, -1), torch.log_softmax(b, -1)),
                                    (zs, zt))


def test_gradcheck_topk():
    g = torch.Generator().manual_seed(14)
    zs = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids, vals, tail = _teacher_topk(torch.randn(2, 6, dtype=torch.float64, generator=g), 2, 1.0)
    assert torch.autograd.gradcheck(lambda z: kd_loss("jsd", *topk_logprobs(z, ids, vals, tail, 1.0)), (zs,))


# -- errors and config --------------------------------------------------------------------------------------

def test_vocab_mismatch_message():
    with pytest.raises(KDError, match=r"--mode sequence") as e:
        dense_logprobs(torch.zeros(1, 5), torch.zeros(1, 7), 1.0)
    assert "V_t=7" in str(e.value) and "V_s=5" in str(e.value) and "--tokenizer TEACHER" in str(e.value)


def test_unknown_name_lists_known():
    s = _random_logp(3, 4)
    with pytest.raises(KDError, match="forward_kl, jsd, reverse_kl"):
        kd_loss("kl", s, s)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    s = _random_logp(3, 4)
    with pytest.raises(KDError, match="temperature"):
        kd_loss("forward_kl", s, s, temperature=temperature)
    with pytest.raises(KDError, match="temperature"):
        dense_logprobs(s, s, temperature)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_bad_beta(beta):
    s = _random_logp(3, 4)
    with pytest.raises(KDError, match="beta"):
        kd_loss("jsd", s, s, beta=beta)
    with pytest.raises(KDError, match="beta"):
        jsd(s, s, beta=beta)


def test_validate_kd_config():
    validate_kd_config("jsd", 2.0, 0.5, 0.5)
    for args, word in [(("nope", 1.0, 0.5, 0.5), "known"), (("jsd", 0.0, 0.5, 0.5), "temperature"),
                       (("jsd", 1.0, 2.0, 0.5), "beta"), (("jsd", 1.0, 0.5, 1.1), "alpha"),
                       (("jsd", 1.0, 0.5, -0.1), "alpha")]:
        with pytest.raises(KDError, match=word):
            validate_kd_config(*args)


def test_combine():
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert combine(kd, ce, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert combine(kd, ce, 1.0).item() == 2.0
