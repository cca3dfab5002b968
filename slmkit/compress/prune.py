"""Unstructured and N:M weight pruning: `prune.magnitude`, `prune.wanda`, `prune.sparsegpt`.

Each pass zeroes a fraction of the weights of the target projections and swaps them for `SparseLinear`
(same dense compute, compact mask + values on disk; see `sparse.py`). No speed-up is claimed: the kernels
stay dense, only storage shrinks.

- `prune.magnitude` (Han et al., 2015): drop the smallest |W|, per layer (`scope="layer"`) or under one
  threshold over all targets (`scope="global"`). No calibration.
- `prune.wanda` (Sun et al., 2024, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the norm of input feature j over the calibration tokens, and drop the
  lowest scores *per output row*. A small weight on a loud feature matters more than a large weight on a
  quiet one; that is all it takes to beat magnitude on models with outlier features.
- `prune.sparsegpt` (Frantar & Alistarh, 2023): OBS-style pruning with error compensation; see
  `sparsegpt_prune` for the algorithm.

Patterns: "unstructured", or "N:M" (at most N nonzeros in every group of M consecutive input weights of a
row — 2:4 is what sparse tensor cores accelerate; here it is storage only), whose sparsity is 1 − N/M.

Calibration (wanda, sparsegpt) is sequential by decoder layer: the statistics of layer i are collected by
running the calibration set through the model whose layers 0..i-1 are already pruned (the forward stops
after layer i), so each layer compensates for the errors of the ones before it. The projections inside one
layer share that layer's statistics (collected before any of them is pruned), as in the SparseGPT
reference setting. The cost is about (L + 1) / 2 full calibration forwards for L layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from .base import PROJECTIONS, Calibration, PassError, decoder_layers, pass_progress, register_pass, set_module
from .sparse import SparseLinear

SPEEDUP_NOTE = "none (dense kernel; sparse storage only)"
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# -- configs -------------------------------------------------------------------------------------------

def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M) kept per group. Raises ValueError otherwise."""
    if pattern == "unstructured":
        return None
    m = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if not m:
        raise ValueError("must be 'unstructured' or 'N:M' such as '2:4'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"N:M needs 0 < N < M (N weights kept in every group of M), got {n}:{mm}")
    return n, mm


@dataclass(frozen=True)
class PruneConfig:
    """Shared fields. `sparsity` defaults to 0.5 for "unstructured"; for "N:M" it is implied (1 − N/M) and
    may be given only if it agrees."""

    pass_name: ClassVar[str] = "prune"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "layer"
    targets: tuple[str, ...] = PROJECTIONS

    def _fail(self, field: str, msg: str) -> PassError:
        return PassError(f"{self.pass_name}: {field}={getattr(self, field)!r} {msg}")

    def __post_init__(self) -> None:
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise self._fail("pattern", str(e)) from None
        s = self.sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1):
            raise self._fail("sparsity", "must be a number in [0, 1) (the fraction of weights set to zero)")
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if s is not None and abs(s - implied) > 1e-9:
                raise self._fail("sparsity", f"conflicts with pattern={self.pattern!r}, which implies "
                                             f"sparsity {implied:g}; leave sparsity unset")
            s = implied
        object.__setattr__(self, "sparsity", float(0.5 if s is None else s))
        if self.scope not in ("layer", "global"):
            raise self._fail("scope", "must be 'layer' or 'global'")
        if self.scope == "global" and (nm is not None or self.pass_name != "prune.magnitude"):
            raise self._fail("scope", "is supported only by prune.magnitude with the unstructured pattern "
                                      "(N:M and calibrated pruning decide per layer); use scope='layer'")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise self._fail("targets", "must be a non-empty list of module names such as 'q_proj'")
        object.__setattr__(self, "targets", targets)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    pass_name: ClassVar[str] = "prune.magnitude"


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    pass_name: ClassVar[str] = "prune.wanda"


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    pass_name: ClassVar[str] = "prune.sparsegpt"
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1e3:
            raise self._fail("damp", "must be a non-negative number (fraction of the mean Hessian diagonal)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise self._fail("block_size", "must be a positive integer")


# -- masks ---------------------------------------------------------------------------------------------

def _k_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k lowest entries of a 1-D tensor (ties broken by position)."""
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= flat.numel():
        return ~mask
    thr = flat.kthvalue(k).values
    mask = flat < thr
    need = k - int(mask.sum())
    if need > 0:
        mask[(flat == thr).nonzero().squeeze(1)[:need]] = True
    return mask


def _rowwise_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, cols) -> bool mask of the k lowest entries of every row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask


def _nm_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(rows, cols) with cols % m == 0 -> bool mask of the m − n lowest in every group of m columns."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # (rows, groups, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def _mask_from_score(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if nm is not None:
        return _nm_lowest(score, *nm)
    if per_row:
        return _rowwise_lowest(score, round(sparsity * score.shape[1]))
    return _k_lowest(score.flatten(), round(sparsity * score.numel())).view_as(score)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Pruned positions (True = zero it): the smallest |W| over the whole matrix, or per N:M group."""
    return _mask_from_score(weight.detach().abs().float(), sparsity, nm, per_row=False)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Pruned positions by Wanda's score |W_ij| · ‖X_j‖₂, compared within each output row (or N:M group).
    `input_sq_sum` (in,) is Σ_tokens x_j²."""
    w = weight.detach().float()
    score = w.abs() * input_sq_sum.float().sqrt()[None, :]  # (out, in)
    score[w == 0] = -1.0  # weights already pruned stay pruned and count toward the target
    return _mask_from_score(score, sparsity, nm, per_row=True)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean(diag H); damping
    grows tenfold until the factorisation succeeds."""
    H = hessian.double().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0  # an input feature never seen in calibration: its weights carry no error signal
    base = diag.mean().item()
    for attempt in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(max(damp, 1e-8) * 10 ** attempt * base)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U.float()
    raise PassError("prune.sparsegpt: the calibration Hessian is not positive definite even with heavy "
                    "damping; raise damp or use more calibration samples")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, *, damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot"). Returns the pruned weight (float32, same shape).

    The layer-wise problem is: find a masked Ŵ minimising ‖WX − ŴX‖² over the calibration inputs X, whose
    curvature is the Hessian H = XᵀX (shared by every output row, since rows are independent least-squares
    problems with the same inputs). Optimal Brain Surgeon says: removing weight j of a row costs
    w_j² / [H⁻¹]_jj, and the best compensation for the others is δ = −(w_j / [H⁻¹]_jj) · H⁻¹_{:,j}.

    Doing that exactly per weight is cubic per row. SparseGPT makes it tractable by eliminating *columns*
    left to right, the same order for every row: after columns 0..j-1 are settled, the inverse Hessian of
    the remaining columns is a Schur complement, and all of those are read off one upper Cholesky factor U
    of H⁻¹ (H⁻¹ = UᵀU): row j of U, divided by U_jj, is the compensation direction for column j over
    columns j.., and U_jj² is the matching [H⁻¹]_jj. So for column j, the pruned entries get
    err = w_j / U_jj and all later columns move by −err ⊗ U_{j, j:}. Updates are applied lazily: inside a
    block of `block_size` columns eagerly, to the columns after the block as one matrix product.

    Adaptive mask selection: the mask is not fixed up front from the original weights. At the start of each
    block (unstructured) the block's `sparsity` fraction of entries with the lowest w² / U_jj² — the OBS
    error, measured on weights already updated by earlier compensation — is pruned; for N:M, the M − N
    lowest of each group of M columns are chosen when the group is reached (the block size is rounded down
    to a multiple of M so groups never straddle blocks). Damping λ = damp · mean(diag H) keeps H
    invertible. Weights that are already zero (re-pruning) are always kept pruned, so sparsity only grows.
    With H ∝ I there is no cross-column compensation and the mask equals magnitude pruning's.
    """
    W = weight.detach().float().clone()  # (rows, cols)
    rows, cols = W.shape
    frozen = W == 0
    U = _inverse_hessian_factor(hessian, damp)  # (cols, cols), upper
    if nm is not None:  # N:M groups must not straddle blocks: round the block down to a multiple of M
        block_size = max(nm[1], block_size - block_size % nm[1])
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        prune1 = frozen[:, i1:i2].clone()
        if nm is None:
            score = W1 ** 2 / d[None, :] ** 2
            score[prune1] = -1.0
            k = max(round(sparsity * score.numel()), int(prune1.sum()))
            prune1 = _k_lowest(score.flatten(), k).view_as(W1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                score[prune1[:, i:i + m]] = -1.0
                prune1[:, i:i + m] |= _nm_lowest(score, n, m)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


# -- finding and calibrating targets ----------------------------------------------------------------------

def find_prune_targets(model: nn.Module, cfg: PruneConfig) -> dict[str, nn.Linear]:
    """{qualified name: module} for every target; validates everything before any weight changes."""
    wanted = set(cfg.targets)
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in wanted:
            continue
        if not (type(module) is nn.Linear or isinstance(module, SparseLinear)):
            raise PassError(f"{cfg.pass_name}: {name} is a {type(module).__name__}, not a plain nn.Linear; pruning "
                            f"must come before quantization (and low-rank factorisation): list the prune pass first")
        if name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise PassError(f"{cfg.pass_name}: targets includes lm_head, which is tied to the input embeddings; "
                            "pruning it would prune the embeddings too — drop it from targets")
        nm = cfg.nm
        if nm is not None and module.in_features % nm[1]:
            raise PassError(f"{cfg.pass_name}: pattern={cfg.pattern!r} needs in_features divisible by M={nm[1]}, "
                            f"but {name} has in_features={module.in_features}")
        found[name] = module
    if not found:
        raise PassError(f"{cfg.pass_name}: targets={list(cfg.targets)} matched no nn.Linear in the model")
    return found


class _StopForward(Exception):
    pass


def _layer_groups(model: nn.Module, names: list[str],
                  modules: dict[str, nn.Module]) -> list[tuple[nn.Module | None, list[str]]]:
    """Targets grouped by decoder layer, in order, each with the layer after which a forward may stop;
    targets outside the layers form a last group that needs the full forward."""
    try:
        layers = list(decoder_layers(model))
    except AttributeError:
        layers = []
    owner = {}
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            owner[id(sub)] = i
    groups: dict[int, list[str]] = {}
    rest = []
    for n in names:
        i = owner.get(id(modules[n]))
        (groups.setdefault(i, []) if i is not None else rest).append(n)
    out = [(layers[i], groups[i]) for i in sorted(groups)]
    if rest:
        out.append((None, rest))
    return out


def _collect_until(model: nn.Module, modules: dict[str, nn.Module], calib: Calibration,
                   fn: Callable[[str, torch.Tensor], None], stop_after: nn.Module | None, batch_size: int = 8) -> None:
    """Like `base.collect_inputs`, but the forward ends once `stop_after` has run (the later layers' outputs
    are not needed for these statistics)."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0].detach())) for n, m in modules.items()]
    if stop_after is not None:
        def stop(mod, args, out):
            raise _StopForward
        handles.append(stop_after.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in calib.batches(batch_size):
                try:
                    model(ids.to(device))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _calibrated(model: nn.Module, targets: dict[str, nn.Linear], calib: Calibration,
                new_stat: Callable[[nn.Linear], object], add: Callable[[object, torch.Tensor], None],
                prune_one: Callable[[str, nn.Linear, object], None]) -> None:
    """Layer by layer: collect statistics on the model pruned so far, then prune that layer's targets."""
    groups = _layer_groups(model, list(targets), targets)
    advance = pass_progress("calibration, layer by layer", len(groups))
    for stop_after, names in groups:
        stats = {n: new_stat(targets[n]) for n in names}
        _collect_until(model, {n: targets[n] for n in names}, calib,
                       lambda n, x: add(stats[n], x.reshape(-1, x.shape[-1])), stop_after)
        for n in names:
            prune_one(n, targets[n], stats[n])
        stats.clear()
        advance(1)


# -- passes ---------------------------------------------------------------------------------------------------

def _finish(model: nn.Module, cfg: PruneConfig, targets: dict[str, nn.Linear], method: str,
            extra: dict[str, dict] | None = None, calibration: str | None = None) -> tuple[nn.Module, dict]:
    layers, total, zeros = {}, 0, 0
    for name, module in targets.items():
        if not isinstance(module, SparseLinear):
            module = SparseLinear.from_linear(module)
            set_module(model, name, module)
        nnz = int(torch.count_nonzero(module.weight))
        numel = module.weight.numel()
        module.expected_nonzero = nnz
        layers[name] = {"sparsity": 1 - nnz / numel, "nonzero": nnz, **(extra or {}).get(name, {})}
        total, zeros = total + numel, zeros + numel - nnz
    report = {"modules": list(targets), "method": method, "pattern": cfg.pattern, "scope": cfg.scope,
              "target_sparsity": cfg.sparsity, "sparsity": zeros / total, "layers": layers,
              "speedup": SPEEDUP_NOTE}
    if calibration:
        report["calibration"] = calibration
    return model, report


_SEQUENTIAL = "sequential by decoder layer (later layers see already-pruned earlier layers)"


def restructure(model: nn.Module, cfg: PruneConfig, record: dict) -> nn.Module:
    """Swap each recorded projection for a `SparseLinear` of the same shape (meta-safe; reads no weights).
    The load pre-hook rebuilds dense weights from mask + values, so no sizes beyond the shapes are needed."""
    layers = record.get("layers", {})
    for name in record["modules"]:
        module = model.get_submodule(name)
        if not isinstance(module, SparseLinear):
            if type(module) is not nn.Linear:
                raise PassError(f"{cfg.pass_name}: cannot replay pruning of {name}: it is a {type(module).__name__}")
            module = SparseLinear.from_linear(module)
            set_module(model, name, module)
        module.expected_nonzero = layers.get(name, {}).get("nonzero")
    return model


@register_pass("prune.magnitude", MagnitudeConfig, restructure=restructure)
def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, calib: Calibration | None = None):
    """Zero the smallest-magnitude weights of the target projections (per layer or one global threshold)."""
    targets = find_prune_targets(model, cfg)
    nm = cfg.nm
    with torch.no_grad():
        if cfg.scope == "global":
            flat = torch.cat([m.weight.detach().abs().float().flatten() for m in targets.values()])
            sizes = [m.weight.numel() for m in targets.values()]
            masks = _k_lowest(flat, round(cfg.sparsity * flat.numel())).split(sizes)
            for m, mask in zip(targets.values(), masks):
                m.weight.masked_fill_(mask.view_as(m.weight), 0.0)
        else:
            for m in targets.values():
                m.weight.masked_fill_(magnitude_mask(m.weight, cfg.sparsity, nm), 0.0)
    return _finish(model, cfg, targets, "magnitude")


@register_pass("prune.wanda", WandaConfig, needs_calibration=True, restructure=restructure)
def apply_wanda(model: nn.Module, cfg: WandaConfig, calib: Calibration | None = None):
    """Wanda: prune by |W| × input-feature norm per output row, calibrated layer by layer."""
    targets = find_prune_targets(model, cfg)
    if calib is None:
        raise PassError("prune.wanda: needs calibration data (input feature norms)")

    def new_stat(m):
        return torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)

    def add(stat, x):
        stat += x.float().pow(2).sum(0)

    def prune_one(name, m, sq_sum):
        m.weight.masked_fill_(wanda_mask(m.weight, sq_sum, cfg.sparsity, cfg.nm), 0.0)

    with torch.no_grad():
        _calibrated(model, targets, calib, new_stat, add, prune_one)
    return _finish(model, cfg, targets, "wanda", calibration=_SEQUENTIAL)


