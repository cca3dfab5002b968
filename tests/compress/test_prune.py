"""Pruning passes (magnitude, Wanda, SparseGPT) and the compact SparseLinear storage."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit.checkpoint import state_dict_for_save
from slmkit.compress.base import (Calibration, PassError, config_to_dict, count_parameters, get_pass, make_config,
                                  state_bytes, tensor_bytes)
from slmkit.compress.prune import (SPEEDUP_NOTE, _collect_until, magnitude_mask, sparsegpt_prune, wanda_mask)
from slmkit.compress.sparse import SparseLinear, pack_mask, unpack_mask
from slmkit.model import CausalLM, ModelConfig
from slmkit.model.rope import rope_inverse_frequencies

torch.set_num_threads(1)

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
PASSES = ("prune.magnitude", "prune.wanda", "prune.sparsegpt")
PATTERNS = ({"sparsity": 0.5}, {"pattern": "2:4"})
CASES = [(p, o) for p in PASSES for o in PATTERNS]
TOLERANCE = {"prune.magnitude": 0.3, "prune.wanda": 0.3, "prune.sparsegpt": 0.3}  # relative logit error


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(CONFIG).eval()


@pytest.fixture
def calib() -> Calibration:
    g = torch.Generator().manual_seed(1)
    return Calibration(torch.randint(0, 97, (8, 32), generator=g))


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))


def run(name, opts, model, calib):
    cfg = make_config(name, opts)
    model, report = get_pass(name).apply(model, cfg, calib)
    return model, cfg, report


def reload(model, passes, tmp_path):
    """Save -> meta build -> replay restructure from the JSON records -> load(assign=True)."""
    path = tmp_path / "model.safetensors"
    save_file(state_dict_for_save(model), str(path))
    with torch.device("meta"):
        fresh = CausalLM(CONFIG)
    for name, cfg, report in passes:
        cfg = make_config(name, json.loads(json.dumps(config_to_dict(cfg))))
        fresh = get_pass(name).restructure(fresh, cfg, json.loads(json.dumps(report)))
    meta_counts = count_parameters(fresh)
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False, assign=True)
    assert missing == ["lm_head.weight"] and unexpected == []
    fresh.tie_weights()
    fresh.model.rotary_emb.inv_freq = rope_inverse_frequencies(CONFIG)
    return fresh.eval(), path, meta_counts


# -- contract -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", CASES)
def test_contract(name, opts, calib, batch, tmp_path):
    model = tiny_model()
    with torch.no_grad():
        ref = model(batch)
    total_before, _ = count_parameters(model)
    model, cfg, report = run(name, opts, model, calib)
    with torch.no_grad():
        out = model(batch)
    assert out.shape == ref.shape
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < TOLERANCE[name]

    json.dumps(report)
    assert len(report["modules"]) == 14 and report["speedup"] == SPEEDUP_NOTE
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in report["modules"])

    total, nonzero = count_parameters(model)
    pruned = sum(m["nonzero"] for m in report["layers"].values())
    target_numel = sum(model.get_submodule(n).weight.numel() for n in report["modules"])
    assert total == total_before and nonzero == total - (target_numel - pruned)

    loaded, path, meta_counts = reload(model, [(name, cfg, report)], tmp_path)
    assert meta_counts == (total, nonzero)  # meta-device accounting from the record
    on_disk = load_file(str(path))
    assert state_bytes(model) == sum(tensor_bytes(t) for t in on_disk.values())
    assert 0 < path.stat().st_size - state_bytes(model) < 16_384  # only the safetensors header on top
    assert any(k.endswith("q_proj.weight_mask") for k in on_disk)
    assert not any(k.endswith("q_proj.weight") for k in on_disk)
    with torch.no_grad():
        assert torch.equal(loaded(batch), out)
    assert count_parameters(loaded) == (total, nonzero)


@pytest.mark.parametrize("name,opts", CASES)
def test_exact_sparsity(name, opts, calib):
    model, _, report = run(name, opts, tiny_model(), calib)
    for qual, rec in report["layers"].items():
        w = model.get_submodule(qual).weight
        assert rec["sparsity"] == 0.5 and rec["nonzero"] == w.numel() // 2 == int(torch.count_nonzero(w))
        if "pattern" in opts:
            groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)  # (out, in / 4)
            assert torch.all(groups == 2)
        elif name == "prune.wanda":  # Wanda compares within each output row
            assert torch.all((w != 0).sum(1) == w.shape[1] // 2)


def test_global_magnitude_scope(calib):
    model = tiny_model()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model, _, report = run("prune.magnitude", {"sparsity": 0.5, "scope": "global"}, model, calib)
    assert report["sparsity"] == 0.5
    kept_min = min(float(original[n][model.get_submodule(n).weight != 0].abs().min()) for n in report["modules"])
    pruned_max = max(float(original[n][model.get_submodule(n).weight == 0].abs().max()) for n in report["modules"])
    assert pruned_max <= kept_min  # one threshold over all targets
    per_layer = [rec["sparsity"] for rec in report["layers"].values()]
    assert max(per_layer) - min(per_layer) > 0.2  # o/down_proj (smaller init) lose more than the others


# -- quality: the published ordering -----------------------------------------------------------------------

def heterogeneous_layer(seed: int = 0):
    """A (32, 64) weight and 512 inputs of which 8 features, scattered, are 10x louder (outlier features)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(512, 64, generator=g)
    X[:, torch.randperm(64, generator=g)[:8]] *= 10.0
    return W, X


