"""Structured pruning: `prune.width` (MLP channels, attention heads, hidden channels) and `prune.depth`
(whole decoder layers). The result is a genuinely smaller *dense* model: new `nn.Linear`s with fewer rows
and columns, and — where every layer keeps the same sizes — an updated `model.config`, so it stays a plain
Llama-shaped checkpoint that `slm export hf` and transformers load as they are.

Width follows Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): importance is measured on activations from a small calibration set, one forward sweep, no
gradients, and the least important structures are sliced away.

- MLP channel c: mean |a_c| of the intermediate activation a = silu(gate(x)) * up(x) (the input to
  down_proj), over all calibration tokens.
- Attention head h: mean L2 norm of the head's attention output (its head_dim slice of o_proj's input).
  Grouped-query attention ties query heads to key/value heads, so whole *KV groups* are pruned (a kv head
  together with all of its query heads), scored by the sum of their query heads' norms. This keeps the
  query-per-kv ratio and, unlike pruning query heads inside groups, shrinks the KV cache — the decode-time
  memory and bandwidth cost — in proportion. `heads_ratio` is therefore the fraction of KV groups kept.
- Hidden (embedding) channel c: mean |y_c| of the RMSNorm outputs (every input_layernorm,
  post_attention_layernorm and the final norm), summed over norms. Removing channel c slices the embedding
  column, every norm weight, every projection's input column (q, k, v, gate, up, lm_head) and output row
  (o, down). RMSNorm then averages over fewer channels; where the pruned channels carried little energy
  the normalised output would grow by sqrt(d/d'), so each norm weight is rescaled by sqrt(k·d/d'), k being
  the calibration fraction of that norm's input energy in the kept channels — exact when the pruned
  channels are dead, a no-op when energy is spread evenly. (An addition to Minitron, which leaves the
  mismatch to distillation.)

`uniform=True` keeps the same count in every layer (Minitron's setting; the model stays a plain config).
`uniform=False` ranks MLP channels globally across layers by |a_c| · ||down_proj[:, c]|| — each channel's
contribution to the shared residual stream, comparable between layers — so layers keep different widths;
the per-layer sizes live in the pass record and `restructure` rebuilds each layer with its own (slmkit's
format only: transformers' Llama has one intermediate_size). Head counts stay uniform even then, because the
KV cache (`slmkit.model.cache`) preallocates one kv-head count for every layer.

Depth follows ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant
Than You Expect"), which Minitron also evaluates: Block Influence BI_i = 1 - E[cos(x_i, x_{i+1})] between a
layer's input and output hidden states; the layers with the lowest BI change the residual stream least and
are dropped, all from one measurement. Surviving attention modules are renumbered 0..n-1 (`layer_idx`
indexes the KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import Calibration, PassError, collect_inputs, decoder_layers, register_pass

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# -- configs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WidthConfig:
    mlp_ratio: float = 1.0  # fraction of MLP intermediate channels kept
    heads_ratio: float = 1.0  # fraction of attention KV groups (a kv head with its query heads) kept
    hidden_ratio: float = 1.0  # fraction of hidden (embedding) channels kept
    uniform: bool = True  # same kept count in every layer (plain config, exportable to HF)

    def __post_init__(self) -> None:
        for name in ("mlp_ratio", "heads_ratio", "hidden_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise PassError(f"prune.width: {name}={value} must be in (0, 1]")
        if not isinstance(self.uniform, bool):
            raise PassError(f"prune.width: uniform={self.uniform!r} must be true or false")


@dataclass(frozen=True)
class DepthConfig:
    keep_layers: int | None = None  # decoder layers kept
    drop: int | None = None  # decoder layers removed

    def __post_init__(self) -> None:
        if (self.keep_layers is None) == (self.drop is None):
            raise PassError(f"prune.depth: give exactly one of keep_layers= or drop=; "
                            f"got keep_layers={self.keep_layers}, drop={self.drop}")
        if self.keep_layers is not None and (not _is_int(self.keep_layers) or self.keep_layers < 1):
            raise PassError(f"prune.depth: keep_layers={self.keep_layers} must be an integer >= 1")
        if self.drop is not None and (not _is_int(self.drop) or self.drop < 0):
            raise PassError(f"prune.depth: drop={self.drop} must be an integer >= 0")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- shapes ----------------------------------------------------------------------------------------

def _layer_sizes(layer: nn.Module) -> dict[str, int]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"intermediate_size": mlp.down_proj.in_features, "num_attention_heads": attn.n_heads,
            "num_key_value_heads": attn.n_kv}


def _require_plain(model: nn.Module, pass_name: str) -> None:
    for i, layer in enumerate(decoder_layers(model)):
        for owner, names in ((layer.self_attn, ATTN), (layer.mlp, MLP)):
            for n in names:
                m = getattr(owner, n, None)
                if type(m) is not nn.Linear:
                    raise PassError(f"{pass_name}: model.layers.{i} {n} is {type(m).__name__}, not a plain "
                                    "nn.Linear; run structured pruning before low-rank or quantization passes")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these (already sliced) tensors."""
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return new


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w, b = linear.weight, linear.bias
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    return _linear(w, b)


