"""GGUF import: slmkit -> GGUF -> slmkit is the identity on logits and token ids; files written here with gguf's
own writer (every supported quantization type, every supported pre-tokenizer) import to the logits and token
ids transformers' GGUF loader computes; bad files are refused by name and leave nothing behind.

The real SmolLM2-135M-Instruct file is tested in test_gguf_smollm2.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install 'slmkit[gguf]')")

from slmkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmkit.export import GGUFImportError, export_gguf, import_gguf, smollm2_gguf_path  # noqa: E402
from slmkit.export.gguf import gguf_tensors  # noqa: E402
from slmkit.export.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402
from slmkit.export.q6k import quantize_q6_k  # noqa: E402
from slmkit.model import CausalLM, ModelConfig  # noqa: E402

QT = gguf.GGMLQuantizationType
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "TABLE = [\n    0x00, 0x1F,\n    12345, 678,\n        9,  10,   11\n]\n",
    "Ünïcode café, naïve façade — 東京 😀 and it's 2024; we'll see. I'M HERE, You'Re There.",
    "for i in range(10):\n\tprint(i ** 2)  # squares 100 200\n\n\n",
] * 20
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "x = [1,\n    23,  456]\t\t 7890  # 2 spaces before digits\n",
    "Café naïve résumé — 東京 😀 ünïcödé ½ Ωmega ٣٤ ①②",
    "spaces   and\n\n\n  newlines\t\t tabs    \n",
    "I'll say it's 12345 or 3.14159, DON'T you think?  ",
    "special: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
]
# tokenizers pre-tokenizers that split as llama.cpp does for each `tokenizer.ggml.pre` (llama-vocab.cpp)
SPLITS = {"gpt-2": None, "llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "smollm": "digits"}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # all three frequency bands occur at head_dim 16
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
WIDE = dict(TINY, hidden_size=256, intermediate_size=512)  # rows of 256 values: every K-quant block fits


# -- builders ---------------------------------------------------------------------------------------

def pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    split = SPLITS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":  # SmolLM's own tokenizer.json: every digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train(pre: str, vocab_size: int = 400):
    """A byte-level BPE trained with `pre`'s split: the ground truth the imported tokenizer must reproduce."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if pre == "llama-bpe":
        tok.model.ignore_merges = True  # as Llama 3's tokenizer.json
    return tok


@pytest.fixture(scope="module")
def tokenizers_by_pre() -> dict:
    return {pre: train(pre) for pre in SPLITS}


@torch.no_grad()
def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> CausalLM:
    """Norms and biases far from their 1/0 init and weights large enough that a misplaced row shows in logits."""
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**TINY, "vocab_size": vocab_size, **overrides})).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape))
        else:
            p.copy_(0.1 * torch.randn(p.shape))
    return model


def random_k_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Valid K-quant bytes (gguf can read but not write these): random quants and scales with small fp16
    super-block scales, so every dequantizer must agree on every bit of the format."""
    offsets = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2)}[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off, value in zip(offsets, (0.004, 0.002)):  # d, then dmin
        raw[..., off:off + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def add_tensor(w, name: str, data: np.ndarray, qtype, seed: int = 0) -> None:
    if data.ndim < 2 or qtype == QT.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == QT.F16:
        w.add_tensor(name, data.astype(np.float16))
    elif qtype == QT.Q6_K:
        w.add_tensor(name, quantize_q6_k(data), raw_dtype=qtype)
    elif qtype in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K):
        w.add_tensor(name, random_k_blocks(*data.shape, qtype, seed), raw_dtype=qtype)
    elif qtype == QT.IQ4_NL:  # a type the importer refuses; its bytes only need the right length
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(name, np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8), raw_dtype=qtype)
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_gguf(path: Path, model: CausalLM, tok, *, pre: str, arch: str = "llama", types=None, add_bos=None,
               hparams: dict | None = None, tokenizer_model: str = "gpt2", extra_tensors: dict | None = None) -> Path:
    """A GGUF file as llama.cpp's converter lays it out, written with gguf's writer. `types` maps a matrix's
    position (0, 1, ...) to its ggml type; `hparams` overrides metadata keys (without the arch prefix)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": c.rms_norm_eps, "rope.freq_base": c.rope_theta,
            "rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size, **(hparams or {})}
    for key, value in keys.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    matrices = 0
    for name, t in gguf_tensors(model, arch):
        data = t.detach().float().numpy()
        qtype = QT.F32
        if data.ndim == 2 and types is not None:
            qtype, matrices = types(matrices), matrices + 1
        add_tensor(w, name, data, qtype, seed=matrices)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def token_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# -- round trip through slmkit's exporter -----------------------------------------------------------

