"""Sparse mixture of experts: a Mixtral-style MLP where each token runs through k of E SwiGLU experts.

Features:
- a linear router (`gate`, no bias) scores every expert; softmax in fp32, the top-k experts are kept and
  their k weights renormalised to sum to 1 (Mixtral semantics, the same as `transformers`'
  `MixtralSparseMoeBlock`, so imported Mixtral checkpoints give the same logits);
- grouped dispatch, no per-token Python loop: the N·k (token, expert) assignments are sorted by expert, each
  expert runs once on the contiguous group of its tokens, and the weighted outputs are scattered back with
  `index_add_`. The only Python loop is over the E experts;
- each expert is a plain `SwiGLU` (`gate_proj`, `up_proj`, `down_proj` as `nn.Linear`), so compression passes
  find and swap expert projections like any other, and state dicts map by name
  (`model.layers.N.mlp.experts.M.gate_proj.weight`, router at `model.layers.N.mlp.gate.weight`);
- an auxiliary loss recorded in training forwards (`self.aux_loss`, None in eval), which
  `CausalLM.auxiliary_loss()` collects and the training steps add to the task loss:

      aux = router_aux_loss_coef · E · Σ_e f_e · P_e  +  router_z_loss_coef · mean_tokens(logsumexp(logits)²)

  where f_e is the number of token-to-expert assignments that went to expert e divided by the N tokens (so
  Σ f_e = k) and P_e the mean router probability of e over the N tokens. This is `transformers`' Mixtral
  convention, so a Mixtral's `router_aux_loss_coef` means the same here: the load-balancing term (Switch
  Transformer, eq. 4–6, generalised to top-k) is k when routing is perfectly uniform and grows as it
  concentrates; its gradient flows through P_e (f_e comes from a non-differentiable top-k).
  The z-loss keeps router logits small, which keeps the fp32 softmax and bf16 matmuls stable.
- `expert_counts`: tokens routed to each expert in the last forward (E,), for diagnostics.

The block is position-wise (no state across tokens), so KV-cache decoding needs nothing special.
`active_parameters(model)` counts the parameters a single token uses: all of them minus, for each MoE block,
the (E − k)/E share of its experts that a token skips (`total_parameters(model)` is the whole count; both count
a compressed expert by the weights it stands for).

Papers: Jiang et al., 2024, "Mixtral of Experts"; Fedus et al., 2022, "Switch Transformers" (load-balancing
loss); Zoph et al., 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert Models" (router z-loss);
Shazeer et al., 2017, "Outrageously Large Neural Networks" (sparsely gated MoE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .mlp import SwiGLU


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.router_z_loss_coef = config.router_z_loss_coef
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(self.num_experts))
        self.aux_loss: torch.Tensor | None = None  # set by each training forward
        self.expert_counts: torch.Tensor | None = None  # (E,) tokens per expert in the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d). Returns router logits (N, E), fp32 probabilities (N, E), the chosen experts (N, k) and
        their renormalised weights (N, k, fp32)."""
        logits = self.gate(x)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k), (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, d)
        flat = x.reshape(-1, shape[-1])  # (N, d)
        logits, probs, chosen, weights = self.route(flat)
        E, k = self.num_experts, self.top_k

        # Group the N·k assignments by expert: assignment i belongs to token i // k.
        assigned = chosen.reshape(-1)  # (N·k,)
        order = torch.argsort(assigned, stable=True)  # (N·k,) assignments sorted by expert
        token_idx = order // k  # (N·k,) the token of each sorted assignment
        token_weight = weights.reshape(-1)[order]  # (N·k,)
        counts = torch.bincount(assigned, minlength=E)  # (E,)

        out = torch.zeros_like(flat)  # (N, d)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync; a loop over experts, not tokens
            if n:
                idx = token_idx[start:start + n]  # (n,)
                y = self.experts[e](flat[idx])  # (n, d)
                out.index_add_(0, idx, (y * token_weight[start:start + n, None]).to(out.dtype))
            start += n

        self.expert_counts = counts.detach()
        self.aux_loss = self.router_loss(logits, probs, counts) if self.training else None
        return out.reshape(shape)

    def router_loss(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Weighted load-balancing loss plus router z-loss (see the module docstring). logits, probs: (N, E);
        counts: (E,) assignments per expert."""
        N = probs.shape[0]
        f = counts.float() / N  # (E,) assignments per token, sums to k (Mixtral's normalisation)
        P = probs.mean(dim=0)  # (E,) mean router probability, sums to 1
        balance = self.num_experts * torch.sum(f * P)
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return self.router_aux_loss_coef * balance + self.router_z_loss_coef * z


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: every parameter (tied ones once) minus, in each `SparseMoE`, the (E − k)/E
    share of its experts' parameters that the router skips. Equals `total_parameters` for a dense model."""
    inactive = 0
    for m in model.modules():
        if isinstance(m, SparseMoE):
            inactive += total_parameters(m.experts) * (m.num_experts - m.top_k) // m.num_experts
    return total_parameters(model) - inactive


def total_parameters(model: nn.Module) -> int:
    """Unique parameters, counting a compressed module (one with `logical_parameters() -> (total, nonzero)`,
    e.g. an int8 Linear that holds its weight as buffers) by the weights it stands for."""
    seen, n = set(), 0
    for module in model.modules():
        counter = getattr(module, "logical_parameters", None)
        own = list(module.parameters(recurse=False))
        if callable(counter):
            n += counter()[0]
            seen.update(id(p) for p in own)
            continue
        for p in own:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n