def _embedding(weight: torch.Tensor, padding_idx: int | None) -> nn.Embedding:
    """An nn.Embedding holding `weight` (no random init: that costs seconds on first use and is overwritten)."""
    return nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=False)


def _empty_like(linear: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    if (linear.in_features, linear.out_features) == (in_f, out_f):
        return linear
    return nn.Linear(in_f, out_f, bias=linear.bias is not None, device=linear.weight.device,
                     dtype=linear.weight.dtype)


def _update_config(model: nn.Module, **changes) -> None:
    """Replace model.config (a new object: a config shared with another model is left alone)."""
    model.config = model.config.replace(**changes)


# -- prune.width: importance ---------------------------------------------------------------------------

def _norms(model: nn.Module) -> dict[str, nn.Module]:
    norms = {}
    for i, layer in enumerate(decoder_layers(model)):
        norms[f"model.layers.{i}.input_layernorm"] = layer.input_layernorm
        norms[f"model.layers.{i}.post_attention_layernorm"] = layer.post_attention_layernorm
    norms["model.norm"] = model.model.norm
    return norms


def width_importance(model: nn.Module, calib: Calibration) -> dict:
    """One calibration sweep. Returns per-layer MLP channel scores (mean |a|), per-layer query-head scores
    (mean ||head output||), the hidden-channel score (mean |norm output| summed over norms) and each norm's
    per-channel input energy (mean x², for the RMSNorm rescale)."""
    layers = decoder_layers(model)
    norms = _norms(model)
    watched = dict(norms)
    for i, layer in enumerate(layers):
        watched[f"mlp.{i}"] = layer.mlp.down_proj
        watched[f"attn.{i}"] = layer.self_attn.o_proj
    sums: dict[str, torch.Tensor] = {}
    tokens = [0]

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])  # (tokens, features)
        if name.startswith("mlp."):
            add(name, x.abs().sum(0))
        elif name.startswith("attn."):
            attn = layers[int(name[5:])].self_attn
            add(name, x.view(-1, attn.n_heads, attn.head_dim).norm(dim=-1).sum(0))  # (n_heads,)
        else:
            if name == "model.norm":
                tokens[0] += x.shape[0]
            add(f"energy.{name}", x.pow(2).sum(0))
            norm = norms[name]  # its output, recomputed (calling the module here would re-enter this hook)
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
            add("hidden", y.abs().sum(0))

    collect_inputs(model, watched, calib, observe)
    n = max(tokens[0], 1)
    return {"mlp": [sums[f"mlp.{i}"] / n for i in range(len(layers))],
            "heads": [sums[f"attn.{i}"] / n for i in range(len(layers))],
            "hidden": sums["hidden"] / n,
            "energy": {name: sums[f"energy.{name}"] / n for name in norms}}


