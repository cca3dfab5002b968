import json

import pytest
import torch

from slmkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slmkit.model import CausalLM, ModelConfig


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, **kw)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_is_identity(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    save_checkpoint(model, tmp_path / "ck", provenance={"stages": [{"stage": "train", "metrics": {"val_loss": 1.0}}]})
    ck = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(ck.model(x), model(x))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ck.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert ck.provenance["stages"][0]["stage"] == "train"
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "slmkit.json"} <= names
    card = (tmp_path / "ck" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and "val_loss" in card
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_truncated_weights_name_the_file(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck", verify=False)


def test_flipped_byte_is_caught_by_digest(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "ck")


def test_weights_that_do_not_match_config_are_named(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["intermediate_size"] = 96
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "ck" / "slmkit.json").unlink()  # as if hand-edited without provenance
    with pytest.raises(CheckpointError, match=r"shape mismatch.*mlp\.gate_proj\.weight"):
        load_checkpoint(tmp_path / "ck")


def test_corrupted_config_json_names_line(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text('{"hidden_size": 64,\n oops}')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON \(line 2"):
        load_checkpoint(tmp_path / "ck")


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


def test_loading_in_bf16_keeps_rotary_frequencies_fp32(tmp_path):
    """`load_checkpoint(dtype=bfloat16)` casts the weights, not the rotary frequencies: bf16 would round them, and
    the rotation at position p (angle p * f) would drift further from the model's with every position."""
    from slmkit.model.rope import rope_inverse_frequencies

    model = tiny_model(rope_theta=100000.0)
    save_checkpoint(model, tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    assert ck.model.model.embed_tokens.weight.dtype is torch.bfloat16
    inv = ck.model.model.rotary_emb.inv_freq
    assert inv.dtype is torch.float32 and torch.equal(inv, rope_inverse_frequencies(model.config))
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        ref, got = model(x), ck.model(x).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
