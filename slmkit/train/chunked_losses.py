"""Losses fused with the output projection, computed a chunk of positions at a time: the (B, T, V) logits of a
large vocabulary are never held whole, in the forward pass or the backward.

At a 49,152-token vocabulary, 8 x 256 positions hold 400 MB of fp32 logits, and a loss over them holds as much
again for log-probabilities, their gradient and (in distillation) the teacher's side. The loss only ever needs
one position's row of logits at a time, so the output projection `logits = h @ W.T (+ b)` is folded into it
(the idea of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, and of Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models"):

    for each chunk of rows c (positions of the flattened batch):
        z_c = h_c @ W.T + b                        (n_c, V), the only vocabulary-sized tensors live at once
        loss_c, dloss/dz_c = objective(z_c, c)     contributions to the batch mean (divided by the batch's count)
        grad_h[c]  = dz_c @ W                      (n_c, d)
        grad_W    += dz_c.T @ h_c                  (V, d), accumulated over chunks
    loss = Σ loss_c ;  backward: grad_h, grad_W, grad_b times the incoming scalar gradient

The gradients are computed in the forward pass (Liger's choice, not CCE's recomputation in backward): a CPU
step then does the same three vocabulary-sized matmuls as the plain path, not four, and holds grad_W (the
size of the head's own gradient) and grad_h (B·T·d) between forward and backward instead of the logits. It is
exact: the objective's per-chunk gradient is the analytic one (cross-entropy: softmax − one-hot) or autograd
through the very functions the plain loss uses (distillation), and the sum over chunks of per-chunk
contributions, each divided by the whole batch's count, is the batch mean.

Mixed precision follows what the plain path does under autocast: the projection runs in the autocast dtype
(bf16 on CPU) and its output is upcast to fp32 before any softmax, exactly like `model(x).float()`; the weight
gradient is accumulated in fp32 across chunks.

Chunk size: as many rows as fit a memory budget for the objective's vocabulary-sized temporaries
(`SLMKIT_LOSS_CHUNK_MB`, default 256 MiB), or exactly `SLMKIT_LOSS_CHUNK_ROWS` rows. `SLMKIT_CHUNKED_LOSS=0` makes
the step functions use the plain path (full logits) instead.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENV_ENABLE = "SLMKIT_CHUNKED_LOSS"  # "0" / "false" / "off": plain losses over full logits
ENV_ROWS = "SLMKIT_LOSS_CHUNK_ROWS"  # exact rows per chunk
ENV_BUDGET_MB = "SLMKIT_LOSS_CHUNK_MB"  # memory budget of one chunk's vocabulary-sized temporaries
DEFAULT_BUDGET_MB = 256


# -- settings ----------------------------------------------------------------------------------------

def chunked_losses_enabled() -> bool:
    """False when the environment asks for the plain path (`SLMKIT_CHUNKED_LOSS=0`)."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a positive integer")
    return value


