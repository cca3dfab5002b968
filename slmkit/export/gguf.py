"""GGUF export for llama.cpp: one `.gguf` file that llama.cpp (and what is built on it: llama-cpp-python,
ollama, LM Studio) loads as it is, written with the `gguf` package, llama.cpp's own Python writer.

Architecture. llama.cpp's `llama` graph is slmkit's decoder: RMSNorm pre-norm, grouped-query attention,
SwiGLU, an optional output matrix (without `output.weight` llama.cpp reuses `token_embd`, i.e. tied
embeddings), optional q/k/v/o and MLP biases, and Mixtral experts (`ffn_gate_inp` router, softmax, top-k
weights renormalised — `moe.py`'s routing). So Llama, Mistral, Mixtral and Phi-3 export as `llama`: slmkit
holds Phi-3's fused `qkv_proj`/`gate_up_proj` as separate Linears, so with default rotary embeddings a Phi-3
is a Llama with its own sizes (llama.cpp's `phi3` graph would want them fused again; nothing gains from
that). A `qwen2` model with q/k/v biases only exports as llama.cpp's `qwen2`, as llama.cpp's converter
writes Qwen2; any other bias layout goes to `llama`, which has every bias as an optional tensor.

Rotary layout. slmkit, like Hugging Face, rotates the two halves of a head (pairs (j, j + d/2), "NeoX"
style); llama.cpp's `llama` graph rotates adjacent pairs (2j, 2j + 1) with the same frequency for pair j.
Attention scores are unchanged when the rows of W_q and W_k (and their biases) are permuted inside each head
so that row j becomes row 2j and row j + d/2 becomes row 2j + 1: q·k is a sum over pairs, and each pair is
rotated by the same angle in both layouts. This is the permutation llama.cpp's `convert_hf_to_gguf.py`
applies to Llama checkpoints (`permute_qk` below, `unpermute_qk` its inverse). llama.cpp's `qwen2` graph
uses NeoX rotation, so its weights are written as they are.

Llama-3 rope scaling is not a key in llama.cpp but a `rope_freqs` tensor of per-frequency divisors
(θ_j / rope_freqs[j]), here computed as the ratio of slmkit's unscaled to scaled inverse frequencies, so the
two agree by construction.

Types. `f32`/`f16` store every matrix in that type; `q8_0`/`q4_0` quantize matrices in blocks of 32 along a
row with `gguf.quants` (bit-identical to ggml's reference quantizers). As in llama.cpp: vectors (norms,
biases, `rope_freqs`) and the MoE router stay F32; a matrix whose rows are not a multiple of the block size
falls back to F16; a q4_0 file stores the output matrix (the token embeddings when tied) at Q6_K, as
llama-quantize does (written by `q6k.py`, since `gguf.quants` reads Q6_K but cannot write it), or at Q8_0 when
its rows are not a multiple of 256. Every such choice is listed in the result.

Tokenizer. Byte-level BPE goes in as `tokenizer.ggml.model = gpt2` with tokens, token types (special added
tokens are CONTROL, other added tokens USER_DEFINED, unused ids UNUSED), merges, bos/eos/pad ids, add_bos and
the chat template. `tokenizer.ggml.pre` must name the pre-tokenizer regex llama.cpp should use; it is read off
tokenizer.json's pre_tokenizer with the table the importer builds from (`gguf_tokenizer.PRE_TOKENIZERS`): a
plain ByteLevel (slmkit's, GPT-2's regex) is `gpt-2`, the Llama-3 and Qwen2 split regexes are `llama-bpe` and
`qwen2`, digits split one by one before GPT-2's regex (SmolLM) is `smollm`; anything else is refused rather
than guessed. A checkpoint imported from a GGUF file keeps that file's name (recorded in slmkit.json) when it
is an alias of the detected split (`llama3` for `llama-bpe`). The BPE model's `ignore_merges` must be what
llama.cpp does for that name (set for `llama-bpe` only). add_bos follows slmkit's `generate`, which prepends bos
whenever the model has a bos_token_id.

Not expressible in GGUF, and refused with what to do instead: Linformer attention, Transformer-XL memory,
low-rank factorized or slmkit-quantized modules, and per-layer sizes. Pruned `SparseLinear` projections are
dense Linears holding zeros, so they are written dense (same function, no size saving), with a note.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..model import CausalLM, ModelConfig
from ..model.config import read_json_object
from ..model.rope import rope_inverse_frequencies
from .gguf_tokenizer import (PRE_TOKENIZERS, SUPPORTED_SPLITS, pre_tokenizer_named,
                             pre_tokenizer_splits)
from .q6k import quantize_q6_k

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # pragma: no cover - the extra is documented in the error below
    gguf = None

TYPES = ("f32", "f16", "q8_0", "q4_0")
TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE with merges

# llama.cpp (llama-vocab.cpp) patches token attributes by `general.name`; these names break a byte-level vocab.
NAMES_LLAMA_CPP_SPECIAL_CASES = ("phi3", "phi-3")


class GGUFExportError(ValueError):
    """A checkpoint, option or tokenizer that cannot be written as a llama.cpp GGUF file as it is."""


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, llama.cpp architecture, requested type, each tensor's stored type
    (GGUF name -> ggml type name), and notes on every tensor stored otherwise than requested."""

    path: Path
    architecture: str
    file_type: str
    tensor_types: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def export_gguf(ckpt_dir: str | Path, out_path: str | Path, *, type: str = "f16") -> GGUFExport:
    """Write the slmkit checkpoint `ckpt_dir` as the GGUF file `out_path` with matrices stored as `type`
    (f32, f16, q8_0 or q4_0)."""
    _need_gguf()
    if type not in TYPES:
        raise GGUFExportError(f"--type {type!r} is not supported; choose one of {', '.join(TYPES)}")
    ckpt_dir, out = Path(ckpt_dir), Path(out_path)
    if out.is_dir():
        raise GGUFExportError(f"{out}: is a directory; give the path of the .gguf file to write")
    try:
        ckpt = load_checkpoint(ckpt_dir)
    except CheckpointError as e:
        raise GGUFExportError(f"cannot export {ckpt_dir}: {e}") from None
    model, config = ckpt.model, ckpt.config
    arch, notes = check_gguf_exportable(model, where=ckpt_dir, passes=ckpt.provenance.get("passes", []))
    vocab = read_vocab(ckpt_dir, config, imported_pre=imported_pre_name(ckpt.provenance))

    writer = gguf.GGUFWriter(None, arch)
    name = ckpt_dir.resolve().name
    if any(s in name.lower() for s in NAMES_LLAMA_CPP_SPECIAL_CASES):
        notes.append(f"general.name {name!r} not written: llama.cpp rewrites the special tokens of any model whose "
                     "name contains 'phi3' or 'phi-3' for Phi-3's SentencePiece vocabulary, and fails to load this one")
        name = None
    _add_hparams(writer, config, arch, type, name=name)
    _add_vocab(writer, vocab)
    tensor_types = {}
    for name, tensor in gguf_tensors(model, arch):
        data = tensor.detach().float().contiguous().numpy()
        qtype, note = tensor_type(name, data.shape, type, tied=config.tie_word_embeddings)
        if qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, data.astype(np.float32 if qtype == QT.F32 else np.float16))
        elif qtype == QT.Q6_K:
            writer.add_tensor(name, quantize_q6_k(data.reshape(-1, data.shape[-1])).reshape(*data.shape[:-1], -1),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        tensor_types[name] = qtype.name
        if note:
            notes.append(note)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return GGUFExport(out, arch, type, tensor_types, notes)


# -- what can be exported ---------------------------------------------------------------------------

def check_gguf_exportable(model: CausalLM, *, where: Path | str = "model",
                          passes: list[dict] | None = None) -> tuple[str, list[str]]:
    """The llama.cpp architecture (`llama` or `qwen2`) that holds `model`, and notes; GGUFExportError when
    none can."""
    c = model.config
    keep = "keep this model in slmkit format (`slm serve`, `slm generate`) instead"
    if c.attention_type != "full":
        raise GGUFExportError(f"{where}: attention_type={c.attention_type!r} (Linformer projections of keys and "
                              f"values) has no llama.cpp graph, so GGUF cannot express it; {keep}, or train a "
                              "model with full attention")
    if c.memory_length:
        raise GGUFExportError(f"{where}: memory_length={c.memory_length} (Transformer-XL segment memory) has no "
                              f"llama.cpp equivalent: llama.cpp would attend within its context only and compute "
                              f"another function; {keep}")
    if c.num_local_experts and c.mlp_bias:
        raise GGUFExportError(f"{where}: mixture-of-experts with mlp_bias=True: llama.cpp's expert tensors "
                              f"(ffn_*_exps) have no biases, so GGUF cannot express this model; {keep}")
    notes = _check_modules(model, where, passes or [])
    _check_shapes(model, where)
    qwen2 = (c.model_type == "qwen2" and not (c.attention_bias or c.mlp_bias) and not c.rope_scaling
             and not c.num_local_experts and c.num_attention_heads * c.head_dim == c.hidden_size)
    return ("qwen2" if qwen2 else "llama"), notes


def _check_modules(model: CausalLM, where: Path | str, passes: list[dict]) -> list[str]:
    from ..compress.sparse import SparseLinear

    dense = (nn.Linear, SparseLinear)
    linears = {"lm_head": model.lm_head} if not model.config.tie_word_embeddings else {}
    linears.update({n: m for n, m in model.named_modules() if n.endswith(("_proj", "mlp.gate"))})
    bad = [(n, m) for n, m in linears.items() if type(m) not in dense]
    if type(model.model.embed_tokens) is not nn.Embedding:
        bad.insert(0, ("model.embed_tokens", model.model.embed_tokens))
    if bad:
        name, module = bad[0]
        applied = ", ".join(p.get("name", "?") for p in passes) or "none recorded"
        raise GGUFExportError(
            f"{where}: {len(bad)} modules are not dense weights (e.g. {name}: {type(module).__name__}; compression "
            f"passes applied: {applied}). GGUF holds one dense or llama.cpp-quantized matrix per projection, so "
            "low-rank factors would have to be merged back (W = up @ down) and slmkit's int8/int4 formats cannot "
            "be stored. Export the checkpoint from before these passes — `--type q8_0` or `q4_0` quantizes for "
            "llama.cpp here — or keep this model in slmkit format (`slm serve`)")
    sparse = [n for n, m in linears.items() if type(m) is SparseLinear]
    if sparse:
        return [f"{len(sparse)} pruned projections (e.g. {sparse[0]}) are written dense: GGUF has no sparse "
                "storage, so their zeros take the same space as any weight"]
    return []


def _check_shapes(model: CausalLM, where: Path | str) -> None:
    """Every tensor has the shape config.json implies: llama.cpp reads one head count and one MLP width for
    all layers, so per-layer sizes (e.g. prune.width with uniform=False) cannot be written."""
    c = model.config
    q, kv, d, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    expected = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F), "mlp.gate": (c.num_local_experts, d)}
    tables = {"model.embed_tokens": model.model.embed_tokens.weight, "lm_head": model.lm_head.weight}
    for name, w in tables.items():
        if tuple(w.shape) != (c.vocab_size, d):
            raise GGUFExportError(f"{where}: {name}.weight has shape {tuple(w.shape)}, config.json implies "
                                  f"{(c.vocab_size, d)} (vocab_size, hidden_size)")
    if len(model.model.layers) != c.num_hidden_layers:
        raise GGUFExportError(f"{where}: {len(model.model.layers)} decoder layers, config.json says "
                              f"num_hidden_layers={c.num_hidden_layers}")
    for name, m in model.named_modules():
        suffix = next((s for s in expected if name.endswith(s)), None)
        if suffix is not None and tuple(m.weight.shape) != expected[suffix]:
            raise GGUFExportError(
                f"{where}: {name}.weight has shape {tuple(m.weight.shape)}, config.json implies {expected[suffix]}. "
                "llama.cpp's graph has one head count and one feed_forward_length for every layer, so per-layer "
                "sizes cannot be expressed in GGUF; prune with uniform=True, or keep this model in slmkit format")


