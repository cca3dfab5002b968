"""Low-rank factorization of projections: `lowrank.svd` and `lowrank.asvd`.

Each chosen `nn.Linear` (out x in weight W) becomes a `LowRankLinear`: two thin Linears, `down` (in -> r) and
`up` (r -> out, carrying the original bias), so the layer costs r * (in + out) parameters instead of
in * out and runs as two dense matmuls — no custom kernel, and the result stays a plain dense model.

Plain truncated SVD (`lowrank.svd`) keeps the r largest singular directions of W. That minimises the weight
error ||W - W'||_F, but not what matters, the output error ||(W - W')X|| on real inputs X. Language-model
activations are anything but isotropic: a few input channels carry outliers hundreds of times larger than
the rest, and channels are strongly correlated, so the directions W spends most energy on are not the ones
the data excites. Plain SVD then throws away small-σ directions that large activations amplify, and models
collapse at modest compression.

Activation-aware SVD (`lowrank.asvd`) fixes the objective. ASVD (Yuan et al., 2023, "ASVD: Activation-aware
Singular Value Decomposition for Compressing Large Language Models") scales W's input columns by activation
magnitudes before the SVD; SVD-LLM (Wang et al., 2024, "SVD-LLM: Truncation-aware Data Whitening for Large
Language Model Compression") makes this exact, and it is what is implemented here. With calibration inputs
stacked as rows of X (N x in), take the Cholesky factor S of the Gram matrix, XᵀX + λI = S Sᵀ (λ a small
damping, a fraction `damp` of the mean diagonal, keeps S invertible when channels are dead or collinear). Then

    ||(W - W') Xᵀ||_F² = tr((W - W') XᵀX (W - W')ᵀ) = ||(W - W') S||_F²,

so the best rank-r W' in output error is the best rank-r approximation of the *whitened* matrix W S, mapped
back: with W S = U Σ Vᵀ, W' = U_r Σ_r (V_rᵀ S⁻¹). Truncating singular value σ_i of W S costs exactly σ_i² of
calibration output error (up to the damping), which is why SVD-LLM calls the whitening "truncation-aware", and
why the `energy` rule on the whitened spectrum is meaningful for asvd. The factors are split symmetrically,
up = U_r Σ_r^½ and down = Σ_r^½ V_rᵀ S⁻¹, so neither factor's scale dwarfs the other's in low precision.

Rank choice: `ratio` keeps that fraction of each layer's parameters, r = floor(ratio · in · out / (in + out));
`energy` keeps the smallest r whose squared singular values (of W for svd, of W S for asvd) reach that fraction
of the total. A layer is factorized only where it saves parameters (r · (in + out) < in · out); the report
lists per-layer ranks and every skipped layer with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import (PROJECTIONS, Calibration, PassError, collect_inputs, pass_progress, register_pass, set_module,
                   target_linears)


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r stand-in for an (out x in) Linear. `down` has no bias; `up` carries the
    original one. Plain parameters throughout, so state dicts, `count_parameters` and meta-device
    construction work unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# -- configs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LowRankConfig:
    ratio: float | None = None
    energy: float | None = None
    targets: tuple[str, ...] = PROJECTIONS

    _pass = "lowrank"

    def __post_init__(self) -> None:
        name = self._pass
        if (self.ratio is None) == (self.energy is None):
            raise PassError(f"{name}: give exactly one of ratio= (fraction of parameters kept) or energy= "
                            f"(fraction of squared singular values kept); got ratio={self.ratio}, energy={self.energy}")
        for field_name in ("ratio", "energy"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise PassError(f"{name}: {field_name}={value} must be in (0, 1]")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in PROJECTIONS and t != "lm_head"]
        if not targets or unknown:
            raise PassError(f"{name}: targets={list(targets)} must be a non-empty subset of "
                            f"{list(PROJECTIONS)} (or 'lm_head')")


@dataclass(frozen=True)
class SVDConfig(_LowRankConfig):
    _pass = "lowrank.svd"


@dataclass(frozen=True)
class ASVDConfig(_LowRankConfig):
    damp: float = 0.01  # fraction of the Gram matrix's mean diagonal added before the Cholesky factorization

    _pass = "lowrank.asvd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise PassError(f"lowrank.asvd: damp={self.damp} must be in [0, 1)")


# -- the factorization -------------------------------------------------------------------------------

def rank_for_ratio(ratio: float, in_features: int, out_features: int) -> int:
    return max(1, math.floor(ratio * in_features * out_features / (in_features + out_features)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(σ[:r]²) >= energy · sum(σ²) (σ sorted descending)."""
    sq = singular_values.double().pow(2)
    total = float(sq.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # A relative tolerance, so energy=1.0 does not demand rounding noise in the last singular values.
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def whitening_factor(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = XᵀX + damp · mean(diag) · I (float64). More damping on failure."""
    gram = gram.double()
    n = gram.shape[0]
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(n, dtype=gram.dtype)
    for attempt in range(6):
        S, info = torch.linalg.cholesky_ex(gram + max(damp, 1e-10) * (10 ** attempt) * scale * eye)
        if int(info) == 0:
            return S
    raise PassError("lowrank.asvd: the calibration Gram matrix is not positive definite even with damping; "
                    "raise damp= or use more calibration samples")


def spectrum(weight: torch.Tensor, S: torch.Tensor | None = None):
    """SVD (float64) of W, or of W S when a whitening factor is given: U, σ, Vᵀ."""
    W = weight.detach().double()
    return torch.linalg.svd(W @ S if S is not None else W, full_matrices=False)


def factorize(weight: torch.Tensor, rank: int, S: torch.Tensor | None = None, svd=None):
    """(up (out x r), down (r x in)) with up @ down the best rank-r approximation of W — in weight error,
    or with S, in output error on the calibration inputs (SVD-LLM). float64; the caller casts."""
    U, sigma, Vh = svd if svd is not None else spectrum(weight, S)
    root = sigma[:rank].sqrt()
    up = U[:, :rank] * root  # (out, r)
    down = root[:, None] * Vh[:rank]  # (r, in), of W S when whitened
    if S is not None:
        # down S⁻¹ = (S⁻ᵀ downᵀ)ᵀ: one triangular solve instead of an inverse.
        down = torch.linalg.solve_triangular(S.T, down.T, upper=True).T
    return up, down


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """Relative calibration output error ||(W - W') xᵀ|| / ||W xᵀ|| for inputs x (N, in)."""
    x = x.double()
    W = weight.double()
    return float(torch.linalg.norm(x @ (W - approx.double()).T) / torch.linalg.norm(x @ W.T))


# -- the passes -------------------------------------------------------------------------------------

def _gram_matrices(model: nn.Module, layers: dict[str, nn.Linear], calib: Calibration) -> dict[str, torch.Tensor]:
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
             for n, m in layers.items()}

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, in)
        grams[name] += x.T @ x

    collect_inputs(model, layers, calib, accumulate)
    return grams


def _apply_lowrank(model: nn.Module, cfg: _LowRankConfig, calib: Calibration | None, whiten: bool):
    layers = dict(target_linears(model, cfg.targets, include_lm_head="lm_head" in cfg.targets))
    skipped = {}
    if "lm_head" in layers and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        del layers["lm_head"]
        skipped["lm_head"] = "tied to the input embeddings; factorizing it would untie them"
    if whiten:
        if calib is None:
            raise PassError("lowrank.asvd: needs calibration data (calib=None)")
        grams = _gram_matrices(model, layers, calib)
    ranks, modules = {}, []
    advance = pass_progress("SVD (projections)", len(layers))
    for name, linear in layers.items():
        out_f, in_f = linear.weight.shape
        S = whitening_factor(grams[name].cpu(), cfg.damp).to(linear.weight.device) if whiten else None
        svd = spectrum(linear.weight, S)
        advance(1)
        rank = (rank_for_ratio(cfg.ratio, in_f, out_f) if cfg.ratio is not None
                else rank_for_energy(svd[1], cfg.energy))
        rank = min(rank, min(in_f, out_f))
        if rank * (in_f + out_f) >= in_f * out_f:
            skipped[name] = (f"rank {rank} would keep {rank * (in_f + out_f)} parameters, "
                             f"not fewer than the dense {in_f * out_f}")
            continue
        up, down = factorize(linear.weight, rank, S, svd)
        new = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.up.weight.copy_(up)
            new.down.weight.copy_(down)
            if linear.bias is not None:
                new.up.bias.copy_(linear.bias)
        set_module(model, name, new)
        ranks[name] = rank
        modules.append(name)
    report = {"modules": modules, "ranks": ranks, "skipped": skipped,
              "kept_fraction": {n: round(r * sum(layers[n].weight.shape) / layers[n].weight.numel(), 6)
                                for n, r in ranks.items()}}
    return model, report


def restructure_lowrank(model: nn.Module, cfg: _LowRankConfig, record: dict) -> nn.Module:
    """Swap each recorded Linear for a LowRankLinear of the recorded rank (shapes only; works on meta)."""
    for name, rank in record["ranks"].items():
        linear = model.get_submodule(name)
        if isinstance(linear, LowRankLinear):
            if linear.rank != rank:
                raise PassError(f"{cfg._pass}: {name} already has rank {linear.rank}, record says {rank}")
            continue
        new = LowRankLinear(linear.in_features, linear.out_features, int(rank), bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
        set_module(model, name, new)
    return model


@register_pass("lowrank.svd", SVDConfig, needs_calibration=False, restructure=restructure_lowrank)
def apply_svd(model: nn.Module, cfg: SVDConfig, calib: Calibration | None = None):
    """Truncated SVD of each projection (minimises weight error; see lowrank.asvd for output error)."""
    return _apply_lowrank(model, cfg, calib, whiten=False)


@register_pass("lowrank.asvd", ASVDConfig, needs_calibration=True, restructure=restructure_lowrank)
def apply_asvd(model: nn.Module, cfg: ASVDConfig, calib: Calibration | None = None):
    """Activation-aware SVD with Cholesky whitening (SVD-LLM): minimises calibration output error."""
    return _apply_lowrank(model, cfg, calib, whiten=True)
