"""The knowledge-distillation step function for the shared training loop.

One micro-batch: the student's logits are matched to the teacher's — computed online, or read from the
teacher logit cache (top-k + tail) — by the divergence named in the config, mixed with next-token
cross-entropy by `alpha`, plus an optional hidden-state term. On-policy batches (GKD, Agarwal et al., 2024)
first replace the second part of each window with tokens sampled from the student itself; the teacher then
scores those tokens and only they carry the KD loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..train.chunked_losses import chunked_losses_enabled, fused_head_loss, output_head
from ..train.steps import auxiliary_loss
from .chunked_kd import KDObjective, TeacherRows
from .hidden import HiddenStateLoss
from .kd_losses import (KDError, check_same_vocab, combine, dense_logprobs, kd_loss, softened_logprobs,
                        topk_buckets, validate_kd_config)


@dataclass(frozen=True)
class KDConfig:
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    beta: float = 0.5  # generalized JSD interpolation (jsd only)
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to next-token cross-entropy
    on_policy: float = 0.0  # fraction of steps whose continuations are sampled from the student
    on_policy_tokens: int = 64  # tokens sampled per window on those steps
    on_policy_temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of the hidden-state loss (0 = off)
    layer_map: str | None = None  # "s:t,s:t,..."; None = uniform

    def __post_init__(self) -> None:
        validate_kd_config(self.loss, self.temperature, self.beta, self.alpha)
        if not 0.0 <= self.on_policy <= 1.0:
            raise KDError(f"on_policy={self.on_policy} must be a fraction in [0, 1]")
        if self.on_policy_tokens < 1 or self.on_policy_temperature <= 0:
            raise KDError("on_policy_tokens must be >= 1 and on_policy_temperature > 0")
        if self.hidden_weight < 0:
            raise KDError(f"hidden_weight={self.hidden_weight} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, *, temperature: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend every row of `prompt` (B, P) by `new_tokens` sampled tokens with a KV cache; (B, P + new)."""
    was_training = model.training
    model.eval()
    try:
        B, P = prompt.shape
        cache = model.new_cache(B, P + new_tokens)
        logits = model(prompt, cache=cache, last_only=True)[:, -1]  # (B, V)
        out = [prompt]
        for i in range(new_tokens):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out.append(nxt)
            if i + 1 < new_tokens:
                logits = model(nxt, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


class KDStep:
    """Callable step function: `(student, batch) -> (loss, metrics)`. Holds the teacher (online KD) or
    nothing (cached KD), the config, and the hidden-state projections (trained as extra modules)."""

    def __init__(self, cfg: KDConfig, teacher: torch.nn.Module | None, *, student_config=None, seed: int = 0):
        self.cfg, self.teacher, self.seed = cfg, teacher, seed
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.hidden: HiddenStateLoss | None = None
        if cfg.hidden_weight > 0:
            if teacher is None:
                raise KDError("hidden-state distillation needs the teacher online; it cannot run from a logit cache")
            from .hidden import default_layer_map, parse_layer_map

            n_s, n_t = student_config.num_hidden_layers, teacher.config.num_hidden_layers
            layer_map = (parse_layer_map(cfg.layer_map, n_s, n_t) if cfg.layer_map
                         else default_layer_map(n_s, n_t))
            self.hidden = HiddenStateLoss(student_config.hidden_size, teacher.config.hidden_size, layer_map)
        if cfg.on_policy > 0 and teacher is None:
            raise KDError("on-policy distillation needs the teacher online to score the student's samples; "
                          "drop --cache or --on-policy")

    def is_on_policy(self, step: int) -> bool:
        return self.cfg.on_policy > 0 and np.random.default_rng([self.seed, step, 7]).random() < self.cfg.on_policy

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = labels != -100
        alpha = self.cfg.alpha
        if batch.get("on_policy"):
            ids, labels, mask = self._on_policy_batch(model, ids, labels, batch.get("step", 0))
            alpha = 1.0  # the student's own samples are no ground truth for cross-entropy
        else:
            head = self._fused_head(model)
            if head is not None:
                return self._fused_step(model, head, ids, labels, mask, batch)
        want_hidden = self.hidden is not None
        out = self.student_forward(model, ids, batch, want_hidden)
        s_logits, s_hidden = out if want_hidden else (out, None)
        T = self.cfg.temperature
        s_full = softened_logprobs(s_logits, T)  # (B, T, V), computed once
        if alpha == 0 and self.hidden is None:
            # Cross-entropy only (e.g. healing a pruned student where a teacher forward per token costs more
            # training tokens than its targets are worth): no teacher forward, no KD term.
            kd = s_logits.new_zeros(())
        else:
            kd, t_hidden = self._kd_term(ids, batch, s_logits, s_full, mask, want_hidden)
        # Next-token cross-entropy reuses the student's log-probs when they are unsoftened.
        ce_logp = s_full if T == 1 else softened_logprobs(s_logits, 1.0)
        ce = F.nll_loss(ce_logp.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss = combine(kd, ce, alpha)
        metrics = {"kd": kd.detach(), "ce": ce.detach()}
        aux = auxiliary_loss(model)
        if aux is not None:  # e.g. MoE load balancing of the student
            loss = loss + aux
            metrics["aux_loss"] = aux.detach()
        if self.hidden is not None:
            h = self.hidden(s_hidden, t_hidden)
            loss = loss + self.cfg.hidden_weight * h
            metrics["hidden"] = h.detach()
        return loss, metrics

    def _fused_head(self, model: torch.nn.Module):
        """The student's head when this step can fuse the loss with it (chunked_losses.py), else None: not with
        hidden-state KD, not in a subclass that reads with memory, not with `SLMKIT_CHUNKED_LOSS=0`."""
        if (self.hidden is not None or not chunked_losses_enabled()
                or type(self).student_forward is not KDStep.student_forward
                or type(self).teacher_forward is not KDStep.teacher_forward):
            return None
        return output_head(model)

    def _fused_step(self, model, head, ids, labels, mask, batch: dict) -> tuple[torch.Tensor, dict]:
        """The same loss and metrics as the plain path, chunk by chunk of positions: no (B, T, V) tensor."""
        cfg = self.cfg
        teacher, topk = None, None
        if cfg.alpha != 0:
            if "teacher_topk_ids" in batch:
                if batch["teacher_topk_ids"].max() >= head.vocab_size:
                    raise KDError(f"the teacher cache names token ids beyond the student's vocabulary "
                                  f"({head.vocab_size}); it was built with another tokenizer")
                topk = (batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_tail_logprob"])
            else:
                with torch.no_grad():
                    t_head = output_head(self.teacher)
                    if t_head is not None:
                        teacher = TeacherRows(hidden=self.teacher(ids, return_final_hidden=True), head=t_head)
                    else:  # a head only its own forward can apply: the teacher's logits, without a graph
                        teacher = TeacherRows(logits=self.teacher(ids))
                check_same_vocab(head.vocab_size, teacher.vocab_size)
        hidden = model(ids, return_final_hidden=True)  # (B, T, d)
        objective = KDObjective(cfg.loss, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha,
                                labels=labels, mask=mask, teacher=teacher, topk=topk)
        loss, parts = fused_head_loss(hidden, head, objective)
        metrics = {"kd": parts["kd"], "ce": parts["ce"]}
        aux = auxiliary_loss(model)
        if aux is not None:  # e.g. MoE load balancing of the student
            loss = loss + aux
            metrics["aux_loss"] = aux.detach()
        return loss, metrics

    def _kd_term(self, ids, batch: dict, s_logits, s_full, mask, want_hidden: bool):
        """The KD loss against cached top-k targets or the online teacher, and the teacher's hidden states."""
        T, t_hidden = self.cfg.temperature, None
        if "teacher_topk_ids" in batch:
            if batch["teacher_topk_ids"].max() >= s_logits.shape[-1]:
                raise KDError(f"the teacher cache names token ids beyond the student's vocabulary "
                              f"({s_logits.shape[-1]}); it was built with another tokenizer")
            s_logp, t_logp = topk_buckets(s_full, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                          batch["teacher_tail_logprob"])
        else:
            with torch.no_grad():
                t_out = self.teacher_forward(ids, batch, want_hidden)
            t_logits, t_hidden = t_out if want_hidden else (t_out, None)
            if t_logits.shape[-1] != s_logits.shape[-1]:
                dense_logprobs(s_logits, t_logits, T)  # raises the vocabulary-mismatch error
            s_logp, t_logp = s_full, softened_logprobs(t_logits, T)
        return kd_loss(self.cfg.loss, s_logp, t_logp, mask=mask, temperature=T, beta=self.cfg.beta), t_hidden

    # Forward passes, overridden by SegmentKDStep (segment_kd.py) to read with Transformer-XL memory.
    def student_forward(self, model: torch.nn.Module, ids: torch.Tensor, batch: dict, want_hidden: bool):
        return model(ids, return_hidden_states=want_hidden)

    def teacher_forward(self, ids: torch.Tensor, batch: dict, want_hidden: bool):
        return self.teacher(ids, return_hidden_states=want_hidden)

    def _on_policy_batch(self, model, ids, labels, step: int):
        T = ids.shape[1]
        n_new = min(self.cfg.on_policy_tokens, T - 1)
        prompt = ids[:, : T + 1 - n_new]  # keep T + 1 - n_new real tokens, sample the rest
        gen = torch.Generator(device=ids.device).manual_seed(self.seed * 1_000_003 + step)
        seq = sample_continuations(_unwrap(model), prompt, n_new, temperature=self.cfg.on_policy_temperature,
                                   generator=gen)  # (B, T + 1)
        new_ids, new_labels = seq[:, :-1], seq[:, 1:].clone()
        mask = torch.zeros_like(new_labels, dtype=torch.bool)
        mask[:, T - n_new:] = True  # only positions that predict a sampled token carry the loss
        new_labels[~mask] = -100
        return new_ids, new_labels, mask


class OnPolicyBatches:
    """Wraps a batch source: marks the steps chosen by `KDStep.is_on_policy` so the step function samples."""

    def __init__(self, base, step_fn: KDStep):
        self.base, self.step_fn = base, step_fn

    def batch(self, step: int, rows: slice) -> dict:
        b = self.base.batch(step, rows)
        if self.step_fn.is_on_policy(step):
            b["on_policy"] = True
            b["step"] = step
        return b
