"""GGUF export: the file read back with gguf's own reader holds every key and tensor llama.cpp needs, an independent
llama.cpp-layout forward over its tensors reproduces slmkit's logits, and every unsupported model is refused.
Compressed (quantized, low-rank) checkpoints: test_gguf_compressed.py.

llama.cpp itself loading the files (tokenize, score, decode greedily as slmkit does) is test_gguf_llama_cpp.py,
through node-llama-cpp's prebuilt binaries (see llama_cpp_node.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")

from slmkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmkit.compress.run import compress, parse_pass  # noqa: E402
from slmkit.data.tokenizer import (CHAT_TEMPLATE, encode_documents, special_token_ids, tokenizer_config,  # noqa: E402
                                   train_tokenizer)
from slmkit.export import GGUFExportError, export_gguf  # noqa: E402
from slmkit.export.gguf import (check_gguf_exportable, imported_pre_name, permute_qk,  # noqa: E402
                                pre_tokenizer_name, unpermute_qk)
from slmkit.export.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402
from slmkit.model import CausalLM, ModelConfig  # noqa: E402
from slmkit.model.mlp import SwiGLU  # noqa: E402

QT = gguf.GGMLQuantizationType
VOCAB = 320
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # all three frequency bands occur at head_dim 16
CASES = {
    "llama-tied": dict(model_type="llama"),
    "llama3-untied": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-biases-mqa": dict(model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, tie_word_embeddings=False),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, num_key_value_heads=4),
    "head-dim-32": dict(model_type="mistral", head_dim=32),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}
CORPUS = [
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "Ünïcode café, naïve façade — 東京, 北京 😀 and it's 2024; we'll see.",
    "for i in range(10):\n\tprint(i ** 2)  # squares 100 200\n",
] * 20
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x, self.y = x, y  # 2D\n",
    "Café naïve résumé — 東京 😀 ünïcödé ½ Ωmega",
    "spaces   and\n\n\n  newlines\t\t tabs    \n",
    "I'll say it's 12345 or 3.14159, don't you think?  ",
    "not special here: <|user|> <|end|> <|bos|>",
]


# -- fixtures and builders --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slm_tokenizer_dir(tmp_path_factory) -> Path:
    """slmkit's own tokenizer (byte-level BPE, GPT-2 regex, its 7 special tokens and chat template)."""
    d = tmp_path_factory.mktemp("slmtok")
    tok = train_tokenizer(CORPUS, vocab_size=VOCAB)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, special_token_ids(tok))))
    return d


@torch.no_grad()
def make_checkpoint(path: Path, tokenizer_dir: Path | None, seed: int = 0, **overrides) -> Path:
    """A tiny checkpoint whose norms and biases are far from their 1/0 init, so a dropped one shows."""
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**TINY, **overrides})).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape))
    save_checkpoint(model, path, tokenizer_from=tokenizer_dir)
    return path


def read_gguf(path: Path) -> tuple[dict, dict[str, "gguf.ReaderTensor"]]:
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in r.tensors}


