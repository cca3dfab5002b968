"""lowrank.svd / lowrank.asvd: contract tests, the factorization, the rank rules and the ASVD-vs-SVD claim."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.checkpoint import state_dict_for_save
from slmkit.compress.base import Calibration, PassError, count_parameters, get_pass, state_bytes, tensor_bytes
from slmkit.compress.lowrank import (LowRankLinear, factorize, output_error, rank_for_energy, rank_for_ratio,
                                     spectrum, whitening_factor)
from slmkit.model import CausalLM, ModelConfig
from slmkit.model.rope import rope_inverse_frequencies

torch.set_num_threads(1)

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
# (pass, options, relative logit error bound on the random tiny model)
CASES = [("lowrank.svd", {"ratio": 0.8}, 0.25), ("lowrank.asvd", {"ratio": 0.8}, 0.18),
         ("lowrank.asvd", {"energy": 0.95}, 0.18)]
IDS = ["svd-ratio", "asvd-ratio", "asvd-energy"]


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def calib() -> Calibration:
    return Calibration(torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(1)))


def run(name: str, model: nn.Module, calib: Calibration | None, **options):
    p = get_pass(name)
    return p.apply(model, p.config_cls(**options), calib)


def reload(model: CausalLM, name: str, options: dict, report: dict, tmp_path) -> CausalLM:
    """What load_checkpoint does: meta build from the original config, replay, assign the stored tensors."""
    path = tmp_path / "w.safetensors"
    save_file(state_dict_for_save(model), str(path))
    p = get_pass(name)
    with torch.device("meta"):
        fresh = CausalLM(ModelConfig(**CONFIG))
    fresh = p.restructure(fresh, p.config_cls(**options), report)
    fresh.load_state_dict(load_file(str(path)), strict=False, assign=True)
    fresh.tie_weights()
    fresh.model.rotary_emb.inv_freq = rope_inverse_frequencies(fresh.config)
    return fresh.eval()


# -- contract --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,tolerance", CASES, ids=IDS)
def test_contract(name, options, tolerance, calib, tmp_path):
    model = tiny_model()
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    total_before = count_parameters(model)[0]
    model, report = run(name, model, calib, **options)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < tolerance
    assert report["modules"] and set(report["modules"]) == set(report["ranks"])
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in report["modules"])
    # Size accounting agrees with what is on disk.
    saved = state_dict_for_save(model)
    assert state_bytes(model) == sum(tensor_bytes(t) for t in saved.values())
    total, _ = count_parameters(model)
    assert total == sum(t.numel() for t in saved.values())
    assert total < total_before
    import json
    json.dumps(report)  # the record goes into slmkit.json
    # save -> meta build -> restructure -> load(assign) is the identity.
    fresh = reload(model, name, options, json.loads(json.dumps(report)), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("name,options,field", [
    ("lowrank.svd", {"ratio": 1.5}, "ratio"),
    ("lowrank.svd", {"ratio": 0.0}, "ratio"),
    ("lowrank.asvd", {"energy": -0.1}, "energy"),
    ("lowrank.svd", {}, "ratio"),
    ("lowrank.svd", {"ratio": 0.5, "energy": 0.5}, "energy"),
    ("lowrank.asvd", {"ratio": 0.5, "damp": 1.5}, "damp"),
    ("lowrank.svd", {"ratio": 0.5, "targets": ("q_proj", "nope")}, "targets"),
])
def test_invalid_config_names_pass_and_field(name, options, field):
    with pytest.raises(PassError, match=rf"{name}.*{field}"):
        get_pass(name).config_cls(**options)


def test_asvd_without_calibration_changes_nothing():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match="lowrank.asvd"):
        run("lowrank.asvd", model, None, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lowrank_linear_builds_on_meta():
    with torch.device("meta"):
        m = LowRankLinear(64, 128, 8, bias=True)
    assert m.down.weight.shape == (8, 64) and m.up.weight.shape == (128, 8) and m.up.bias.shape == (128,)
    assert m.down.bias is None


# -- the factorization ------------------------------------------------------------------------------

def test_full_rank_svd_reproduces_weight():
    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    up, down = factorize(W, 32)
    assert torch.allclose(up @ down, W.double(), atol=1e-10)
    # ... and so does the whitened factorization (W S S⁻¹ = W).
    X = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    S = whitening_factor(X.double().T @ X.double(), 0.01)
    up, down = factorize(W, 32, S)
    assert torch.allclose(up @ down, W.double(), atol=1e-8)


def heterogeneous_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """LLM-like activations: low-dimensional (correlated) structure, channel scales spanning 400x."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 12, generator=g) @ torch.randn(12, dim, generator=g)
    scales = torch.exp(torch.linspace(-3, 3, dim))[torch.randperm(dim, generator=g)]
    return (latent + 0.1 * torch.randn(n, dim, generator=g)) * scales  # (n, dim)


