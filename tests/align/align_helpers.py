"""A tiny random checkpoint with the default domain's tokenizer (slmkit's chat template), for the SFT, verifier
and pair tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_tiny_checkpoint(dataset: Path, out: Path, *, seed: int = 0) -> Path:
    from slmkit.checkpoint import save_checkpoint
    from slmkit.data import open_dataset
    from slmkit.model import CausalLM, ModelConfig

    ds = open_dataset(dataset)
    config = ModelConfig(vocab_size=ds.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=ds.bos_token_id,
                         eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(seed)
    return save_checkpoint(CausalLM(config), out, tokenizer_from=ds.path,
                           provenance={"stages": [{"stage": "train", "data": {"path": str(Path(dataset).resolve())}}]})


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_dataset, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_dataset, tmp_path_factory.mktemp("align") / "ck")