def reconstruction_errors(pattern=None, seed=0) -> dict[str, float]:
    W, X = heterogeneous_layer(seed)
    ref = X @ W.T
    mag = W.masked_fill(magnitude_mask(W, 0.5, pattern), 0)
    wan = W.masked_fill(wanda_mask(W, X.pow(2).sum(0), 0.5, pattern), 0)
    sgpt = sparsegpt_prune(W, X.T @ X / X.shape[0], 0.5, pattern)
    return {k: float((X @ w.T - ref).norm() / ref.norm()) for k, w in
            (("magnitude", mag), ("wanda", wan), ("sparsegpt", sgpt))}


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_calibrated_pruning_beats_magnitude(pattern):
    for seed in range(3):
        err = reconstruction_errors(pattern, seed)
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_identity_hessian_is_magnitude(pattern):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    out = sparsegpt_prune(W, torch.eye(64), 0.5, pattern, damp=0.01, block_size=128)
    assert torch.equal(out == 0, magnitude_mask(W, 0.5, pattern))
    assert torch.allclose(out[out != 0], W[out != 0])  # nothing to compensate when features are independent


def test_sparsegpt_lazy_block_updates_are_exact():
    """With 2:4 the masks do not depend on the block size, and lazy (blocked) updates are algebraically the
    same as eager ones: block sizes 4, 6 (rounded to 4) and 128 must agree."""
    W, X = heterogeneous_layer(4)
    H = X.T @ X / X.shape[0]
    outs = [sparsegpt_prune(W, H, 0.5, (2, 4), block_size=b) for b in (4, 6, 128)]
    for out in outs[1:]:
        assert torch.equal(out == 0, outs[0] == 0) and torch.allclose(out, outs[0], atol=1e-4)
    assert torch.all((outs[0] != 0).reshape(32, -1, 4).sum(-1) == 2)


def test_sequential_calibration_stops_after_the_layer(calib):
    model = tiny_model()
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda *a: seen.append(1))
    q0 = model.model.layers[0].self_attn.q_proj
    rows = []
    _collect_until(model, {"q": q0}, calib, lambda n, x: rows.append(x.shape), model.model.layers[0])
    assert seen == [] and sum(s[0] * s[1] for s in rows) == 8 * 32


# -- storage ----------------------------------------------------------------------------------------------

def test_sparse_checkpoint_smaller_than_dense(calib, tmp_path):
    dense = tiny_model()
    save_file(state_dict_for_save(dense), str(tmp_path / "dense.safetensors"))
    dense_targets = sum(m.weight.numel() * 4 for n, m in dense.named_modules() if n.endswith("_proj"))
    sparse, _, report = run("prune.magnitude", {"sparsity": 0.5}, tiny_model(), calib)
    save_file(state_dict_for_save(sparse), str(tmp_path / "sparse.safetensors"))
    assert (tmp_path / "sparse.safetensors").stat().st_size < (tmp_path / "dense.safetensors").stat().st_size
    sd = state_dict_for_save(sparse)
    sparse_targets = sum(tensor_bytes(v) for k, v in sd.items() if "_proj." in k)
    assert sparse_targets / dense_targets == pytest.approx(0.5 + 1 / 32)  # 4 B per kept + 1 bit per weight