def dequantized(t) -> torch.Tensor:
    """A reader tensor as float64 in PyTorch's (rows, cols) order."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64))


def expected_names(c: ModelConfig) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    names |= set() if c.tie_word_embeddings else {"output.weight"}
    names |= {"rope_freqs.weight"} if c.rope_scaling else set()
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        names |= {b + n + ".weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")}
        if c.attention_bias or c.qkv_bias:
            names |= {b + n + ".bias" for n in ("attn_q", "attn_k", "attn_v")}
        if c.attention_bias:
            names.add(b + "attn_output.bias")
        ffn = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if c.num_local_experts else \
            ("ffn_gate", "ffn_up", "ffn_down")
        names |= {b + n + ".weight" for n in ffn}
        if c.mlp_bias:
            names |= {b + n + ".bias" for n in ("ffn_gate", "ffn_up", "ffn_down")}
    return names


def source_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """slmkit's tensors under their GGUF names, in slmkit's (rotate-half) layout."""
    c, out = model.config, {}
    out["token_embd.weight"] = model.model.embed_tokens.weight
    out["output_norm.weight"] = model.model.norm.weight
    if not c.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        mods = dict(layer.self_attn.named_children())
        if c.num_local_experts:
            out[f"blk.{i}.ffn_gate_inp.weight"] = layer.mlp.gate.weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stacked = torch.stack([getattr(e, proj).weight for e in layer.mlp.experts])
                out[f"blk.{i}.{names[proj]}_exps.weight"] = stacked
        else:
            mods.update(layer.mlp.named_children())
        for proj, m in mods.items():
            for suffix in ("weight", "bias"):
                if getattr(m, suffix, None) is not None:
                    out[f"blk.{i}.{names[proj]}.{suffix}"] = getattr(m, suffix)
    return {k: v.detach().double() for k, v in out.items()}


def in_slmkit_layout(name: str, t: torch.Tensor, c: ModelConfig, arch: str) -> torch.Tensor:
    """Undo the Q/K row permutation of the llama architecture."""
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        return unpermute_qk(t, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
    return t


def in_gguf_layout(name: str, t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """Apply the Q/K row permutation of the llama architecture."""
    if ".attn_q." in name or ".attn_k." in name:
        return permute_qk(t, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
    return t


def ggml_activations(x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What llama.cpp's CPU matmul makes of activations x (T, in) before a dot product with the quantized reader
    tensor `t` (ggml's `vec_dot_type`): Q8_0 and Q4_0 weights take Q8_0 activations, Q4_1 weights Q8_1. Both
    quantize each 32-block with d = amax/127, q = round(x/d), store fp16(d); Q8_1 also stores s = fp16(d·Σq), which
    multiplies the weights' m. Returns (x̂ = q·fp16(d), and for Q4_1 the (T, in/32) s), float64."""
    T, n = x.shape
    blocks = x.reshape(T, n // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True).float() / 127  # ggml computes d and 1/d in fp32
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks.float() * inv).double()
    d16 = d.half().double()
    xq = (q * d16).reshape(T, n)
    if t.tensor_type != QT.Q4_1:
        return xq, None
    return xq, (q.sum(-1) * d.double()[..., 0]).float().half().double()  # (T, in/32)