@register_pass("prune.sparsegpt", SparseGPTConfig, needs_calibration=True, restructure=restructure)
def apply_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, calib: Calibration | None = None):
    """SparseGPT: OBS pruning with adaptive masks and error compensation, calibrated layer by layer."""
    targets = find_prune_targets(model, cfg)
    if calib is None:
        raise PassError("prune.sparsegpt: needs calibration data (input Hessians)")
    extra: dict[str, dict] = {}

    def new_stat(m):
        return {"H": torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device), "n": 0}

    def add(stat, x):
        x = x.float()  # (tokens, in)
        stat["H"] += x.T @ x
        stat["n"] += x.shape[0]

    def prune_one(name, m, stat):
        H = stat["H"] / max(stat["n"], 1)
        W0 = m.weight.detach().float()
        W = sparsegpt_prune(W0, H, cfg.sparsity, cfg.nm, damp=cfg.damp, block_size=cfg.block_size)
        delta = W - W0
        # Relative calibration error ‖(W − Ŵ)X‖² / ‖WX‖², read off the Hessian.
        denom = float(((W0 @ H) * W0).sum())
        extra[name] = {"calib_rel_error": float(((delta @ H) * delta).sum()) / denom if denom > 0 else 0.0}
        m.weight.copy_(W.to(m.weight.dtype))

    with torch.no_grad():
        _calibrated(model, targets, calib, new_stat, add, prune_one)
    return _finish(model, cfg, targets, "sparsegpt", extra, calibration=_SEQUENTIAL)