def test_sparse_linear_storage_roundtrip():
    torch.manual_seed(0)
    m = SparseLinear(13, 5, dtype=torch.bfloat16)  # in_features not a multiple of 8
    with torch.no_grad():
        m.weight[m.weight.abs() < 0.15] = 0
    sd = m.state_dict()
    assert list(sd) == ["weight_mask", "weight_values", "bias"]
    assert sd["weight_mask"].dtype == torch.uint8 and sd["weight_mask"].shape == (5, 2)
    assert sd["weight_values"].dtype == torch.bfloat16
    assert sd["weight_values"].numel() == int(torch.count_nonzero(m.weight))
    assert torch.equal(unpack_mask(pack_mask(m.weight != 0), 13), m.weight != 0)
    with torch.device("meta"):
        fresh = SparseLinear(13, 5, dtype=torch.bfloat16)
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh.weight, m.weight) and fresh.weight.dtype == torch.bfloat16
    bad = dict(sd, weight_values=sd["weight_values"][:-1])
    with pytest.raises(RuntimeError, match="weight_values"):
        SparseLinear(13, 5).load_state_dict(bad)


def test_reprune_sparse_linear_to_higher_sparsity(calib, batch, tmp_path):
    model, c1, r1 = run("prune.magnitude", {"sparsity": 0.5}, tiny_model(), calib)
    zero_before = {n: model.get_submodule(n).weight == 0 for n in r1["modules"]}
    model, c2, r2 = run("prune.sparsegpt", {"sparsity": 0.75}, model, calib)
    for n in r2["modules"]:
        w = model.get_submodule(n).weight
        assert r2["layers"][n]["sparsity"] == 0.75 and torch.all(w[zero_before[n]] == 0)
    loaded, _, _ = reload(model, [("prune.magnitude", c1, r1), ("prune.sparsegpt", c2, r2)], tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


# -- configuration errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,opts,field", [
    ("prune.magnitude", {"sparsity": 1.0}, "sparsity"),
    ("prune.wanda", {"sparsity": -0.1}, "sparsity"),
    ("prune.sparsegpt", {"pattern": "4:2"}, "pattern"),
    ("prune.magnitude", {"pattern": "0:4"}, "pattern"),
    ("prune.magnitude", {"pattern": "sparse"}, "pattern"),
    ("prune.magnitude", {"pattern": "2:4", "sparsity": 0.3}, "sparsity"),
    ("prune.wanda", {"scope": "global"}, "scope"),
    ("prune.sparsegpt", {"scope": "global"}, "scope"),
    ("prune.magnitude", {"scope": "global", "pattern": "2:4"}, "scope"),
    ("prune.magnitude", {"scope": "model"}, "scope"),
    ("prune.sparsegpt", {"block_size": 0}, "block_size"),
    ("prune.sparsegpt", {"damp": -1.0}, "damp"),
    ("prune.magnitude", {"targets": ()}, "targets"),
])
def test_invalid_config(name, opts, field):
    with pytest.raises(PassError, match=rf"{name}: {field}="):
        make_config(name, opts)


def test_config_from_cli_strings_and_replay():
    cfg = make_config("prune.sparsegpt", {"pattern": "2:4", "block_size": "64", "targets": "q_proj+k_proj"})
    assert cfg.sparsity == 0.5 and cfg.block_size == 64 and cfg.targets == ("q_proj", "k_proj")
    assert make_config("prune.sparsegpt", json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert make_config("prune.magnitude", {}).sparsity == 0.5


class FakeQuantLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(64, 64, dtype=torch.int8))

    def forward(self, x):
        return x


@pytest.mark.parametrize("name", PASSES)
def test_errors_leave_weights_unchanged(name, calib):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match=rf"{name}: pattern='2:3'.*in_features"):
        run(name, {"pattern": "2:3"}, model, calib)
    model.model.layers[1].self_attn.q_proj = FakeQuantLinear()
    with pytest.raises(PassError, match="before quantization"):
        run(name, {"sparsity": 0.5}, model, calib)
    with pytest.raises(PassError, match="targets"):
        run(name, {"targets": ("w1",)}, model, calib)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k in before)
    if name != "prune.magnitude":
        with pytest.raises(PassError, match="calibration"):
            get_pass(name).apply(tiny_model(), make_config(name, {}), None)


def test_training_a_pruned_model_keeps_its_zeros():
    from slmkit.compress.sparse import SparseLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    sparse = SparseLinear.from_linear(lin)
    opt = torch.optim.AdamW(sparse.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        sparse(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(sparse.weight[:, ::2]) == 0 and torch.count_nonzero(sparse.weight[:, 1::2]) > 0
