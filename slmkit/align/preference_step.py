"""Preference optimisation on the shared training loop: the batch source, the step function and the
held-out evaluator.

A batch of b pairs is 2b sequences — the b chosen then the b rejected, each `prompt + completion` — run
through the policy in *one* forward. To keep the loop's token count honest (`batch["input_ids"].numel()`),
the batch travels packed: `input_ids` is the flat concatenation of the 2b real sequences (no padding),
with `seq_lens` and `prompt_lens` per sequence; the step right-pads them on the device (causal attention
never looks right, so padding needs no mask). A sequence's log-probability is the sum over its completion
tokens of log pi(token | everything before it); prompt and padding positions carry no loss.

Batches are a pure function of (seed, step): pair order is a seeded permutation per epoch, so a resumed run
sees exactly the pairs an uninterrupted one would, and processes split one global batch by rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..train.steps import auxiliary_loss
from .preference_data import PreferenceExample
from .preference_losses import PREFERENCE_LOSSES, PreferenceConfig, PreferenceLogps


def collate_pairs(examples: list[PreferenceExample], ref: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Pack pairs: rows 0..b-1 are `prompt + chosen`, rows b..2b-1 `prompt + rejected`. `ref` (b, 2) holds
    the reference's summed log-probs of (chosen, rejected) per pair."""
    seqs = [np.concatenate([e.prompt, e.chosen]) for e in examples] + \
           [np.concatenate([e.prompt, e.rejected]) for e in examples]
    batch = {"input_ids": torch.from_numpy(np.concatenate(seqs)),  # (N,) every real token once
             "seq_lens": torch.tensor([len(s) for s in seqs], dtype=torch.long),  # (2b,)
             "prompt_lens": torch.tensor([len(e.prompt) for e in examples] * 2, dtype=torch.long)}  # (2b,)
    if ref is not None:
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]]).float()  # (2b,)
    return batch


def unpack(batch: dict[str, torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (R, T), labels (R, T-1)) from a packed batch. labels[r, j] is the token at j+1 when it is a
    completion token of row r, else -100."""
    lens, prompt_lens = batch["seq_lens"], batch["prompt_lens"]
    R, T = lens.numel(), int(lens.max())
    pos = torch.arange(T, device=lens.device)
    real = pos[None, :] < lens[:, None]  # (R, T)
    ids = torch.full((R, T), pad_id, dtype=torch.long, device=lens.device)
    ids[real] = batch["input_ids"]  # row-major boolean indexing matches the concatenation order
    target_pos = pos[None, 1:]  # (1, T-1): the position each label predicts
    completion = (target_pos >= prompt_lens[:, None]) & (target_pos < lens[:, None])  # (R, T-1)
    labels = torch.where(completion, ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return ids, labels


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs (R,), completion tokens (R,)) of a packed batch."""
    ids, labels = unpack(batch)
    logits = model(ids)[:, :-1]  # (R, T-1, V): position j predicts token j+1
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                          reduction="none").view(labels.shape)  # (R, T-1), 0 where ignored
    return -nll.sum(-1), (labels != -100).sum(-1)


def _logps_of(batch: dict, logp: torch.Tensor, ntok: torch.Tensor) -> PreferenceLogps:
    b = logp.numel() // 2
    ref = batch.get("ref_logps")
    return PreferenceLogps(logp[:b], logp[b:], None if ref is None else ref[:b], None if ref is None else ref[b:],
                           ntok[:b].float(), ntok[b:].float())


