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
from .kd_losses import combine, divergence_per_position, softened_logprobs, topk_buckets


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
        T = self.temperature
        with torch.enable_grad():
            z = logits.requires_grad_(need_grad)  # (n, V), a fresh fp32 tensor of this chunk
            s_full = softened_logprobs(z, T)  # (n, V), formed once per chunk
            if self.with_kd:
                if self.topk is not None:
                    ids, logprobs, tail = (t[rows] for t in self.topk)
                    s_logp, t_logp = topk_buckets(s_full, ids, logprobs, tail)  # (n, k+1) each
                else:
                    s_logp, t_logp = s_full, softened_logprobs(self.teacher(rows), T)  # (n, V) each
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
