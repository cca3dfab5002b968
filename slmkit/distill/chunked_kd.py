"""The distillation objective of `KDStep` fused with the student's output projection, chunk by chunk of
positions (see train/chunked_losses.py for the mechanism and the papers): neither the student's nor the
teacher's (B, T, V) logits are ever held whole.

Per chunk of rows the student's logits are softened once, and from those log-probabilities come both the
divergence against the teacher — the online teacher's rows of logits, projected from its own final hidden states
by its own head under no_grad, or the (k+1) buckets of a top-k logit cache — and, at temperature 1, the
next-token cross-entropy. The value is `combine(kd, ce, alpha)` exactly as `KDStep` computes it over full logits:
the divergence summed over the masked positions of the chunk and divided by the batch's count (then times T²),
the cross-entropy summed over non-ignored labels and divided by theirs. The gradient with respect to the
chunk's logits comes from autograd through those same functions (`softened_logprobs`, `topk_buckets`,
`divergence_per_position`, `F.nll_loss`), so the meaning of every loss is the one in kd_losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..train.chunked_losses import OutputHead, compute_dtype, project
from .kd_losses import _WELL_CONDITIONED, combine, divergence_per_position, forward_kl, softened_logprobs, topk_buckets


class TeacherRows:
    """Rows of the teacher's logits (fp32, (n, V)) on demand: projected from its final hidden states (..., d_t)
    with its head, or sliced from logits (..., V) it already produced (a head the fused path cannot use)."""

    def __init__(self, *, hidden: Tensor | None = None, head: OutputHead | None = None,
                 logits: Tensor | None = None):
        if (logits is None) == (hidden is None or head is None):
            raise ValueError("TeacherRows takes either hidden and head, or logits")
        self.logits = None if logits is None else logits.reshape(-1, logits.shape[-1])  # (N, V)
        self.hidden = None if hidden is None else hidden.reshape(-1, hidden.shape[-1])  # (N, d_t)
        self.head = head
        # The matmul dtype is fixed now, under the caller's autocast, as the plain teacher forward would use it.
        self.dtype = None if hidden is None else compute_dtype(self.hidden, head.weight)

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.head.vocab_size

    def __call__(self, rows: slice) -> Tensor:
        with torch.no_grad():
            if self.logits is not None:
                return self.logits[rows]
            return project(self.hidden[rows], self.head, self.dtype)  # (n, V)


class KDObjective:
    """`combine(kd_loss(...), nll_loss(...), alpha)` of KDStep as a chunk objective (see the module docstring).

    labels: (B, T) with -100 ignored by the cross-entropy; mask: (B, T) bool, the positions the KD term
    averages over. Exactly one of `teacher` (online rows) and `topk` (ids, log-probs, tail from a cache) unless
    `alpha == 0`, when no KD term is formed (kd reported as 0), as in KDStep."""
    part_names = ("kd", "ce")
    analytic = True  # forward KL by its closed-form gradient; False: autograd for every divergence (tests)

    def __init__(self, loss: str, *, temperature: float, beta: float, alpha: float, labels: Tensor, mask: Tensor,
                 teacher: TeacherRows | None = None, topk: tuple[Tensor, Tensor, Tensor] | None = None):
        self.loss, self.temperature, self.beta, self.alpha = loss, temperature, beta, alpha
        self.labels = labels.reshape(-1)  # (N,)
        self.mask = mask.reshape(-1).bool()  # (N,)
        self.n_labels = (self.labels != -100).sum().float()
        self.n_mask = self.mask.sum().clamp(min=1).float()
        self.teacher = teacher
        self.topk = None
        if topk is not None:
            ids, logprobs, tail = topk
            k = ids.shape[-1]
            self.topk = (ids.reshape(-1, k), logprobs.reshape(-1, k), tail.reshape(-1))
        self.with_kd = alpha != 0
        if self.with_kd and (teacher is None) == (topk is None):
            raise ValueError("KDObjective needs exactly one of teacher and topk")
        # Peak (rows, V) temporaries: logits and their gradient, log-probs and autograd's saved tensors, and on
        # the online path the teacher's logits and log-probs.
        self.live_tensors = 6.0 + (4.0 if teacher is not None else 0.0) + (2.0 if temperature != 1 else 0.0)

    def value_and_grad(self, logits: Tensor, rows: slice, need_grad: bool):
        if self.loss == "forward_kl" and self.analytic:
            return self._forward_kl(logits, rows, need_grad)
        return self._autograd(logits, rows, need_grad)

    def _teacher_buckets(self, s_full: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        if self.topk is not None:
            ids, logprobs, tail = (t[rows] for t in self.topk)
            return topk_buckets(s_full, ids, logprobs, tail)  # (n, k+1) each
        return s_full, softened_logprobs(self.teacher(rows), self.temperature)  # (n, V) each

    def _forward_kl(self, z: Tensor, rows: slice, need_grad: bool):
        """The default objective (forward KL + cross-entropy) with its gradient in closed form: the values come
        from the same functions as `_autograd`; the gradient with respect to the logits, per row, is

            d kd/dz = alpha·T·m/n_mask · (G − q·ΣG),   q = softmax(z/T), G = dKL/ds (s = log q)
            d ce/dz = (1−alpha)·valid/n_labels · (softmax(z) − onehot(label))

        Dense teacher: G = −p, ΣG = −1. Top-k buckets: G = −p_j at the top-k ids, and the student's tail
        bucket adds −p_tail·q_i/q_tail at every other id (s_tail = log Σ_non-top q), and ΣG = −Σ_b p_b. So
        d kd/dz ∝ q·Σp − p_j at the top-k ids and q_i·(Σp − p_tail/q_tail) elsewhere. p_tail·q_i/q_tail is formed
        as q_i·exp(c), c = log p_tail − log q_tail, except in rows where the top-k hold > 0.999 of the student's
        mass (q_tail may underflow there; the plain path switches to its exact tail there too): exp(s_i + c)."""
        T, alpha = self.temperature, self.alpha
        mask, labels = self.mask[rows], self.labels[rows]  # (n,)
        valid = labels != -100
        target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)  # (n, 1)
        s = softened_logprobs(z, T)  # (n, V)
        kd = z.new_zeros(())
        if self.with_kd:
            s_logp, t_logp = self._teacher_buckets(s, rows)
            per_pos = forward_kl(s_logp, t_logp)  # (n,)
            kd = torch.where(mask, per_pos, torch.zeros_like(per_pos)).sum() / self.n_mask * (T ** 2)
        if T == 1:
            nll = -s.gather(1, target).squeeze(1)  # (n,)
        else:
            lse1 = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
            nll = (lse1 - z.gather(1, target)).squeeze(1)
        ce = torch.where(valid, nll, torch.zeros_like(nll)).sum() / self.n_labels
        value, parts = combine(kd, ce, alpha), torch.stack([kd, ce])
        if not need_grad:
            return value, parts, None

        w_ce = (1.0 - alpha) / self.n_labels * valid.to(z.dtype)  # (n,)
        w_kd = alpha * T / self.n_mask * mask.to(z.dtype) if self.with_kd else torch.zeros_like(w_ce)
        coef = w_ce.clone() if T == 1 else torch.zeros_like(w_ce)  # multiplies q in each row
        top_add, tail_rows = None, None
        if self.with_kd and self.topk is not None:
            p = t_logp.exp()  # (n, k+1)
            s_top = s_logp[:, :-1]  # (n, k)
            live = (p[:, -1] > 0) & mask  # rows whose tail buckets carry gradient
            # c = log(p_tail / q_tail), in log space: q_tail may underflow where the top-k hold all the mass
            c = torch.where(live, t_logp[:, -1] - s_logp[:, -1], torch.full_like(p[:, -1], float("-inf")))
            # Where the top-k hold > 0.999 of the student's mass, q_i·p_tail/q_tail is formed as exp(s_i + c)
            # for those rows alone; elsewhere it is q_i times the row's factor a = exp(c), folded into coef.
            confident = torch.logsumexp(s_top, dim=-1) > _WELL_CONDITIONED  # (n,)
            a = torch.where(confident, torch.zeros_like(c), c.exp())
            coef += w_kd * (p.sum(-1) - a)
            # Top-k entries: w_kd·(q_j·Σp − p_j); coef gave w_kd·q_j·(Σp − a), so add w_kd·(a·q_j − p_j) back.
            a_q_top = torch.where(confident.unsqueeze(1), torch.zeros_like(s_top), (s_top + c.unsqueeze(1)).exp())
            top_add = w_kd.unsqueeze(1) * (a_q_top - p[:, :-1])  # (n, k)
            if bool(confident.any()):
                tail_rows = confident.nonzero(as_tuple=True)[0]
                ids = self.topk[0][rows][tail_rows].long()  # (r, k)
                # exp(s_i + c) at the non-top-k entries only (the top-k's own term would overflow)
                shifted = (s[tail_rows] + c[tail_rows].unsqueeze(1)).scatter_(1, ids, float("-inf"))
                tail_grad = shifted.exp_().mul_(w_kd[tail_rows].unsqueeze(1))  # (r, V)
        elif self.with_kd:
            coef += w_kd
        grad = s.exp_().mul_(coef.unsqueeze(1))  # (n, V), s is spent
        if self.with_kd and self.topk is None:
            grad.sub_(t_logp.exp_().mul_(w_kd.unsqueeze(1)))  # − p·w_kd
        elif top_add is not None:
            if tail_rows is not None:
                grad.index_add_(0, tail_rows, tail_grad, alpha=-1.0)
            grad.scatter_add_(1, self.topk[0][rows].long(), top_add)
        if T != 1:
            grad.add_(z.sub_(lse1).exp_().mul_(w_ce.unsqueeze(1)))  # softmax(z)·w_ce; z is spent
        grad.scatter_add_(1, target, -w_ce.unsqueeze(1))
        return value, parts, grad

    def _autograd(self, logits: Tensor, rows: slice, need_grad: bool):
        T = self.temperature
        with torch.enable_grad():
            z = logits.requires_grad_(need_grad)  # (n, V), a fresh fp32 tensor of this chunk
            s_full = softened_logprobs(z, T)  # (n, V), formed once per chunk
            if self.with_kd:
                s_logp, t_logp = self._teacher_buckets(s_full, rows)
                per_pos = divergence_per_position(self.loss, s_logp, t_logp, beta=self.beta)  # (n,)
                # where, not multiply: a masked-out position may hold inf, and 0·inf = NaN (as kd_loss)
                kept = torch.where(self.mask[rows], per_pos, torch.zeros_like(per_pos))
                kd = kept.sum() / self.n_mask * (T ** 2)
            else:
                kd = z.new_zeros(())
            ce_logp = s_full if T == 1 else softened_logprobs(z, 1.0)
            ce = F.nll_loss(ce_logp, self.labels[rows], ignore_index=-100, reduction="sum") / self.n_labels
            value = combine(kd, ce, self.alpha)
            grad = torch.autograd.grad(value, z)[0] if need_grad and value.requires_grad else None
        if need_grad and grad is None:
            grad = torch.zeros_like(logits)
        return value.detach(), torch.stack([kd.detach(), ce.detach()]), grad
