import os
from pathlib import Path

import pytest
import torch

# Tests are small; one thread avoids oversubscribing CI's two cores when pytest-xdist or torchrun run beside.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL_YAML = """\
hidden_size: 32
intermediate_size: 64
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
"""


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small slice of the default domain with a 384-token vocabulary (built once per session)."""
    from slmkit.data import build_dataset

    out = tmp_path_factory.mktemp("ds") / "ds"
    build_dataset([], out, vocab_size=384, max_bytes=150_000, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_yaml(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "model.yaml"
    f.write_text(TINY_MODEL_YAML)
    return f