@torch.no_grad()
def reference_logits(meta: dict, tensors: dict, ids: list[int], interleaved: bool | None = None,
                     ggml_matmul: bool = False) -> torch.Tensor:
    """A llama.cpp-layout decoder written from the GGUF alone (float64): RMSNorm, RoPE on adjacent pairs for
    `llama` (NeoX halves for `qwen2`, as llama.cpp), GQA, SwiGLU or softmax top-k experts. Returns (T, V).

    `ggml_matmul`: multiply quantized matrices the way llama.cpp's CPU backend does, with the activations
    quantized to 8 bits per 32-block first (`ggml_activations`); the weights are the file's either way."""
    arch = meta["general.architecture"]
    p = arch + "."
    W = {name: dequantized(t) for name, t in tensors.items()}
    H, KV, hd = meta[p + "attention.head_count"], meta[p + "attention.head_count_kv"], meta[p + "attention.key_length"]
    eps, L, T = meta[p + "attention.layer_norm_rms_epsilon"], meta[p + "block_count"], len(ids)
    interleaved = arch == "llama" if interleaved is None else interleaved
    inv_freq = 1.0 / meta[p + "rope.freq_base"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if "rope_freqs.weight" in W:
        inv_freq = inv_freq / W["rope_freqs.weight"]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, hd/2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def matmul(x, name):  # (T, in) @ W.T -> (T, out)
        t = tensors[name]
        if not ggml_matmul or t.tensor_type not in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
            return x @ W[name].T
        xq, s = ggml_activations(x, t)
        if s is None:
            return xq @ W[name].T
        raw = np.asarray(t.data).reshape(W[name].shape[0], -1, 20)  # Q4_1 blocks: fp16 d, fp16 m, 16 bytes
        m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64))  # (out, in/32)
        w_dq = W[name] - m.repeat_interleave(32, dim=1)  # q · d: the part that meets x̂
        return xq @ w_dq.T + s @ m.T  # Σ_b d_w d_x Σ q_w q_x + m_w s_x

    def linear(x, name):
        y = matmul(x, name + ".weight")
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def rope(x):  # (T, n, hd)
        a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
        ra, rb = a * cos - b * sin, a * sin + b * cos
        return torch.stack((ra, rb), -1).flatten(-2) if interleaved else torch.cat((ra, rb), -1)

    x = W["token_embd.weight"][torch.tensor(ids)]  # (T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        b = f"blk.{i}."
        h = norm(x, W[b + "attn_norm.weight"])
        q = rope(linear(h, b + "attn_q").view(T, H, hd))
        k = rope(linear(h, b + "attn_k").view(T, KV, hd)).repeat_interleave(H // KV, dim=1)
        v = linear(h, b + "attn_v").view(T, KV, hd).repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear(torch.einsum("hts,shd->thd", att, v).reshape(T, H * hd), b + "attn_output")
        h = norm(x, W[b + "ffn_norm.weight"])
        if b + "ffn_gate_inp.weight" in W:
            probs = (h @ W[b + "ffn_gate_inp.weight"].T).softmax(-1)  # (T, E)
            top, chosen = probs.topk(meta[p + "expert_used_count"], dim=-1)
            weights = torch.zeros_like(probs).scatter(1, chosen, top / top.sum(-1, keepdim=True))  # (T, E)
            g = torch.einsum("td,efd->tef", h, W[b + "ffn_gate_exps.weight"])
            u = torch.einsum("td,efd->tef", h, W[b + "ffn_up_exps.weight"])
            y = torch.einsum("tef,edf->ted", F.silu(g) * u, W[b + "ffn_down_exps.weight"])  # (T, E, d)
            x = x + (weights[..., None] * y).sum(1)
        else:
            x = x + linear(F.silu(linear(h, b + "ffn_gate")) * linear(h, b + "ffn_up"), b + "ffn_down")
    x = norm(x, W["output_norm.weight"])
    return matmul(x, "output.weight" if "output.weight" in W else "token_embd.weight")


def prompt_ids(seed: int = 1, T: int = 24) -> list[int]:
    return torch.randint(3, VOCAB, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- tensors and metadata --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_f32_file_holds_every_tensor_and_key_exactly(tmp_path, slm_tokenizer_dir, case):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES[case])
    result = export_gguf(ck, tmp_path / "m.gguf", type="f32")
    model = load_checkpoint(ck).model
    c = model.config
    meta, tensors = read_gguf(result.path)
    arch = "qwen2" if case == "qwen2" else "llama"
    assert result.architecture == arch and meta["general.architecture"] == arch and not result.notes
    p = arch + "."
    expected = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": c.num_key_value_heads,
                "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                "rope.dimension_count": c.head_dim, "vocab_size": VOCAB}
    assert {k: meta[p + k] for k in expected} == expected
    assert meta[p + "attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert meta[p + "rope.freq_base"] == c.rope_theta
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    if c.num_local_experts:
        assert (meta[p + "expert_count"], meta[p + "expert_used_count"]) == (4, 2)
    else:
        assert p + "expert_count" not in meta

    assert set(tensors) == expected_names(c) and meta["general.name"] == "ck"
    source = source_tensors(model)
    for name, t in tensors.items():
        assert t.tensor_type == QT.F32, name
        if name == "rope_freqs.weight":
            continue
        assert list(t.shape) == list(reversed(source[name].shape)), name  # ggml lists dimensions innermost first
        assert torch.equal(in_slmkit_layout(name, dequantized(t), c, arch), source[name]), name


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_layout_forward_reproduces_slmkit_logits(tmp_path, slm_tokenizer_dir, case):
    """Proves the Q/K permutation, rope_freqs, biases, tying and expert stacking: an independent forward that
    reads only the GGUF (adjacent-pair RoPE, as llama.cpp's llama graph) gives slmkit's logits."""
    # Weights 10x the default init: attention far from uniform, so positions (RoPE) matter in the logits.
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, initializer_range=0.2, **CASES[case])
    path = export_gguf(ck, tmp_path / "m.gguf", type="f32").path
    model = load_checkpoint(ck).model
    ids = prompt_ids()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double()  # (T, V)
    meta, tensors = read_gguf(path)
    assert (reference_logits(meta, tensors, ids) - want).abs().max().item() <= 1e-4
    if meta["general.architecture"] == "llama":  # the check has teeth: rotate-half RoPE on these weights is wrong
        assert (reference_logits(meta, tensors, ids, interleaved=False) - want).abs().max().item() > 1.0


def test_llama3_rope_freqs_are_the_scaling_divisors(tmp_path, slm_tokenizer_dir):
    from slmkit.model.rope import rope_inverse_frequencies

    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama3-untied"])
    meta, tensors = read_gguf(export_gguf(ck, tmp_path / "m.gguf", type="q8_0").path)
    c = load_checkpoint(ck).config
    factors = dequantized(tensors["rope_freqs.weight"])
    assert tensors["rope_freqs.weight"].tensor_type == QT.F32 and factors.shape == (c.head_dim // 2,)
    base = rope_inverse_frequencies(c.replace(rope_scaling=None)).double()
    torch.testing.assert_close(base / factors, rope_inverse_frequencies(c).double(), rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0)  # high band untouched, low band / factor


def test_names_llama_cpp_special_cases_are_not_written(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "Phi3-mini-domain", slm_tokenizer_dir, **CASES["phi3"])
    result = export_gguf(ck, tmp_path / "m.gguf")
    meta, _ = read_gguf(result.path)
    assert "general.name" not in meta and result.architecture == "llama"
    assert result.notes == ["general.name 'Phi3-mini-domain' not written: llama.cpp rewrites the special tokens of "
                            "any model whose name contains 'phi3' or 'phi-3' for Phi-3's SentencePiece vocabulary, "
                            "and fails to load this one"]


def test_moe_experts_are_stacked_along_a_third_dimension(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["mixtral"])
    result = export_gguf(ck, tmp_path / "m.gguf", type="q8_0")
    _, tensors = read_gguf(result.path)
    layer = load_checkpoint(ck).model.model.layers[1].mlp
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert list(gate.shape) == [64, 128, 4] and list(tensors["blk.1.ffn_down_exps.weight"].shape) == [128, 64, 4]
    assert gate.tensor_type == QT.Q8_0
    router = tensors["blk.1.ffn_gate_inp.weight"]  # the router stays F32, as in llama.cpp
    assert router.tensor_type == QT.F32 and list(router.shape) == [64, 4]
    assert torch.equal(dequantized(router), layer.gate.weight.detach().double())
    for e, expert in enumerate(layer.experts):
        w = expert.down_proj.weight.detach().double()  # (d, F)
        assert (dequantized(tensors["blk.1.ffn_down_exps.weight"])[e] - w).abs().max() <= w.abs().max() / 127


# -- quantized types --------------------------------------------------------------------------------

@pytest.mark.parametrize("file_type, qtype", [("f16", QT.F16), ("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0)])
def test_quantized_tensors_dequantize_within_the_format_error(tmp_path, slm_tokenizer_dir, file_type, qtype):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **CASES["llama3-untied"])
    result = export_gguf(ck, tmp_path / "m.gguf", type=file_type)
    model = load_checkpoint(ck).model
    meta, tensors = read_gguf(result.path)
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[file_type]
    source = source_tensors(model)
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        got, want = dequantized(t), in_gguf_layout(name, source[name], model.config)
        if want.dim() == 1:  # norms stay F32, exactly
            assert t.tensor_type == QT.F32 and torch.equal(got, want), name
            continue
        stored = QT.Q8_0 if file_type == "q4_0" and name == "output.weight" else qtype
        assert t.tensor_type == stored, name
        if stored == QT.F16:  # relative rounding 2^-11
            assert ((got - want).abs() <= want.abs() * 2 ** -11 + 1e-7).all(), name
            continue
        # ggml blocks are 32 consecutive values of a row, each with one f16 scale d: q8_0 rounds to d = amax/127
        # (error <= d/2, plus the scale's rounding); q4_0 has d = amax/8 and clamps one side (error <= d).
        want_blocks, got_blocks = want.reshape(-1, 32), got.reshape(-1, 32)
        amax = want_blocks.abs().amax(-1, keepdim=True)
        bound = amax / 127 * 0.6 if stored == QT.Q8_0 else amax / 8 * 1.01
        assert ((got_blocks - want_blocks).abs() <= bound + 1e-9).all(), name
    if file_type == "q4_0":
        assert result.notes == ["output.weight: rows of 64 values are not a multiple of Q6_K's 256-value blocks; "
                                "the output matrix is stored as Q8_0"]
    else:
        assert not result.notes


def test_q4_0_file_stores_a_256_wide_output_matrix_at_q6_k(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    result = export_gguf(ck, tmp_path / "m.gguf", type="q4_0")
    _, tensors = read_gguf(result.path)
    out = tensors["output.weight"]
    assert out.tensor_type == QT.Q6_K and tensors["blk.0.attn_q.weight"].tensor_type == QT.Q4_0
    want = load_checkpoint(ck).model.lm_head.weight.detach().double()
    got = dequantized(out)
    assert float((got - want).norm() / want.norm()) < 0.03
    assert not result.notes


def test_rows_not_a_multiple_of_the_block_fall_back_to_f16(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, hidden_size=48, intermediate_size=96)
    result = export_gguf(ck, tmp_path / "m.gguf", type="q4_0")
    _, tensors = read_gguf(result.path)
    # Rows of 48 (every matrix reading the hidden state) cannot be split into blocks of 32; down_proj's 96 can.
    assert tensors["blk.0.attn_q.weight"].tensor_type == QT.F16
    assert tensors["token_embd.weight"].tensor_type == QT.F16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == QT.Q4_0
    assert any(n.startswith("blk.0.attn_q.weight: rows of 48 values are not a multiple of the Q4_0 block size (32)")
               for n in result.notes)
    assert len(result.notes) == 1 + 2 * 6  # token_embd (held at Q8_0, which falls back) + 6 matrices per layer


# -- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_round_trips(tmp_path, slm_tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, vocab_size=VOCAB + 12)  # padded embedding table
    meta, _ = read_gguf(export_gguf(ck, tmp_path / "m.gguf").path)
    tok = Tokenizer.from_file(str(slm_tokenizer_dir / "tokenizer.json"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB + 12
    assert tokens[:VOCAB] == [tok.id_to_token(i) for i in range(VOCAB)]
    assert tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 12)]
    special = {tok.token_to_id(s) for s in ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>",
                                             "<|assistant|>", "<|end|>")}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert set(types[VOCAB:]) == {gguf.TokenType.UNUSED}
    assert sum(t == gguf.TokenType.NORMAL for t in types) == VOCAB - len(special)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE

    merges = meta["tokenizer.ggml.merges"]
    stored = json.loads((slm_tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in stored] and len(merges) > 0
    # A BPE rebuilt from the file's vocabulary and merges alone tokenizes like the original.
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    rebuilt = Tokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = [t for t in TEXTS if "<|" not in t]
    assert [e.ids for e in rebuilt.encode_batch(texts)] == encode_documents(tok, texts)


def _split_pre_tokenizer(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_pre_tokenizer_names_follow_the_split_regex():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [byte_level]}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": _split_pre_tokenizer(LLAMA3_REGEX)}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": _split_pre_tokenizer(QWEN2_REGEX), "normalizer": {"type": "NFC"}}) \
        == "qwen2"
    smollm_own = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm_own}) == "smollm"  # SmolLM's tokenizer.json
    split_digits = _split_pre_tokenizer(r"\p{N}")
    split_digits["pretokenizers"][1]["use_regex"] = True
    assert pre_tokenizer_name({"pre_tokenizer": split_digits}) == "smollm"  # `slm import gguf`'s rebuilt one
    grouped = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, byte_level]}
    with pytest.raises(GGUFExportError, match="not one this exporter can name"):
        pre_tokenizer_name({"pre_tokenizer": grouped})