def _kept_count(pass_name: str, field: str, ratio: float, total: int, what: str) -> int:
    keep = math.floor(ratio * total + 1e-9)
    if keep < 1:
        raise PassError(f"{pass_name}: {field}={ratio} would keep 0 of {total} {what}; raise {field} to at "
                        f"least {1 / total:.4g}")
    return keep


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _plan_mlp(model, cfg: WidthConfig, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    layers = decoder_layers(model)
    sizes = [layer.mlp.down_proj.in_features for layer in layers]
    if cfg.uniform:
        keeps = [_kept_count("prune.width", "mlp_ratio", cfg.mlp_ratio, f, "MLP channels") for f in sizes]
        return [_top(s, k) for s, k in zip(scores, keeps)]
    budget = _kept_count("prune.width", "mlp_ratio", cfg.mlp_ratio, sum(sizes), "MLP channels")
    # Contribution to the residual stream: comparable across layers, unlike raw activation scale.
    contrib = [s.cpu() * layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu()
               for s, layer in zip(scores, layers)]
    flat = torch.cat(contrib)
    # Every layer keeps at least its best channel (a zero-width MLP is not a Linear).
    forced = torch.zeros_like(flat, dtype=torch.bool)
    offset = 0
    for c in contrib:
        forced[offset + int(c.argmax())] = True
        offset += c.numel()
    flat = torch.where(forced, torch.full_like(flat, float("inf")), flat)
    chosen = torch.zeros_like(forced)
    chosen[_top(flat, max(budget, len(sizes)))] = True
    kept, offset = [], 0
    for f in sizes:
        kept.append(torch.nonzero(chosen[offset:offset + f]).flatten())
        offset += f
    return kept


def _plan_heads(model, cfg: WidthConfig, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kept KV-group indices per layer (uniform count in every layer; see the module docstring)."""
    kept = []
    for layer, s in zip(decoder_layers(model), scores):
        attn = layer.self_attn
        group = attn.n_heads // attn.n_kv
        keep = _kept_count("prune.width", "heads_ratio", cfg.heads_ratio, attn.n_kv, "key/value head groups")
        kept.append(_top(s.view(attn.n_kv, group).sum(-1), keep))  # groups are consecutive query heads
    return kept


# -- prune.width: slicing ----------------------------------------------------------------------------

def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _slice_layer(layer: nn.Module, groups: torch.Tensor, channels: torch.Tensor, hidden: torch.Tensor | None) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    G, hd = attn.n_heads // attn.n_kv, attn.head_dim
    q_heads = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()
    q_rows, kv_rows = _head_rows(q_heads, hd), _head_rows(groups, hd)
    attn.q_proj = _sliced(attn.q_proj, q_rows, hidden)
    attn.k_proj = _sliced(attn.k_proj, kv_rows, hidden)
    attn.v_proj = _sliced(attn.v_proj, kv_rows, hidden)
    attn.o_proj = _sliced(attn.o_proj, hidden, q_rows)
    attn.n_heads, attn.n_kv = q_heads.numel(), groups.numel()
    mlp.gate_proj = _sliced(mlp.gate_proj, channels, hidden)
    mlp.up_proj = _sliced(mlp.up_proj, channels, hidden)
    mlp.down_proj = _sliced(mlp.down_proj, hidden, channels)


def _slice_hidden(model: nn.Module, hidden: torch.Tensor, energy: dict[str, torch.Tensor]) -> dict[str, float]:
    """Embedding columns, norm weights (rescaled, see the module docstring) and an untied lm_head."""
    d_old, d_new = model.model.embed_tokens.weight.shape[1], hidden.numel()
    emb = model.model.embed_tokens
    model.model.embed_tokens = _embedding(emb.weight.detach()[:, hidden].clone(), emb.padding_idx)
    scales = {}
    for name, norm in _norms(model).items():
        e = energy[name].to(hidden.device)
        kept_energy = float(e[hidden].sum() / e.sum()) if float(e.sum()) > 0 else 1.0
        scale = math.sqrt(kept_energy * d_old / d_new)
        scales[name] = round(scale, 6)
        norm.weight = nn.Parameter(norm.weight.detach()[hidden] * scale)
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(d_new, emb.num_embeddings, bias=False, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = _sliced(model.lm_head, None, hidden)
    return scales


@torch.no_grad()
def apply_width(model: nn.Module, cfg: WidthConfig, calib: Calibration | None = None):
    """Minitron width pruning of MLP channels, attention KV groups and hidden channels by activation importance."""
    if calib is None:
        raise PassError("prune.width: needs calibration data (calib=None)")
    _require_plain(model, "prune.width")
    layers = decoder_layers(model)
    d = model.model.embed_tokens.weight.shape[1]
    d_keep = _kept_count("prune.width", "hidden_ratio", cfg.hidden_ratio, d, "hidden channels")
    for layer in layers:  # fail on impossible ratios before the sweep and before any weight changes
        _kept_count("prune.width", "heads_ratio", cfg.heads_ratio, layer.self_attn.n_kv, "key/value head groups")
        _kept_count("prune.width", "mlp_ratio", cfg.mlp_ratio, layer.mlp.down_proj.in_features, "MLP channels")
    before = [_layer_sizes(layer) for layer in layers]
    imp = width_importance(model, calib)
    channels = _plan_mlp(model, cfg, imp["mlp"])
    groups = _plan_heads(model, cfg, imp["heads"])
    device = model.model.embed_tokens.weight.device
    hidden = _top(imp["hidden"], d_keep).to(device) if d_keep < d else None
    modules = []
    for i, layer in enumerate(layers):
        _slice_layer(layer, groups[i].to(device), channels[i].to(device), hidden)
        modules += [f"model.layers.{i}.self_attn.{n}" for n in ATTN] + [f"model.layers.{i}.mlp.{n}" for n in MLP]
    norm_scales = _slice_hidden(model, hidden, imp["energy"]) if hidden is not None else {}
    if hidden is not None:
        modules += ["model.embed_tokens", *_norms(model), "lm_head"]
    after = [_layer_sizes(layer) for layer in layers]
    _update_config(model, **_config_sizes(after, d_keep, head_dim=layers[0].self_attn.head_dim))
    report = {
        "modules": modules,
        "uniform": cfg.uniform,
        "hidden_size": d_keep,
        "hidden_size_before": d,
        "layers": after,
        "layers_before": before,
        "kept_kv_groups": [g.tolist() for g in groups],
        "norm_scales": norm_scales,
    }
    return model, report


def _config_sizes(sizes: list[dict[str, int]], hidden_size: int, head_dim: int) -> dict[str, int]:
    """Config fields for per-layer sizes: exact when uniform, else the largest (the config then describes
    the widest layer, and the pass record the rest)."""
    return {"hidden_size": hidden_size, "head_dim": head_dim,
            **{k: max(s[k] for s in sizes)
               for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads")}}


def restructure_width(model: nn.Module, cfg: WidthConfig, record: dict) -> nn.Module:
    """Give a fresh (meta) model the recorded absolute sizes; layers that already have them are left alone."""
    layers = decoder_layers(model)
    if len(record["layers"]) != len(layers):
        raise PassError(f"prune.width: the record has {len(record['layers'])} layers, the model {len(layers)}")
    d = int(record["hidden_size"])
    for layer, sizes in zip(layers, record["layers"]):
        attn, mlp = layer.self_attn, layer.mlp
        hd, f = attn.head_dim, int(sizes["intermediate_size"])
        n_heads, n_kv = int(sizes["num_attention_heads"]), int(sizes["num_key_value_heads"])
        attn.q_proj = _empty_like(attn.q_proj, d, n_heads * hd)
        attn.k_proj = _empty_like(attn.k_proj, d, n_kv * hd)
        attn.v_proj = _empty_like(attn.v_proj, d, n_kv * hd)
        attn.o_proj = _empty_like(attn.o_proj, n_heads * hd, d)
        attn.n_heads, attn.n_kv = n_heads, n_kv
        mlp.gate_proj = _empty_like(mlp.gate_proj, d, f)
        mlp.up_proj = _empty_like(mlp.up_proj, d, f)
        mlp.down_proj = _empty_like(mlp.down_proj, f, d)
    emb = model.model.embed_tokens
    if emb.weight.shape[1] != d:
        model.model.embed_tokens = _embedding(
            torch.empty(emb.num_embeddings, d, device=emb.weight.device, dtype=emb.weight.dtype), emb.padding_idx)
    for norm in _norms(model).values():
        if norm.weight.shape[0] != d:
            norm.weight = nn.Parameter(torch.empty(d, device=norm.weight.device, dtype=norm.weight.dtype))
    if model.lm_head.in_features != d:
        model.lm_head = _empty_like(model.lm_head, d, model.lm_head.out_features)
    model.tie_weights()
    _update_config(model, **_config_sizes(record["layers"], d, head_dim=layers[0].self_attn.head_dim))
    return model


register_pass("prune.width", WidthConfig, needs_calibration=True, restructure=restructure_width)(apply_width)


# -- prune.depth --------------------------------------------------------------------------------------

def block_influence(model: nn.Module, calib: Calibration) -> list[float]:
    """BI_i = 1 - mean over calibration tokens of cos(layer i input, layer i output) (ShortGPT)."""
    layers = decoder_layers(model)
    sums, count = [0.0] * len(layers), [0]

    def hook(i):
        def fn(module, args, output):
            x, y = args[0].float(), output.float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # (B, T)
            sums[i] += float(cos.sum())
            if i == 0:
                count[0] += cos.numel()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in calib.batches():
                model(ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(count[0], 1) for s in sums]


def _keep_layers(model: nn.Module, kept: list[int]) -> None:
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    # layer_idx indexes the KV cache, which has one slot per surviving layer.
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    _update_config(model, num_hidden_layers=len(kept))


def apply_depth(model: nn.Module, cfg: DepthConfig, calib: Calibration | None = None):
    """ShortGPT/Minitron depth pruning: drop the decoder layers with the lowest Block Influence."""
    n = len(decoder_layers(model))
    keep = cfg.keep_layers if cfg.keep_layers is not None else n - cfg.drop
    if not 1 <= keep <= n:
        field = f"keep_layers={cfg.keep_layers}" if cfg.keep_layers is not None else f"drop={cfg.drop}"
        raise PassError(f"prune.depth: {field} must leave between 1 and {n} of the model's {n} layers")
    if calib is None:
        raise PassError("prune.depth: needs calibration data (calib=None)")
    bi = block_influence(model, calib)
    order = sorted(range(n), key=lambda i: (bi[i], i))  # least influential first
    dropped = sorted(order[:n - keep])
    kept = [i for i in range(n) if i not in dropped]
    _keep_layers(model, kept)
    report = {"modules": [f"model.layers.{i}" for i in dropped], "num_layers_before": n,
              "kept_layers": kept, "dropped_layers": dropped, "block_influence": [round(b, 6) for b in bi]}
    return model, report


def restructure_depth(model: nn.Module, cfg: DepthConfig, record: dict) -> nn.Module:
    """Keep the recorded layers of a fresh model built from the original config; a model already built
    with the pruned layer count (config.json updated) only gets its layer indices checked."""
    n = len(decoder_layers(model))
    kept = [int(i) for i in record["kept_layers"]]
    if n == len(kept):
        _keep_layers(model, list(range(n)))
    elif n == int(record["num_layers_before"]):
        _keep_layers(model, kept)
    else:
        raise PassError(f"prune.depth: the model has {n} layers; the record expects "
                        f"{record['num_layers_before']} (before) or {len(kept)} (after)")
    return model


register_pass("prune.depth", DepthConfig, needs_calibration=True, restructure=restructure_depth)(apply_depth)
