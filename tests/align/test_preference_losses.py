"""Preference losses against hand-computed values: DPO's log 2 at equal log-ratios and its label smoothing,
IPO's target margin 1/(2 beta) on token-averaged log-ratios, SimPO's length normalisation and margin."""

import math

import pytest
import torch

from slmkit.align.preference_losses import (PREFERENCE_LOSSES, PreferenceConfig, PreferenceLogps,
                                            PreferenceLossError)


def logps(pc, pr, rc=None, rr=None, nc=1.0, nr=1.0):
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(pc)
    return PreferenceLogps(t(pc), t(pr), t(rc), t(rr), t([nc] * n if isinstance(nc, float) else nc),
                           t([nr] * n if isinstance(nr, float) else nr))


def run(name, lp, **kw):
    return PREFERENCE_LOSSES[name](lp, PreferenceConfig(loss=name, **kw))


def test_dpo_is_log2_at_equal_log_ratios_with_or_without_smoothing():
    lp = logps([-5.0, -9.0], [-7.0, -2.0], [-4.0, -10.0], [-6.0, -3.0])  # both ratios equal per pair
    for eps in (0.0, 0.2):
        losses, cr, rr = run("dpo", lp, beta=0.1, label_smoothing=eps)
        torch.testing.assert_close(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    torch.testing.assert_close(cr, torch.tensor([-0.1, 0.1], dtype=torch.float64))  # beta * (pi - ref)
    torch.testing.assert_close(rr, torch.tensor([-0.1, 0.1], dtype=torch.float64))


def test_dpo_hand_values_and_label_smoothing():
    # h = (-3 - -5) - (-8 - -6) = 4; beta h = 2
    lp = logps([-3.0], [-8.0], [-5.0], [-6.0])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    losses, _, _ = run("dpo", lp, beta=0.5)
    assert losses.item() == pytest.approx(-math.log(sig(2.0)))
    losses, _, _ = run("dpo", lp, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(-0.9 * math.log(sig(2.0)) - 0.1 * math.log(sig(-2.0)))
    # Smoothing bounds how far a pair is pushed: the smoothed loss is minimal at a finite margin.
    hs = torch.linspace(0, 40, 4001, dtype=torch.float64)
    grid = logps(hs.tolist(), [0.0] * len(hs), [0.0] * len(hs), [0.0] * len(hs))
    best = hs[run("dpo", grid, beta=0.5, label_smoothing=0.1)[0].argmin()].item()
    assert best == pytest.approx(math.log(0.9 / 0.1) / 0.5, abs=0.02)  # sigmoid(beta h) = 1 - eps


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    lp = PreferenceLogps(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]), torch.ones(1), torch.ones(1))
    PREFERENCE_LOSSES["dpo"](lp, PreferenceConfig(beta=0.1))[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # -beta/2, +beta/2


def test_ipo_is_minimal_at_the_target_margin_of_token_averaged_ratios():
    beta = 0.25  # target h = 1/(2 beta) = 2
    hs = torch.linspace(-2, 6, 801, dtype=torch.float64)
    # chosen: 4 tokens whose summed log-ratio is 4h -> averaged ratio h; rejected ratio 0
    lp = logps((4 * hs).tolist(), [-1.0] * len(hs), [0.0] * len(hs), [-1.0] * len(hs), nc=4.0, nr=3.0)
    losses, cr, rr = run("ipo", lp, beta=beta)
    assert hs[losses.argmin()].item() == pytest.approx(2.0)
    assert losses.min().item() == pytest.approx(0.0)
    torch.testing.assert_close(losses, (hs - 2.0) ** 2)
    torch.testing.assert_close(cr, beta * hs)  # rewards use the token-averaged ratio
    assert losses[200].item() == pytest.approx(4.0)  # hs[200] = 0: (0 - 1/(2 beta))^2 at the start


def test_simpo_length_normalisation_and_margin():
    beta, gamma = 2.0, 0.5
    # average log-probs -1.0 (chosen, 10 tokens) and -1.5 (rejected, 4 tokens)
    lp = logps([-10.0], [-6.0], nc=10.0, nr=4.0)
    losses, cr, rr = run("simpo", lp, beta=beta, gamma=gamma)
    z = beta * (-1.0) - beta * (-1.5) - gamma
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))))
    assert (cr.item(), rr.item()) == pytest.approx((-2.0, -3.0))
    # Only the per-token average matters: doubling lengths and sums changes nothing.
    doubled, _, _ = run("simpo", logps([-20.0], [-12.0], nc=20.0, nr=8.0), beta=beta, gamma=gamma)
    torch.testing.assert_close(doubled, losses)
    # Equal averages: the loss is -log sigmoid(-gamma), > log 2 because of the margin.
    eq, _, _ = run("simpo", logps([-3.0], [-6.0], nc=3.0, nr=6.0), beta=beta, gamma=gamma)
    assert eq.item() == pytest.approx(-math.log(1 / (1 + math.exp(gamma)))) and eq.item() > math.log(2)


def test_config_defaults_and_errors():
    assert PreferenceConfig().beta == 0.1 and PreferenceConfig(loss="simpo").beta == 2.0
    assert not PreferenceConfig(loss="simpo").needs_reference and PreferenceConfig(loss="ipo").needs_reference
    with pytest.raises(PreferenceLossError, match="unknown preference loss 'kto'"):
        PreferenceConfig(loss="kto")
    with pytest.raises(PreferenceLossError, match="not ipo"):
        PreferenceConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(PreferenceLossError, match="beta"):
        PreferenceConfig(beta=0.0)
    with pytest.raises(PreferenceLossError, match="label_smoothing"):
        PreferenceConfig(label_smoothing=0.5)
    with pytest.raises(PreferenceLossError, match="needs reference"):
        run("dpo", logps([-1.0], [-2.0]))