def test_pre_tokenizer_table_reads_back_what_it_builds():
    """Every name the importer builds a pre-tokenizer for is the name the exporter reads off it (aliases of
    one split read back as its first name, or as the preferred one)."""
    from slmkit.export.gguf_tokenizer import PRE_TOKENIZERS

    for name, pre in PRE_TOKENIZERS.items():
        built = {"pre_tokenizer": json.loads(pre.build().__getstate__())}
        first = next(n for n, p in PRE_TOKENIZERS.items() if p == pre)
        assert pre_tokenizer_name(built) == first
        assert pre_tokenizer_name(built, preferred=name) == name
        assert pre_tokenizer_name(built, preferred="qwen2" if name != "qwen2" else "gpt-2") == first


def test_imported_pre_name_is_read_from_the_import_stage():
    stages = [{"stage": "import", "format": "gguf", "tokenizer_pre": "llama3"}, {"stage": "compress"}]
    assert imported_pre_name({"stages": stages}) == "llama3"
    assert imported_pre_name({"stages": [{"stage": "import", "format": "hf"}]}) is None
    assert imported_pre_name({}) is None


def test_ignore_merges_must_be_what_llama_cpp_does(tmp_path, slm_tokenizer_dir):
    data = json.loads((slm_tokenizer_dir / "tokenizer.json").read_text())
    data["model"]["ignore_merges"] = True  # llama.cpp applies merges for `gpt-2`
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    ck = make_checkpoint(tmp_path / "ck", tmp_path / "tok")
    with pytest.raises(GGUFExportError, match="ignore_merges=True, but llama.cpp's `gpt-2` tokenizer"):
        export_gguf(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("tokenizer_json, match", [
    ({"pre_tokenizer": _split_pre_tokenizer(r"\p{L}+|\s+")}, "not one this exporter can name"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "no prefix space"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "Metaspace"),
    ({"pre_tokenizer": None}, "pre_tokenizer {}"),
    ({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}, "normalizer": {"type": "NFKC"}}, "normalizer"),
])
def test_unknown_pre_tokenizers_are_refused(tokenizer_json, match):
    with pytest.raises(GGUFExportError, match=match) as e:
        pre_tokenizer_name(tokenizer_json, "tok/tokenizer.json")
    if "normalizer" not in match:
        assert all(f"`{name}`" in str(e.value) for name in ("gpt-2", "llama-bpe", "qwen2", "smollm"))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model"].update(byte_fallback=True), "SentencePiece-style BPE"),
    (lambda d: d.update(model={"type": "WordLevel", "vocab": {}}), "tokenizer model 'WordLevel'"),
])
def test_unsupported_tokenizer_models_are_refused(tmp_path, slm_tokenizer_dir, edit, match):
    data = json.loads((slm_tokenizer_dir / "tokenizer.json").read_text())
    edit(data)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    ck = make_checkpoint(tmp_path / "ck", tmp_path / "tok")
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(ck, tmp_path / "m.gguf")