# -- tensors ----------------------------------------------------------------------------------------

def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k weight (n_heads·hd, d) or bias (n_heads·hd,) from rotate-half order (j, j + hd/2 form a
    pair) to interleaved order (2j, 2j + 1 form a pair), within each head."""
    hd = w.shape[0] // n_heads
    # (n_heads, 2, hd/2, ...) -> (n_heads, hd/2, 2, ...): row (half a, index j) moves to 2j + a
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _name(tensor: "gguf.MODEL_TENSOR", suffix: str = "weight", bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix


def gguf_tensors(model: CausalLM, arch: str = "llama") -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's layout) for every tensor of the file, in llama.cpp's order."""
    T, c = gguf.MODEL_TENSOR, model.config
    yield _name(T.TOKEN_EMBD), model.model.embed_tokens.weight
    yield _name(T.OUTPUT_NORM), model.model.norm.weight
    if not c.tie_word_embeddings:
        yield _name(T.OUTPUT), model.lm_head.weight
    if c.rope_scaling:  # llama3: per-frequency divisors of θ
        yield _name(T.ROPE_FREQS), rope_inverse_frequencies(c.replace(rope_scaling=None)) / rope_inverse_frequencies(c)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    attn_names = {"q_proj": T.ATTN_Q, "k_proj": T.ATTN_K, "v_proj": T.ATTN_V, "o_proj": T.ATTN_OUT}
    mlp_names = {"gate_proj": T.FFN_GATE, "up_proj": T.FFN_UP, "down_proj": T.FFN_DOWN}
    expert_names = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}
    for i, layer in enumerate(model.model.layers):
        yield _name(T.ATTN_NORM, bid=i), layer.input_layernorm.weight
        for proj, kind in attn_names.items():
            linear = getattr(layer.self_attn, proj)
            for suffix, t in (("weight", linear.weight), ("bias", linear.bias)):
                if t is None:
                    continue
                if arch == "llama" and proj in heads:
                    t = permute_qk(t.detach(), heads[proj])
                yield _name(kind, suffix, i), t
        yield _name(T.FFN_NORM, bid=i), layer.post_attention_layernorm.weight
        if c.num_local_experts:
            yield _name(T.FFN_GATE_INP, bid=i), layer.mlp.gate.weight  # (E, d)
            for proj, kind in expert_names.items():  # (E, F, d) for gate/up, (E, d, F) for down
                yield _name(kind, bid=i), torch.stack([getattr(e, proj).weight.detach() for e in layer.mlp.experts])
        else:
            for proj, kind in mlp_names.items():
                linear = getattr(layer.mlp, proj)
                yield _name(kind, bid=i), linear.weight
                if linear.bias is not None:
                    yield _name(kind, "bias", i), linear.bias


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, *, tied: bool) -> tuple["QT", str | None]:
    """The ggml type a tensor is stored as in a file of `file_type` (f32, f16, q8_0, q4_0), and a note when
    it is not that type's matrix format."""
    target = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[file_type]
    if len(shape) < 2 or ".ffn_gate_inp." in name:  # norms, biases, rope_freqs, the MoE router
        return QT.F32, None
    note = None
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if target == QT.Q4_0 and is_output:  # as llama-quantize does: the output matrix at Q6_K
        if shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q6_K][0] == 0:
            return QT.Q6_K, None
        target = QT.Q8_0
        note = (f"{name}: rows of {shape[-1]} values are not a multiple of Q6_K's 256-value blocks; the output "
                "matrix is stored as Q8_0")
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        return QT.F16, (f"{name}: rows of {shape[-1]} values are not a multiple of the {target.name} block size "
                        f"({block}); stored as F16")
    return target, note