def chunk_rows(n_rows: int, vocab: int, live_tensors: float, *, rows: int | None = None,
               budget_bytes: int | None = None) -> int:
    """Rows per chunk: `rows` (or `SLMKIT_LOSS_CHUNK_ROWS`) if given, else as many as keep `live_tensors` fp32
    (rows, vocab) temporaries within `budget_bytes` (or `SLMKIT_LOSS_CHUNK_MB`, default 256 MiB), rounded down
    to a multiple of 16 for the matmuls; at least 1 and at most `n_rows`."""
    rows = rows if rows is not None else _env_int(ENV_ROWS)
    if rows is None:
        if budget_bytes is None:
            budget_bytes = (_env_int(ENV_BUDGET_MB) or DEFAULT_BUDGET_MB) * 2 ** 20
        rows = int(budget_bytes // max(1.0, live_tensors * vocab * 4))
        rows = rows - rows % 16 if rows >= 32 else max(rows, 1)
    return max(1, min(int(rows), max(n_rows, 1)))


# -- which models can take the fused path --------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "_orig_mod", inner)  # torch.compile


_ACCEPTS_FINAL_HIDDEN: dict[type, bool] = {}


def _accepts_final_hidden(module: nn.Module) -> bool:
    cls = type(module)
    if cls not in _ACCEPTS_FINAL_HIDDEN:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _ACCEPTS_FINAL_HIDDEN[cls] = "return_final_hidden" in params
    return _ACCEPTS_FINAL_HIDDEN[cls]


@dataclass
class OutputHead:
    """The output projection as tensors: logits = hidden @ weight.T (+ bias). weight (V, d), bias (V,)."""
    weight: Tensor
    bias: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


def output_head(model: nn.Module) -> OutputHead | None:
    """The head of `model` when its loss can be fused with it, else None (the caller takes the plain path).

    The model must accept `forward(..., return_final_hidden=True)`, and its `lm_head` must be a plain
    `nn.Linear` (its weight, tied or not) or offer `effective_weight()` (e.g. a quantization-aware-training
    wrapper whose forward is `F.linear(x, effective_weight(), bias)`). Anything else — LoRA on the head, a
    quantized head, a subclass with its own forward, a head with hooks — keeps the plain path, which calls it."""
    inner = unwrap(model)
    head = getattr(inner, "lm_head", None)
    if head is None or not _accepts_final_hidden(inner):
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    if type(head) is nn.Linear:
        return OutputHead(head.weight, head.bias)
    effective = getattr(head, "effective_weight", None)
    if callable(effective):
        bias = getattr(head, "bias", None)
        return OutputHead(effective(), bias if isinstance(bias, Tensor) else None)
    return None


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the plain path's `lm_head(hidden)` would run its matmul in: autocast's, else the inputs'."""
    device_type = hidden.device.type
    castable = (torch.float32, torch.bfloat16, torch.float16)  # autocast leaves fp64 alone
    if torch.is_autocast_enabled(device_type) and hidden.dtype in castable and weight.dtype in castable:
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def project(hidden: Tensor, head: OutputHead, dtype: torch.dtype) -> Tensor:
    """Logits of some rows in at least fp32, computed as the plain path's `lm_head(hidden).float()` would be:
    (n, d) -> (n, V). Runs with autocast off; `dtype` is the matmul dtype (see `compute_dtype`)."""
    bias = None if head.bias is None else head.bias.to(dtype)
    z = F.linear(hidden.to(dtype), head.weight.to(dtype), bias)
    return z.to(torch.promote_types(dtype, torch.float32))


# -- the fused loss ------------------------------------------------------------------------------------

class ChunkObjective(Protocol):
    """A loss over rows of logits, in contributions: the value of one chunk's rows to the batch loss (already
    divided by the whole batch's counts), the chunk's contributions to the reported parts (`part_names`), and
    the gradient of the contribution with respect to the chunk's logits."""
    part_names: tuple[str, ...]
    live_tensors: float  # fp32 (rows, V) temporaries one chunk holds at its peak; sizes the chunks

    def value_and_grad(self, logits: Tensor, rows: slice, need_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor | None]: ...


class _FusedHeadLoss(torch.autograd.Function):
    """loss, parts = objective(hidden @ weight.T + bias), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, objective, rows_per_chunk, dtype, want):
        # hidden (N, d), weight (V, d), bias (V,) or None. want = (grad hidden, grad weight, grad bias).
        N, d = hidden.shape
        V = weight.shape[0]
        need_h, need_w, need_b = want
        acc = torch.promote_types(weight.dtype, torch.float32)  # weight-gradient accumulator
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty(N, d, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(V, d, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        out = torch.promote_types(dtype, torch.float32)  # the logits' dtype: fp32, or fp64 for gradcheck
        loss = torch.zeros((), dtype=out, device=hidden.device)
        parts = torch.zeros(len(objective.part_names), dtype=out, device=hidden.device)
        head = OutputHead(w, b)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, rows_per_chunk):
                rows = slice(start, min(N, start + rows_per_chunk))
                h_c = hidden[rows].to(dtype)  # (n, d)
                z = project(h_c, head, dtype)  # (n, V)
                value, chunk_parts, dz = objective.value_and_grad(z, rows, any(want))
                loss += value
                parts += chunk_parts
                if dz is None:
                    continue
                dz_c = dz.to(dtype)  # (n, V), in the matmul dtype as autocast's backward would have it
                if need_h:
                    grad_h[rows] = dz_c @ w  # (n, d)
                if need_w:
                    if dz_c.dtype == acc:
                        grad_w.addmm_(dz_c.T, h_c)  # (V, d)
                    else:  # a bf16 product added into the fp32 accumulator without an fp32 copy of it
                        grad_w.add_(dz_c.T @ h_c)
                if need_b:
                    grad_b += dz.sum(0).to(acc)
                del z, dz, dz_c
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_parts):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward can run only once (its gradients were computed in the "
                               "forward pass and handed over); for retain_graph or double backward set "
                               "SLMKIT_CHUNKED_LOSS=0 to use the plain loss")
        # Scaled in place and handed over (ctx drops its reference), so autograd can keep the tensor as the
        # parameter's .grad instead of copying it: one weight-sized buffer less at the peak.
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None, None)


def fused_head_loss(hidden: Tensor, head: OutputHead, objective: ChunkObjective, *,
                    rows: int | None = None, budget_bytes: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective's loss over `head(hidden)` without materialising the logits.

    hidden: (..., d), the final normalised hidden states; the objective indexes rows of `hidden.reshape(-1, d)`.
    Returns (loss, parts): a differentiable scalar and the objective's named parts, detached."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    dtype = compute_dtype(flat, head.weight)
    n = chunk_rows(flat.shape[0], head.vocab_size, objective.live_tensors, rows=rows, budget_bytes=budget_bytes)
    grad_on = torch.is_grad_enabled()
    want = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (flat, head.weight, head.bias))
    loss, parts = _FusedHeadLoss.apply(flat, head.weight, head.bias, objective, n, dtype, want)
    return loss, dict(zip(objective.part_names, parts.unbind(0)))


# -- next-token cross-entropy ----------------------------------------------------------------------------

class CrossEntropyObjective:
    """`F.cross_entropy(logits, labels, ignore_index=-100)` (mean over non-ignored labels) in chunks, with the
    analytic gradient (softmax − one-hot) / count formed in place in the chunk's logits."""
    part_names = ("ce",)
    live_tensors = 2.5  # the logits (overwritten by the gradient), a bf16/fp32 copy for the matmul

    def __init__(self, labels: Tensor):
        self.labels = labels.reshape(-1)  # (N,)
        self.count = (self.labels != -100).sum().float()  # 0 -> NaN loss, as F.cross_entropy gives

    def value_and_grad(self, logits: Tensor, rows: slice, need_grad: bool):
        labels = self.labels[rows]  # (n,)
        valid = labels != -100
        target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)  # (n, 1)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
        nll = (lse - logits.gather(1, target)).squeeze(1)  # (n,)
        value = torch.where(valid, nll, torch.zeros_like(nll)).sum() / self.count
        if not need_grad:
            return value, value.detach().reshape(1), None
        grad = logits.sub_(lse).exp_()  # softmax, in place: (n, V)
        grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
        grad.mul_((valid.to(grad.dtype) / self.count).unsqueeze(1))
        return value, value.detach().reshape(1), grad


def chunked_cross_entropy(hidden: Tensor, head: OutputHead, labels: Tensor, *, rows: int | None = None,
                          budget_bytes: int | None = None) -> Tensor:
    """Next-token cross-entropy of `head(hidden)` against `labels` (ignore_index=-100, mean), equal to
    `F.cross_entropy(head(hidden).float().flatten(0, -2), labels.flatten(), ignore_index=-100)`.
    hidden: (..., d); labels: (...)."""
    loss, _ = fused_head_loss(hidden, head, CrossEntropyObjective(labels), rows=rows, budget_bytes=budget_bytes)
    return loss