class OneLinear(nn.Module):
    """The smallest 'model' a pass runs on: calibration 'ids' are the layer's float inputs."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.q_proj = nn.Linear(din, dout)

    def forward(self, x):
        return self.q_proj(x)


def test_asvd_beats_svd_on_heterogeneous_correlated_inputs():
    """SVD-LLM's finding: at 20% fewer parameters plain SVD's output error is large, whitened SVD's small."""
    torch.manual_seed(0)
    layer = OneLinear(64, 128)
    X = heterogeneous_inputs(2048, 64)
    calib = Calibration(X.view(8, 256, 64))
    errors = {}
    for name in ("lowrank.svd", "lowrank.asvd"):
        model, report = run(name, copy.deepcopy(layer), calib, ratio=0.8)
        assert report["ranks"] == {"q_proj": rank_for_ratio(0.8, 64, 128)}
        with torch.no_grad():
            ref, out = layer(X), model(X)
            errors[name] = float((out - ref).norm() / (ref - layer.q_proj.bias).norm())
    assert errors["lowrank.svd"] > 0.2
    assert errors["lowrank.asvd"] < 0.05
    assert errors["lowrank.asvd"] < errors["lowrank.svd"] / 10


def test_asvd_lowers_model_output_error_with_skewed_norms(calib):
    """On the tiny model, scale the RMSNorm weights unevenly (LLM norms have outlier channels): ASVD's logits
    stay closer to the original than SVD's at the same ratio."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(64, generator=g) * 1.5))
    x = calib.input_ids
    with torch.no_grad():
        ref = model(x)
        err = {name: float((run(name, copy.deepcopy(model), calib, ratio=0.8)[0](x) - ref).norm() / ref.norm())
               for name in ("lowrank.svd", "lowrank.asvd")}
    assert err["lowrank.asvd"] < 0.8 * err["lowrank.svd"]


def test_whitened_truncation_error_equals_dropped_singular_values():
    """With S Sᵀ = XᵀX, the calibration output error of rank r is exactly the dropped σ of W S."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(40, 24, generator=g), heterogeneous_inputs(500, 24)
    S = whitening_factor(X.double().T @ X.double(), 0.0)
    U, sigma, Vh = spectrum(W, S)
    up, down = factorize(W, 10, S)
    err = torch.linalg.norm(X.double() @ (W.double() - up @ down).T)
    assert torch.allclose(err, sigma[10:].pow(2).sum().sqrt(), rtol=1e-4)
    assert output_error(W, up @ down, X) < output_error(W, torch.mm(*factorize(W, 10)), X)


# -- rank rules ------------------------------------------------------------------------------------

def test_energy_selects_rank_from_known_singular_values():
    sigma = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.1])
    sq = sigma.pow(2)
    cum = (sq.cumsum(0) / sq.sum()).tolist()  # [0.687, 0.935, 0.997, ...]
    assert rank_for_energy(sigma, 0.5) == 1
    assert rank_for_energy(sigma, cum[0]) == 1
    assert rank_for_energy(sigma, cum[0] + 1e-6) == 2
    assert rank_for_energy(sigma, 0.95) == 3
    assert rank_for_energy(sigma, 1.0) == 6
    # Through the pass: a 64x64 weight with exactly these singular values (+ zeros) gets rank 2 at 0.9.
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    layer = OneLinear(64, 64)
    with torch.no_grad():
        layer.q_proj.weight.copy_(Q1[:, :6] @ torch.diag(sigma) @ Q2[:, :6].T)
    model, report = run("lowrank.svd", layer, None, energy=0.9)
    assert report["ranks"] == {"q_proj": 2}
    model, report = run("lowrank.svd", OneLinear(64, 64), None, energy=1.0)  # full rank: no saving
    assert report["ranks"] == {} and "q_proj" in report["skipped"]


def test_ratio_rank_and_skip_rule(calib):
    assert rank_for_ratio(0.8, 64, 128) == 34  # floor(0.8 * 8192 / 192)
    # ratio=1: a square 64x64 layer gets r = 32 and 32 * (64 + 64) = 64 * 64 — no saving, skipped and left
    # dense; a 64x32 (k/v) layer gets r = 21 and 21 * 96 = 2016 < 2048, factorized.
    model = tiny_model()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    model, report = run("lowrank.svd", model, None, ratio=1.0)
    square = {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "o_proj")}
    assert set(report["skipped"]) == square
    assert "32" in report["skipped"]["model.layers.0.self_attn.q_proj"]
    assert "not fewer" in report["skipped"]["model.layers.0.self_attn.q_proj"]
    assert len(report["modules"]) == 10 and report["ranks"]["model.layers.0.self_attn.k_proj"] == 21
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    for name, r in report["ranks"].items():
        m = model.get_submodule(name)
        assert r * (m.in_features + m.out_features) < m.in_features * m.out_features
    # energy: only the layer that really is low rank gets factorized.
    model = tiny_model()
    with torch.no_grad():
        w = model.model.layers[0].mlp.up_proj.weight
        w.copy_(w[:, :3] @ torch.randn(3, 64))  # rank 3
    model, report = run("lowrank.svd", model, None, energy=0.99)  # random weights: flat spectra
    assert report["modules"] == ["model.layers.0.mlp.up_proj"]
    assert report["ranks"]["model.layers.0.mlp.up_proj"] == 3
    assert len(report["skipped"]) == 13


def test_targets_limit_the_layers(calib):
    model, report = run("lowrank.svd", tiny_model(), None, ratio=0.5, targets=("gate_proj", "up_proj"))
    assert sorted(report["modules"]) == sorted(f"model.layers.{i}.mlp.{n}" for i in range(2)
                                               for n in ("gate_proj", "up_proj"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