# -- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(attention_type="linformer", linformer_k=8, linformer_block=16), "Linformer"),
    (dict(memory_length=16), "Transformer-XL"),
    (dict(model_type="mixtral", num_local_experts=4, mlp_bias=True), "expert tensors .* have no biases"),
])
def test_architectures_gguf_cannot_express_are_refused(tmp_path, slm_tokenizer_dir, overrides, match):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir, **overrides)
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_pruned_checkpoints_export_dense_with_a_note(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    compress(ck, tmp_path / "pruned", [parse_pass("prune.magnitude:sparsity=0.5")], speed=False)
    result = export_gguf(tmp_path / "pruned", tmp_path / "m.gguf", type="f32")
    assert len(result.notes) == 1 and "pruned projections" in result.notes[0]
    pruned = load_checkpoint(tmp_path / "pruned").model
    _, tensors = read_gguf(result.path)
    w = pruned.model.layers[0].mlp.up_proj.weight.detach().double()
    assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(dequantized(tensors["blk.0.ffn_up.weight"]), w)


def test_per_layer_widths_are_refused(slm_tokenizer_dir):
    model = CausalLM(ModelConfig(**TINY))
    model.model.layers[1].mlp = SwiGLU(model.config, intermediate_size=96)  # what prune.width uniform=False leaves
    with pytest.raises(GGUFExportError, match=r"layers.1.mlp.gate_proj.weight has shape \(96, 64\).*uniform=True"):
        check_gguf_exportable(model, where="ck")


def test_bad_inputs_are_refused(tmp_path, slm_tokenizer_dir):
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    with pytest.raises(GGUFExportError, match="--type 'q5_k' is not supported; choose one of auto, f32, f16, q8_0, q4_0"):
        export_gguf(ck, tmp_path / "m.gguf", type="q5_k")
    with pytest.raises(GGUFExportError, match="is a directory"):
        export_gguf(ck, tmp_path)
    with pytest.raises(GGUFExportError, match="cannot export .*nope"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf")
    bare = make_checkpoint(tmp_path / "bare", None)
    with pytest.raises(GGUFExportError, match="no tokenizer.json; llama.cpp needs the vocabulary"):
        export_gguf(bare, tmp_path / "m.gguf")
    small = make_checkpoint(tmp_path / "small", slm_tokenizer_dir, vocab_size=300)
    with pytest.raises(GGUFExportError, match=f"ids up to {VOCAB - 1} but the model has vocab_size=300"):
        export_gguf(small, tmp_path / "m.gguf")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`slm ARGS` in this process through the real entry point (its error-to-exit-code mapping included)."""
    from slmkit.cli import main

    monkeypatch.setattr(sys, "argv", ["slm", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def test_cli_writes_the_file_and_maps_refusals_to_exit_code_2(tmp_path, slm_tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    ck = make_checkpoint(tmp_path / "ck", slm_tokenizer_dir)
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", ck, tmp_path / "m.gguf", "--type", "q8_0")
    assert code == 0, err
    assert "(llama, q8_0, 20 tensors" in out and (tmp_path / "m.gguf").exists()
    xl = make_checkpoint(tmp_path / "xl", slm_tokenizer_dir, memory_length=8)
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", xl, tmp_path / "x.gguf")
    assert code == 2 and "error:" in err and "Transformer-XL" in err
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", ck, tmp_path / "y.gguf", "--type", "q5")
    assert code == 2 and "--type 'q5' is not supported" in err
    code, out, err = run_cli(monkeypatch, capsys, "export", "gguf", "--help")
    assert code == 0 and "slm export gguf runs/small runs/small-q8_0.gguf --type q8_0" in out
