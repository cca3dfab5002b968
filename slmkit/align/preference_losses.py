"""Preference losses: pure functions of sequence log-probabilities, chosen by name from `PREFERENCE_LOSSES`.

Every loss takes `PreferenceLogps` — per pair, the policy's (and, where the loss needs one, the frozen
reference's) log-probability of the chosen and the rejected completion, *summed* over completion tokens,
plus each completion's token count — and a `PreferenceConfig`, and returns
`(losses (B,), chosen_rewards (B,), rejected_rewards (B,))`. Rewards are detached; a pair is "won" when
its chosen reward exceeds its rejected reward (held-out preference accuracy).

- `dpo` — Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your
  Language Model is Secretly a Reward Model"): with the log-ratio margin
  h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), loss = -log sigmoid(beta h).
  `label_smoothing` = eps assumes a fraction eps of labels are flipped (conservative DPO, Mitchell 2023,
  "A note on DPO with noisy preferences & relationship to IPO"; robust DPO, Chowdhury et al., 2024):
  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). Implicit rewards beta (log pi - log ref).
- `ipo` — Identity Preference Optimisation (Azar et al., 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences"): loss = (h - 1/(2 beta))^2, a squared regression of the
  margin onto 1/(2 beta) that does not push h to infinity on deterministic preferences. As in the paper's
  token-level implementation and TRL, the log-ratios are *averaged* over each completion's tokens.
- `simpo` — Simple Preference Optimization (Meng et al., 2024, "SimPO: Simple Preference Optimization with
  a Reference-Free Reward"): reward beta/|y| log pi(y), the length-normalised average log-probability;
  loss = -log sigmoid(r_w - r_l - gamma) with a target margin gamma. Needs no reference model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossError(ValueError):
    """A preference-loss setting that does not make sense."""


DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}


@dataclass(frozen=True)
class PreferenceConfig:
    loss: str = "dpo"
    beta: float | None = None  # None: the loss's usual value (DEFAULT_BETA)
    label_smoothing: float = 0.0  # dpo / simpo: assumed fraction of flipped preference labels
    gamma: float = 1.0  # simpo: target reward margin

    def __post_init__(self) -> None:
        if self.loss not in PREFERENCE_LOSSES:
            raise PreferenceLossError(f"unknown preference loss {self.loss!r}; choose one of "
                                      f"{', '.join(PREFERENCE_LOSSES)}")
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.loss])
        if not self.beta > 0:
            raise PreferenceLossError(f"beta={self.beta!r} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise PreferenceLossError(f"label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")
        if self.label_smoothing and self.loss == "ipo":
            raise PreferenceLossError("label_smoothing applies to the sigmoid losses (dpo, simpo), not ipo")
        if self.gamma < 0:
            raise PreferenceLossError(f"gamma={self.gamma!r} must be >= 0")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"

    def to_dict(self) -> dict:
        return asdict(self)


class PreferenceLogps(NamedTuple):
    """Per-pair sequence log-probabilities, each (B,). `ref_*` are None for reference-free losses."""

    policy_chosen: torch.Tensor  # sum over completion tokens of log pi
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor  # completion lengths in tokens
    rejected_tokens: torch.Tensor


Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _need_reference(lp: PreferenceLogps, name: str) -> None:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise PreferenceLossError(f"the {name} loss needs reference log-probabilities")


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-eps) log sigmoid(z) - eps log sigmoid(-z), elementwise."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(lp: PreferenceLogps, cfg: PreferenceConfig) -> Losses:
    """Sigmoid DPO with optional label smoothing (cDPO). Rafailov et al., 2023; Mitchell, 2023."""
    _need_reference(lp, "dpo")
    chosen_ratio = lp.policy_chosen - lp.ref_chosen  # (B,)
    rejected_ratio = lp.policy_rejected - lp.ref_rejected
    losses = _sigmoid_loss(cfg.beta * (chosen_ratio - rejected_ratio), cfg.label_smoothing)
    return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()


def ipo_loss(lp: PreferenceLogps, cfg: PreferenceConfig) -> Losses:
    """IPO: (h - 1/(2 beta))^2 with per-token averaged log-ratios. Azar et al., 2023."""
    _need_reference(lp, "ipo")
    chosen_ratio = (lp.policy_chosen - lp.ref_chosen) / lp.chosen_tokens.clamp(min=1)  # (B,)
    rejected_ratio = (lp.policy_rejected - lp.ref_rejected) / lp.rejected_tokens.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * cfg.beta)) ** 2
    return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()


def simpo_loss(lp: PreferenceLogps, cfg: PreferenceConfig) -> Losses:
    """SimPO: reference-free, length-normalised rewards with target margin gamma. Meng et al., 2024."""
    chosen_reward = cfg.beta * lp.policy_chosen / lp.chosen_tokens.clamp(min=1)  # (B,)
    rejected_reward = cfg.beta * lp.policy_rejected / lp.rejected_tokens.clamp(min=1)
    losses = _sigmoid_loss(chosen_reward - rejected_reward - cfg.gamma, cfg.label_smoothing)
    return losses, chosen_reward.detach(), rejected_reward.detach()


PREFERENCE_LOSSES: dict[str, Callable[[PreferenceLogps, PreferenceConfig], Losses]] = {
    "dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss}
