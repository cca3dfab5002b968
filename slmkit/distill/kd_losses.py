"""Knowledge-distillation losses: divergences between a teacher's and a student's next-token distributions.

Every divergence here is a pure function of two log-probability tensors on a *shared support* (the last
dimension; any leading shape) and returns one value per position. Trainers pick one by name from
`DIVERGENCES` through `kd_loss`, which masks, averages and applies the temperature correction. With P the
teacher distribution and Q the student's:

- **forward KL**, KL(P‖Q) = Σ p·(log p − log q) — Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
  Neural Network". Both distributions are softened by a temperature T (softmax(z/T)); the loss is multiplied
  by T² because the gradients of the softened targets scale as 1/T², so T² keeps the KD term's magnitude
  comparable to the hard-label cross-entropy when T changes. Mass-covering: the student is pushed to put
  probability wherever the teacher does.
- **reverse KL**, KL(Q‖P) = Σ q·(log q − log p) — Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large
  Language Models". Mode-seeking: the student is punished for mass where the teacher has little, and may ignore
  some teacher modes — the better trade for a small student that cannot cover a large teacher's whole
  distribution in open-ended generation.
- **generalized Jensen-Shannon**, JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M) with M = β·P + (1−β)·Q — Agarwal et al.
  2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD). It is bounded
  and interpolates between the two KLs: JSD(β)/β → KL(P‖Q) as β → 0 and JSD(β)/(1−β) → KL(Q‖P) as β → 1.
  At β = 0 or β = 1 exactly, M equals one of the two distributions and the value is identically 0 (no
  gradient); callers who want those limits should use `forward_kl` / `reverse_kl` instead.

Zero probabilities (log-prob −inf, e.g. a cache's tail bucket when top-k covers the whole vocabulary) follow
the convention 0·log 0 = 0 and give finite values and NaN-free gradients. A positive probability where the
other side has none gives +inf, which is the true value of the divergence.

Two ways to put a teacher and a student on a shared support:

- `dense_logprobs`: the full vocabulary (requires one tokenizer for both models).
- `topk_logprobs`: k+1 buckets from a teacher logit cache that stores only the top-k log-probabilities and the
  log of the remaining mass. The divergence between the two (k+1)-bucket coarse-grainings is exact, and by
  the data-processing inequality it is a lower bound on the full-vocabulary divergence (merging outcomes
  never increases an f-divergence); with k = V it equals it.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "KDError", "forward_kl", "reverse_kl", "jsd", "DIVERGENCES", "dense_logprobs", "topk_logprobs",
    "kd_loss", "validate_kd_config", "combine", "divergence_per_position", "check_same_vocab", "topk_buckets",
    "softened_logprobs",
]


class KDError(ValueError):
    """A distillation setting or input that cannot work; the message says what to do instead."""


# -- divergences on a shared support ------------------------------------------------------------------

def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P‖Q) over the last dim, with 0·log(0/q) = 0. Terms where p = 0 are selected away *before* they
    are multiplied, so neither their value nor their gradient can become NaN (0·(−inf) would)."""
    absent = logp == float("-inf")
    diff = torch.where(absent, torch.zeros_like(logp), logp - logq)  # (..., V)
    return (logp.exp() * diff).sum(-1)  # (...)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher‖student) per position (Hinton et al. 2015): mass-covering. (..., V) -> (...)."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(student‖teacher) per position (MiniLLM, Gu et al. 2024): mode-seeking. (..., V) -> (...)."""
    return _kl(student_logp, teacher_logp)


def jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), (..., V) -> (...):

        JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M),  M = β·P + (1−β)·Q,  P = teacher, Q = student.

    The mixture is formed in log space (logaddexp), so tiny probabilities don't underflow. At β = 0 or 1
    exactly the value is 0 everywhere; use `forward_kl` / `reverse_kl` for those limits."""
    _check_beta(beta)
    if beta == 0.0 or beta == 1.0:
        # M is Q (or P), so both weighted terms vanish. Keep the result attached to the student's graph so a
        # trainer's backward() still works; masking -inf first keeps 0·(−inf) from making NaN.
        finite = torch.where(torch.isfinite(student_logp), student_logp, torch.zeros_like(student_logp))
        return finite.sum(-1) * 0.0
    # Where both are zero, log M would be logaddexp(−inf, −inf), whose gradient is NaN even when multiplied by
    # zero; those terms are dropped by _kl anyway, so feed the mixture a harmless 0 there.
    both_absent = (teacher_logp == float("-inf")) & (student_logp == float("-inf"))
    t = torch.where(both_absent, torch.zeros_like(teacher_logp), teacher_logp)
    s = torch.where(both_absent, torch.zeros_like(student_logp), student_logp)
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))  # (..., V)
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
}


# -- logits / cached top-k -> shared support -------------------------------------------------------------

def _float(x: Tensor) -> Tensor:
    """At least fp32 (fp16/bf16 logits and fp16 caches are upcast; fp64 stays fp64, e.g. for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softened_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / T) in at least fp32; no division at T = 1 (it costs a vocabulary-sized pass)."""
    x = _float(logits)
    return torch.log_softmax(x if temperature == 1 else x / temperature, dim=-1)


def dense_logprobs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Temperature-softened log-probabilities over the full vocabulary: (..., V) each -> (s_logp, t_logp)."""
    _check_temperature(temperature)
    check_same_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    return softened_logprobs(student_logits, temperature), softened_logprobs(teacher_logits, temperature)


def check_same_vocab(v_s: int, v_t: int) -> None:
    """Raise KDError unless the student's and the teacher's vocabularies have the same size."""
    if v_s != v_t:
        raise KDError(
            f"the teacher and student vocabularies differ (V_t={v_t} vs V_s={v_s}); logit KD compares "
            f"distributions token by token and needs a shared tokenizer: rebuild the student's dataset with "
            f"`--tokenizer TEACHER`, or use `slm distill --mode sequence` (trains on teacher-generated text)")