class PreferenceStep:
    """Step function: the configured preference loss over one packed micro-batch of pairs."""

    def __init__(self, cfg: PreferenceConfig):
        self.cfg, self.loss_fn = cfg, PREFERENCE_LOSSES[cfg.loss]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logp, ntok = sequence_logps(model, batch)
        lp = _logps_of(batch, logp, ntok)
        losses, chosen_r, rejected_r = self.loss_fn(lp, self.cfg)
        loss = losses.mean()
        metrics = {"loss": loss.detach(), "reward_accuracy": (chosen_r > rejected_r).float().mean(),
                   "reward_margin": (chosen_r - rejected_r).mean(), "chosen_reward": chosen_r.mean(),
                   "rejected_reward": rejected_r.mean(), "logps_chosen": lp.policy_chosen.detach().mean(),
                   "logps_rejected": lp.policy_rejected.detach().mean()}
        if lp.ref_chosen is not None:
            # Per-token log-ratio on the chosen completions, token-weighted: sum(log pi - log ref) / tokens. On
            # samples from pi this estimates KL(pi || ref) per token; on dataset completions it is a drift
            # gauge (it can be negative), which is what it is here.
            metrics["kl_chosen"] = ((lp.policy_chosen.detach() - lp.ref_chosen).sum()
                                    / lp.chosen_tokens.sum().clamp(min=1))
        aux = auxiliary_loss(model)
        if aux is not None:  # MoE load balancing, as in pretraining
            metrics["aux_loss"] = aux.detach()
            loss = loss + aux
        return loss, metrics


class PreferenceBatches:
    """Deterministic batches of pairs: step s takes positions s*B .. s*B+B-1 of an endless sequence of
    epochs, each a seeded permutation of the training pairs."""

    def __init__(self, examples: list[PreferenceExample], indices: list[int], ref: torch.Tensor | None,
                 global_batch: int, seed: int):
        if not indices:
            raise ValueError("no training pairs left after the held-out split; add pairs or lower --val-fraction")
        self.examples, self.indices, self.ref = examples, np.asarray(indices), ref
        self.global_batch, self.seed = global_batch, seed

    def pair_ids(self, step: int) -> np.ndarray:
        n = len(self.indices)
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        out = np.empty_like(pos)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            out[sel] = self.indices[perm[pos[sel] % n]]
        return out

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        ids = self.pair_ids(step)[rows]
        return collate_pairs([self.examples[i] for i in ids], None if self.ref is None else self.ref[ids])


@torch.no_grad()
def preference_logps(model: torch.nn.Module, examples: list[PreferenceExample], *, batch_size: int,
                     device: torch.device, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, 2) summed log-probs of (chosen, rejected), (N, 2) completion tokens) in eval mode."""
    was_training = model.training
    model.eval()
    logps, ntoks = [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(examples[start:start + batch_size], None).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logp, ntok = sequence_logps(model, batch)
            b = logp.numel() // 2
            logps.append(torch.stack([logp[:b], logp[b:]], 1).float().cpu())
            ntoks.append(torch.stack([ntok[:b], ntok[b:]], 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(logps), torch.cat(ntoks)


def preference_evaluator(examples: list[PreferenceExample], ref: torch.Tensor | None, cfg: PreferenceConfig, *,
                         byte_lengths: np.ndarray, batch_size: int, device: torch.device,
                         amp_dtype: torch.dtype | None) -> Callable[[torch.nn.Module], dict]:
    """`evaluate(model) -> dict` on held-out pairs: `accuracy` (fraction whose chosen reward beats the rejected
    one), `loss` (the preference loss), `reward_margin`, and `bits_per_byte` of the chosen completions (does
    the policy still find the preferred text likely?). `ref` (N, 2) is the reference for these pairs."""
    chosen_bytes = sum(int(byte_lengths[e.chosen[e.chosen < len(byte_lengths)]].sum()) for e in examples)
    loss_fn = PREFERENCE_LOSSES[cfg.loss]

    def evaluate(model: torch.nn.Module) -> dict:
        logp, ntok = preference_logps(model, examples, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
        lp = PreferenceLogps(logp[:, 0], logp[:, 1], None if ref is None else ref[:, 0],
                             None if ref is None else ref[:, 1], ntok[:, 0].float(), ntok[:, 1].float())
        losses, chosen_r, rejected_r = loss_fn(lp, cfg)
        bits = -float(logp[:, 0].sum()) / np.log(2)
        return {"loss": float(losses.mean()), "accuracy": float((chosen_r > rejected_r).float().mean()),
                "reward_margin": float((chosen_r - rejected_r).mean()),
                "bits_per_byte": bits / chosen_bytes if chosen_bytes else float("nan"), "pairs": len(examples)}

    return evaluate