ROUND_TRIP = {
    "llama-tied": dict(model_type="llama"),
    "llama3-untied": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-biases-mqa": dict(model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=None),
}


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_export_then_import_is_the_identity(case, tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer

    src = tmp_path / "src"
    save_checkpoint(tiny_model(300, **ROUND_TRIP[case]), src, tokenizer_from=tokenizer_dir)
    exported = export_gguf(src, tmp_path / "m.gguf", type="f32")
    out = import_gguf(exported.path, tmp_path / "imported")

    a, b = load_checkpoint(src), load_checkpoint(out)
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "qkv_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                  "max_position_embeddings"):
        assert getattr(b.config, field) == getattr(a.config, field), field
    if a.config.rope_scaling:
        assert b.config.rope_scaling["original_max_position_embeddings"] == 64
        assert b.config.rope_scaling["factor"] == pytest.approx(8.0)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(b.model, ids), logits(a.model, ids), rtol=0, atol=1e-5)
    if a.config.tie_word_embeddings:
        assert b.model.lm_head.weight is b.model.model.embed_tokens.weight

    tok_a, tok_b = Tokenizer.from_file(str(src / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*TEXTS, "<|bos|>x<|eos|><|pad|>"]:
        assert token_ids(tok_b, text) == token_ids(tok_a, text), text
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|bos|>", "<|eos|>")

    prov = json.loads((out / "slmkit.json").read_text())["stages"][0]
    assert prov["stage"] == "import" and prov["format"] == "gguf" and prov["dequantized"] is True
    assert prov["sha256"] == __import__("hashlib").sha256(exported.path.read_bytes()).hexdigest()
    assert prov["tensor_types"] == {"F32": len(exported.tensor_types)} and prov["dtype"] == "float32"


def test_bf16_and_quantized_export_round_trip(tmp_path, tokenizer_dir):
    """--dtype bf16 stores bf16; a q8_0 file imports to weights within Q8_0's rounding of the original."""
    src = tmp_path / "src"
    save_checkpoint(tiny_model(300), src, tokenizer_from=tokenizer_dir)
    f = export_gguf(src, tmp_path / "m.gguf", type="q8_0").path
    out = import_gguf(f, tmp_path / "bf16", dtype="bf16")
    b, a = load_checkpoint(out).model, load_checkpoint(src).model
    assert b.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((out / "slmkit.json").read_text())["stages"][0]["dtype"] == "bfloat16"
    w_a, w_b = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight.float()
    assert (w_a - w_b).abs().max() < 0.02 * w_a.abs().max()  # Q8_0 + bf16 rounding, rows in slmkit's order


@pytest.mark.parametrize("pre", [*SPLITS, "llama3"])
def test_imported_tokenizer_exports_under_its_pre_name(pre, tmp_path, tokenizers_by_pre):
    """import gguf -> export gguf -> import gguf: the file's `tokenizer.ggml.pre` comes back (an alias of the same
    split too, read from the import's provenance) and token ids and logits do not change."""
    from tokenizers import Tokenizer

    tok = tokenizers_by_pre["llama-bpe" if pre == "llama3" else pre]
    f = write_gguf(tmp_path / "a.gguf", tiny_model(tok.get_vocab_size(with_added_tokens=True)), tok, pre=pre)
    first = import_gguf(f, tmp_path / "first")
    exported = export_gguf(first, tmp_path / "b.gguf", type="f32").path
    assert gguf.GGUFReader(exported).fields["tokenizer.ggml.pre"].contents() == pre
    second = import_gguf(exported, tmp_path / "second")
    tok_a, tok_b = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (first, second))
    for text in TEXTS:
        assert token_ids(tok_b, text) == token_ids(tok_a, text), text
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert b.config.bos_token_id == a.config.bos_token_id
    ids = torch.tensor([token_ids(tok_a, TEXTS[1])])
    assert torch.equal(logits(b.model, ids), logits(a.model, ids))


# -- files written here: transformers' GGUF loader as the reference ---------------------------------

@pytest.mark.parametrize("pre", SPLITS)
def test_tokenizer_matches_the_trained_one_and_transformers(pre, tmp_path, tokenizers_by_pre):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = tokenizers_by_pre[pre]
    n = tok.get_vocab_size(with_added_tokens=True)
    f = write_gguf(tmp_path / "m.gguf", tiny_model(n), tok, pre=pre)
    out = import_gguf(f, tmp_path / "ckpt")
    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    if pre == "smollm":
        # transformers 5 gives `smollm` GPT-2's split without llama.cpp's digit step; they differ only where two
        # or more whitespace characters precede a digit. Compare the vocabulary under the split llama.cpp uses.
        hf.backend_tokenizer.pre_tokenizer = pre_tokenizer("smollm")
        assert token_ids(mine, "a  1") == [tok.token_to_id("a"), tok.token_to_id("ĠĠ"), tok.token_to_id("1")]
    for text in TEXTS:
        assert token_ids(mine, text) == token_ids(tok, text), text
        assert token_ids(mine, text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert mine.decode(token_ids(mine, text), skip_special_tokens=False) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    # llama.cpp prepends bos for llama-bpe unless the file says otherwise; slmkit prepends bos_token_id
    assert load_checkpoint(out).config.bos_token_id == (1 if pre == "llama-bpe" else None)


def all_types(i: int):
    order = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
             QT.F16, QT.BF16, QT.F32]
    return order[i % len(order)]