def topk_logprobs(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor,
                  temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher on the (k+1)-bucket support of a teacher top-k cache.

    student_logits: (..., V). topk_ids: (..., k) token ids. topk_logprobs: (..., k) the teacher's log-probs at
    those ids, already softened at the cache's temperature — pass that same `temperature` here. tail_logprob:
    (...) or (..., 1), log of the teacher's remaining mass (−inf when top-k covers everything).
    Returns (s_logp, t_logp), each (..., k+1) with the tail bucket last.

    The student's tail is a logsumexp over its non-top-k log-probs (masking the top-k ids), not
    log(1 − Σ top-k probs): when the top-k hold nearly all the mass, 1 − Σ cancels catastrophically in fp32
    (and a clamp would invent mass that isn't there), while the logsumexp is accurate to relative precision
    and is exactly −inf when k = V. The teacher's buckets are renormalised (log_softmax over the k+1
    buckets) because an fp16 cache's probabilities sum to 1 only up to rounding, and a KL needs two true
    distributions to be ≥ 0."""
    _check_temperature(temperature)
    if topk_ids.shape != topk_logprobs.shape:
        raise KDError(f"teacher cache ids {tuple(topk_ids.shape)} and log-probs {tuple(topk_logprobs.shape)} "
                      f"have different shapes; the cache is corrupt — rebuild it")
    vocab = student_logits.shape[-1]
    if topk_ids.numel() and (int(topk_ids.max()) >= vocab or int(topk_ids.min()) < 0):
        raise KDError(f"teacher cache names token ids up to {int(topk_ids.max())} but the student vocabulary "
                      f"has {vocab} tokens; the cache was built with a different tokenizer — rebuild it with "
                      f"the student's tokenizer, or use `slm distill --mode sequence`")
    return topk_buckets(softened_logprobs(student_logits, temperature), topk_ids, topk_logprobs, tail_logprob)


def topk_buckets(s_full: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """`topk_logprobs` from the student's full log-probabilities (..., V), for callers that already have
    them (a KD step reuses them for its cross-entropy term). Returns (s_logp, t_logp), (..., k+1) each."""
    ids = topk_ids.long()
    s_top = s_full.gather(-1, ids)  # (..., k)
    s_tail = _student_tail(s_full, s_top, ids)  # (..., 1)
    s_logp = torch.cat([s_top, s_tail], dim=-1)  # (..., k+1)

    tail = _float(tail_logprob).to(s_full.dtype)
    if tail.dim() == ids.dim() - 1:
        tail = tail.unsqueeze(-1)  # (..., 1)
    t_logp = torch.log_softmax(torch.cat([_float(topk_logprobs).to(s_full.dtype), tail], dim=-1), dim=-1)
    return s_logp, t_logp  # (..., k+1) each


# Below this top-k mass, log(1 - mass) from the k gathered log-probs is accurate to ~1e-4 relative in fp32.
_WELL_CONDITIONED = math.log(0.999)


def _student_tail(s_full: Tensor, s_top: Tensor, ids: Tensor) -> Tensor:
    """log(student mass outside the top-k), (..., 1). Cheap path: log1mexp of the top-k mass, from k values.
    When the top-k hold nearly all the mass (> 0.999), 1 - mass cancels in fp32, so those rows — and only
    those — take the exact path: a logsumexp over the non-top-k log-probs (−inf exactly when k = V)."""
    lse_top = torch.logsumexp(s_top, dim=-1, keepdim=True)  # (..., 1), <= 0
    tail = torch.log(-torch.expm1(lse_top.clamp(max=_WELL_CONDITIONED)))  # log(1 - exp(lse_top))
    confident = (lse_top > _WELL_CONDITIONED).squeeze(-1)  # (...)
    if bool(confident.any()):
        rows = confident.nonzero(as_tuple=True)
        # One out-of-place scatter masks the top-k ids. A row whose top-k is the whole vocabulary gets
        # logsumexp(all −inf) = −inf, exactly right; its backward is NaN only at entries the scatter overwrote,
        # and scatter's backward replaces (not multiplies) exactly those gradients with zeros.
        exact = torch.logsumexp(s_full[rows].scatter(-1, ids[rows], float("-inf")), -1, keepdim=True)
        tail = tail.index_put(rows, exact)
    return tail


# -- the trainer-facing loss ----------------------------------------------------------------------------------

def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise KDError(f"KD temperature must be a positive number, got {temperature!r} (1.0 = unsoftened; "
                      f"Hinton et al. used 1-20, 2.0 is a common choice)")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise KDError(f"JSD beta must be in [0, 1], got {beta!r} (0.5 = symmetric JSD; near 0 behaves like "
                      f"forward_kl, near 1 like reverse_kl)")


def _check_name(name: str) -> Callable[..., Tensor]:
    try:
        return DIVERGENCES[name]
    except (KeyError, TypeError):
        raise KDError(f"unknown KD loss {name!r}; known: {', '.join(sorted(DIVERGENCES))}") from None


def validate_kd_config(loss: str, temperature: float, beta: float, alpha: float) -> None:
    """Raise KDError for any setting `kd_loss` / `combine` would reject; trainers call it before step one."""
    _check_name(loss)
    _check_temperature(temperature)
    _check_beta(beta)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise KDError(f"KD alpha (weight of the KD loss against next-token cross-entropy) must be in [0, 1], "
                      f"got {alpha!r} (1.0 = pure distillation, 0.0 = no distillation)")


def divergence_per_position(name: str, s_logp: Tensor, t_logp: Tensor, *, beta: float = 0.5) -> Tensor:
    """The divergence `name` at every position, (..., V) -> (...): `kd_loss` before masking and averaging
    (chunked losses sum it chunk by chunk and divide by the whole batch's count)."""
    fn = _check_name(name)
    _check_beta(beta)
    # Divergences declare their hyperparameters as keywords; pass along only those this one takes.
    params = {"beta": beta} if "beta" in inspect.signature(fn).parameters else {}
    return fn(s_logp, t_logp, **params)


def kd_loss(name: str, s_logp: Tensor, t_logp: Tensor, *, mask: Tensor | None = None,
            temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Scalar KD loss: the divergence `name` per position, averaged over positions where `mask` is True
    (shape = the leading shape of the log-probs; None = all), times temperature² (Hinton's gradient-scale
    correction; `temperature` must be the one the log-probs were softened with)."""
    _check_name(name)
    _check_temperature(temperature)
    per_pos = divergence_per_position(name, s_logp, t_logp, beta=beta)  # (...)
    if mask is None:
        loss = per_pos.mean()
    else:
        if mask.shape != per_pos.shape:
            raise KDError(f"KD mask has shape {tuple(mask.shape)} but the log-probs' positions are "
                          f"{tuple(per_pos.shape)}; pass one boolean per position")
        mask = mask.bool()
        # where, not multiply: a masked-out position may hold inf (e.g. padding), and 0·inf = NaN.
        total = torch.where(mask, per_pos, torch.zeros_like(per_pos)).sum()
        loss = total / mask.sum().clamp(min=1)
    return loss * (temperature ** 2)


def combine(kd: Tensor, ce: Tensor, alpha: float) -> Tensor:
    """alpha·kd + (1−alpha)·ce: the distillation objective mixed with next-token cross-entropy."""
    return alpha * kd + (1.0 - alpha) * ce