def _add_hparams(w: "gguf.GGUFWriter", c: ModelConfig, arch: str, type: str, name: str | None) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    if name:
        w.add_name(name)
    w.add_file_type(file_types[type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    if c.num_local_experts:
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)


# -- tokenizer --------------------------------------------------------------------------------------

@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp reads it: one token string and type per embedding row."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | list | None


def read_vocab(ckpt_dir: Path, config: ModelConfig, *, imported_pre: str | None = None) -> GGUFVocab:
    """Read tokenizer.json (+ tokenizer_config.json) of a checkpoint into llama.cpp's vocabulary layout;
    `imported_pre` is the pre-tokenizer name of the GGUF file the checkpoint was imported from, if any."""
    path = ckpt_dir / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{ckpt_dir}: no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF "
                              "file — copy the tokenizer of the dataset this model was trained on into the checkpoint")
    data = read_json_object(path, GGUFExportError)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: tokenizer model {model.get('type')!r}; only byte-level BPE (what slmkit "
                              "trains, and Llama 3 / Qwen2 use) is exported to GGUF here")
    if model.get("byte_fallback"):
        raise GGUFExportError(f"{path}: a SentencePiece-style BPE (byte_fallback, as in Llama 2, Mistral and "
                              "Phi-3) is llama.cpp's `llama` vocabulary type, which this exporter does not write; "
                              "run llama.cpp's convert_hf_to_gguf.py on the output of `slm export hf` instead")
    pre = pre_tokenizer_name(data, path, preferred=imported_pre)
    llama_cpp_ignores_merges = PRE_TOKENIZERS[pre].ignore_merges
    if bool(model.get("ignore_merges")) != llama_cpp_ignores_merges:
        raise GGUFExportError(
            f"{path}: model.ignore_merges={not llama_cpp_ignores_merges}, but llama.cpp's `{pre}` tokenizer runs with "
            f"ignore_merges={llama_cpp_ignores_merges} (whether a word found whole in the vocabulary is emitted "
            "without merging), so it would tokenize some words differently from this tokenizer. Keep this model in "
            "slmkit or Hugging Face format (`slm export hf`)")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = data.get("added_tokens") or []
    size = max([*vocab.values(), *(t["id"] for t in added)], default=-1) + 1
    if size > config.vocab_size:
        raise GGUFExportError(f"{path}: the tokenizer has ids up to {size - 1} but the model has vocab_size="
                              f"{config.vocab_size} embedding rows; the checkpoint's tokenizer does not belong to it")
    # Rows no token uses (the embedding table is often padded) are named like llama.cpp's converter does.
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * config.vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    tok_cfg_path = ckpt_dir / "tokenizer_config.json"
    tok_cfg = read_json_object(tok_cfg_path, GGUFExportError) if tok_cfg_path.exists() else {}
    ids = _special_ids(path, tok_cfg)
    bos = config.bos_token_id if config.bos_token_id is not None else ids["bos"]
    eos = config.eos_token_id if config.eos_token_id is not None else ids["eos"]
    pad = config.pad_token_id if config.pad_token_id is not None else ids["pad"]
    for role, i in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if i is not None and not 0 <= i < config.vocab_size:
            raise GGUFExportError(f"{ckpt_dir}/config.json: {role}={i} is outside the vocabulary "
                                  f"(0..{config.vocab_size - 1})")
    return GGUFVocab(tokens, types, merges, pre, bos, eos, pad, add_bos=config.bos_token_id is not None,
                     chat_template=tok_cfg.get("chat_template"))