@pytest.mark.parametrize("arch,overrides", [
    ("llama", dict(tie_word_embeddings=False)),  # 16 matrices: every type at least once
    ("qwen2", dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6)),
], ids=["llama-all-types", "qwen2-tied"])
def test_logits_match_transformers(arch, overrides, tmp_path, tokenizers_by_pre):
    from transformers import AutoModelForCausalLM

    tok = tokenizers_by_pre["gpt-2"]
    model = tiny_model(tok.get_vocab_size(with_added_tokens=True), **{**WIDE, **overrides})
    f = write_gguf(tmp_path / "m.gguf", model, tok, pre="gpt-2", arch=arch, types=all_types)
    out = import_gguf(f, tmp_path / "ckpt")
    types = json.loads((out / "slmkit.json").read_text())["stages"][0]["tensor_types"]
    if arch == "llama":
        assert set(types) == {t.name for t in map(all_types, range(13))}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name, dtype=torch.float32).eval()
    ids = torch.tensor([token_ids(tok, TEXTS[0] + TEXTS[1])])
    ours = logits(load_checkpoint(out).model, ids)
    torch.testing.assert_close(ours, logits(hf, ids), rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.5  # a function of the weights, not of their absence


# -- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def good_gguf(tmp_path, tokenizers_by_pre) -> Path:
    tok = tokenizers_by_pre["gpt-2"]
    return write_gguf(tmp_path / "good.gguf", tiny_model(tok.get_vocab_size(with_added_tokens=True)), tok,
                      pre="gpt-2", types=lambda i: QT.Q8_0)


def bad_file(tmp_path: Path, tok, **kwargs) -> Path:
    return write_gguf(tmp_path / "bad.gguf", tiny_model(tok.get_vocab_size(with_added_tokens=True)), tok, **kwargs)


def assert_refused(f: Path, out: Path, *fragments: str) -> None:
    with pytest.raises(GGUFImportError) as e:
        import_gguf(f, out)
    for fragment in (str(f), *fragments):
        assert fragment in str(e.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left


def test_refuses_an_unsupported_architecture(tmp_path, tokenizers_by_pre):
    f = bad_file(tmp_path, tokenizers_by_pre["gpt-2"], pre="gpt-2", arch="phi2")
    assert_refused(f, tmp_path / "out", "general.architecture='phi2'", "llama, qwen2")


def test_refuses_an_unknown_pre_tokenizer(tmp_path, tokenizers_by_pre):
    f = bad_file(tmp_path, tokenizers_by_pre["gpt-2"], pre="falcon")
    assert_refused(f, tmp_path / "out", "tokenizer.ggml.pre='falcon'", "gpt-2, llama-bpe", "smollm")


def test_refuses_a_sentencepiece_vocabulary(tmp_path, tokenizers_by_pre):
    f = bad_file(tmp_path, tokenizers_by_pre["gpt-2"], pre="default", tokenizer_model="llama")
    assert_refused(f, tmp_path / "out", "tokenizer.ggml.model='llama'", "slm import hf")


def test_refuses_an_unsupported_tensor_type(tmp_path, tokenizers_by_pre):
    tok = tokenizers_by_pre["gpt-2"]
    model = tiny_model(tok.get_vocab_size(with_added_tokens=True))
    f = tmp_path / "bad.gguf"
    write_gguf(f, model, tok, pre="gpt-2", types=lambda i: QT.IQ4_NL if i == 3 else QT.F32)
    assert_refused(f, tmp_path / "out", "IQ4_NL", "blk.0.", "Q4_1")


def test_refuses_a_truncated_file(tmp_path, good_gguf):
    data = good_gguf.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 200):
        f = tmp_path / f"cut{keep}.gguf"
        f.write_bytes(data[:keep])
        assert_refused(f, tmp_path / "out", "truncated")


def test_refuses_shapes_that_disagree_with_the_metadata(tmp_path, tokenizers_by_pre):
    tok = tokenizers_by_pre["gpt-2"]
    f = bad_file(tmp_path, tok, pre="gpt-2", hparams={"feed_forward_length": 96})
    assert_refused(f, tmp_path / "out", "blk.0.ffn_gate.weight", "(128, 64)", "(96, 64)")
    f = bad_file(tmp_path, tok, pre="gpt-2", hparams={"attention.head_count_kv": 4})
    assert_refused(f, tmp_path / "out", "blk.0.attn_k.weight")
    f = bad_file(tmp_path, tok, pre="gpt-2", extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    assert_refused(f, tmp_path / "out", "unexpected", "blk.0.attn_q_norm.weight")


def test_refuses_a_non_empty_output_directory(tmp_path, good_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="not an empty directory"):
        import_gguf(good_gguf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_imports_and_maps_errors_to_exit_code_2(tmp_path, good_gguf):
    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = slm("import", "gguf", good_gguf, tmp_path / "ok", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "ok").model.model.norm.weight.dtype == torch.bfloat16
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_gguf.read_bytes()[:-64])
    r = slm("import", "gguf", cut, tmp_path / "bad")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_smollm2_gguf_path_without_the_distribution(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert smollm2_gguf_path() is None
