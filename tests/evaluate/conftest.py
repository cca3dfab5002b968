import pytest
import torch

from slmkit.checkpoint import save_checkpoint
from slmkit.data import open_dataset
from slmkit.model import CausalLM, ModelConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_dataset):
    """An untrained 2-layer model on the tiny dataset's tokenizer, saved as a checkpoint."""
    ds = open_dataset(tiny_dataset)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=ds.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=ds.bos_token_id, eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id)
    return save_checkpoint(CausalLM(cfg), tmp_path_factory.mktemp("s") / "ck", tokenizer_from=tiny_dataset)