def pre_tokenizer_name(tokenizer_json: dict[str, Any], where: Path | str = "tokenizer.json", *,
                       preferred: str | None = None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the pre-tokenizer (and normalizer) of a tokenizer.json;
    `preferred` wins among the names of the same split."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    name = pre_tokenizer_named(pre_tokenizer_splits(pre), preferred)
    if name is None:
        raise GGUFExportError(
            f"{where}: pre_tokenizer {json.dumps(pre)[:300]} is not one this exporter can name for llama.cpp. "
            f"Supported: {SUPPORTED_SPLITS}. A wrong name would make llama.cpp split text differently from the "
            "tokenizer the model was trained with")
    normalizer = tokenizer_json.get("normalizer")
    # llama.cpp does not normalise; Qwen2's NFC is accepted by llama.cpp's converter too (NFC text is unchanged).
    if normalizer and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        raise GGUFExportError(f"{where}: normalizer {json.dumps(normalizer)[:200]} is not applied by llama.cpp, "
                              "which would then tokenize differently; only tokenizers without a normalizer export")
    return name


def imported_pre_name(provenance: dict[str, Any]) -> str | None:
    """`tokenizer.ggml.pre` of the GGUF file a checkpoint was imported from (`slm import gguf` records it)."""
    names = [s.get("tokenizer_pre") for s in provenance.get("stages", [])
             if s.get("stage") == "import" and s.get("format") == "gguf"]
    return names[-1] if names else None


def _special_ids(path: Path, tok_cfg: dict[str, Any]) -> dict[str, int | None]:
    from ..data.tokenizer import load_tokenizer, special_token_ids

    return special_token_ids(load_tokenizer(path), tok_cfg)


def _add_vocab(w: "gguf.GGUFWriter", v: GGUFVocab) -> None:
    w.add_tokenizer_model(TOKENIZER_MODEL)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    w.add_token_merges(v.merges)
    if v.bos_id is not None:
        w.add_bos_token_id(v.bos_id)
    if v.eos_id is not None:
        w.add_eos_token_id(v.eos_id)
    if v.pad_id is not None:
        w.add_pad_token_id(v.pad_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def _need_gguf() -> None:
    if gguf is None:
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install 'slmkit[gguf]'")
