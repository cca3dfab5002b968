"""Fused quantized projections (compress/fuse.py): q/k/v and gate/up as one matmul over shared storage."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit.checkpoint import state_dict_for_save
from slmkit.compress.base import get_pass, make_config
from slmkit.compress.fuse import fuse_projections
from slmkit.model import CausalLM, ModelConfig
from pinned_kernels import each_kernel_choice

torch.set_num_threads(1)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
PASSES = [("quant.int8", {"kernel": "weight_only"}), ("quant.int8", {"kernel": "dynamic"}),
          ("quant.int4", {"group_size": 32}), ("quant.int4", {"group_size": 32, "format": "q4_0"})]
IDS = ["int8", "int8-dynamic", "int4-g32", "int4-q4_0"]


def quantized(name: str, options: dict, seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**TINY, **overrides})).eval()
    model, _ = get_pass(name).apply(model, make_config(name, options), None)
    return model


def decode(model: CausalLM, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Prefill logits (multi-row path) followed by greedy one-row decode steps' logits, concatenated."""
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
        out = [model(ids, cache=cache)]
        tok = out[-1][:, -1:].argmax(-1)
        for _ in range(steps):
            out.append(model(tok, cache=cache))
            tok = out[-1][:, -1:].argmax(-1)
    return torch.cat(out, dim=1)


def fused_groups(model: CausalLM) -> int:
    return sum(attr in m.__dict__ for m in model.modules() for attr in ("fused_qkv", "fused_gate_up"))


@pytest.mark.parametrize("name,options", PASSES, ids=IDS)
def test_fused_model_computes_what_the_unfused_one_does(name, options):
    plain = quantized(name, options)
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == 2 * TINY["num_hidden_layers"]
    assert fuse_projections(fused) == 4  # idempotent: the valid groups are kept
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    for choice in each_kernel_choice(plain, fused):
        a, b = decode(plain, ids), decode(fused, ids)
        # the same stored codes and the same activation rounding; only the summation order of a wider
        # matmul may differ
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"kernel_choice={choice}")
    assert fused_groups(fused) == 4


@pytest.mark.parametrize("name,options", PASSES[:1] + PASSES[2:3], ids=["int8", "int4-g32"])
def test_fusion_adds_no_memory_and_saves_each_projection(name, options, tmp_path):
    model = quantized(name, options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    after = model.state_dict()
    assert after.keys() == before.keys()  # the fused modules are not submodules: no new names
    for k in before:
        assert torch.equal(after[k], before[k]), k
    attn = model.model.layers[0].self_attn
    base = attn.__dict__["fused_qkv"].module.weight_int8 if name == "quant.int8" else \
        attn.__dict__["fused_qkv"].module.weight_int4
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # the sources read rows of the fused tensor
        codes = proj.weight_int8 if name == "quant.int8" else proj.weight_int4
        assert codes.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    f = tmp_path / "model.safetensors"
    save_file(state_dict_for_save(model), str(f))  # views are saved as their own bytes
    state = load_file(str(f))
    for k, v in state.items():
        assert torch.equal(v, before[k]), k


def test_in_place_load_reaches_the_fused_module():
    model, other = quantized("quant.int8", {"kernel": "dynamic"}, seed=0), quantized("quant.int8", {"kernel": "dynamic"}, seed=1)
    fuse_projections(model)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    decode(model, ids)  # builds the fused kernel caches
    model.load_state_dict(other.state_dict())  # copy_ into the shared storage: the caches are invalidated
    assert fused_groups(model) == 4
    for _ in each_kernel_choice(model, other):
        torch.testing.assert_close(decode(model, ids), decode(other, ids), rtol=1e-5, atol=1e-5)


def test_replaced_sources_drop_the_fused_module():
    model = quantized("quant.int4", {"group_size": 32})
    reference = copy.deepcopy(model)
    fuse_projections(model)
    model.load_state_dict(reference.state_dict(), assign=True)  # new tensors: no longer views of the fused ones
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    for _ in each_kernel_choice(model, reference):
        torch.testing.assert_close(decode(model, ids), decode(reference, ids), rtol=0, atol=0)
    assert fused_groups(model) == 0  # dropped on first use; the layers compute unfused


def test_sources_pinned_differently_compute_one_by_one():
    model = quantized("quant.int8", {"kernel": "weight_only"})
    reference = copy.deepcopy(model)
    fuse_projections(model)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    for m in (model, reference):
        m.model.layers[0].self_attn.k_proj.kernel_choice = "dense"
        for name in ("q_proj", "v_proj"):
            getattr(m.model.layers[0].self_attn, name).kernel_choice = "packed"
    torch.testing.assert_close(decode(model, ids)[:, -1], decode(reference, ids)[:, -1], rtol=0, atol=0)


def test_float_and_mixed_layers_are_left_alone():
    torch.manual_seed(0)
    dense = CausalLM(ModelConfig(**TINY)).eval()
    assert fuse_projections(dense) == 0
    model = quantized("quant.int8", {"targets": ["q_proj", "gate_proj", "up_proj", "down_proj"]})
    assert fuse_projections(model) == 2  # gate/up only: k/v stayed float
    moe = quantized("quant.int8", {}, num_local_experts=4, num_experts_per_tok=2)
    assert fuse_projections(moe) == 2  # attention only: experts have their own MLPs
