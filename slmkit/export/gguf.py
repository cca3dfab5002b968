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

Types. `f32`/`f16` store every float matrix in that type; `q8_0`/`q4_0` quantize float matrices in blocks of 32
along a row with `gguf.quants` (bit-identical to ggml's reference quantizers). As in llama.cpp: vectors (norms,
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

Compressed checkpoints ship as they were measured:
- slmkit-quantized modules (`Int8Linear`, `Int4Linear`, a tied `QuantizedEmbedding` as token_embd) are written
  from the codes they hold, as Q8_0 / Q4_0 / Q4_1 blocks (`gguf_blocks.py`), never re-quantized: int8 and int4
  with `format=q4_0|q4_1` are exact (every weight llama.cpp dequantizes equals slmkit's fp32 dequantized weight);
  int4 `format=minmax` (fp32 scales) and older checkpoints are converted with fp16-rounded parameters, and the
  largest weight difference is measured and reported in the notes. A layer whose rows or groups are not whole
  32-blocks is written as its dequantized weights (F32 by default: exact). `type` then only says how the
  matrices that are still float are stored; its default, `auto`, keeps them in the checkpoint's precision (F32
  for fp32 and bf16, F16 for fp16: exact) and norms stay F32. `f16` halves those (relative rounding 2^-11),
  `q8_0`/`q4_0` quantize them with ggml's quantizers. For an unquantized checkpoint `auto` is `f16`, as before.
- low-rank factors (`LowRankLinear`) are merged back into one dense matrix, W = up · down (in float64, rounded
  once), stored like any float matrix: the same function, without the size saving;
- pruned `SparseLinear` projections are dense Linears holding zeros, written dense (zeros stay zeros: also as
  quantized codes), with a note;
- vocabulary-trimmed checkpoints (`prune.vocab`) are ordinary models with a smaller vocabulary.
Not expressible in GGUF, and refused before anything is written, with what to do instead: Linformer attention,
Transformer-XL memory, per-layer sizes, and module types GGUF has no form for (the refusal names the pass
that made them). The file is written under a temporary name in the same directory and renamed when complete.
"""

from __future__ import annotations

import functools
import json
import math
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
from ..compress.qlinear import QUANTIZED_LINEARS, QuantizedEmbedding
from .gguf_blocks import Encoded, HeldWeight, encode
from .q6k import quantize_q6_k

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # pragma: no cover - the extra is documented in the error below
    gguf = None

TYPES = ("auto", "f32", "f16", "q8_0", "q4_0")  # how float matrices are stored; quantized ones keep their codes
HELD_LINEARS = QUANTIZED_LINEARS  # Int8Linear, Int4Linear: written from their codes
HELD_TYPES = (*QUANTIZED_LINEARS, QuantizedEmbedding)
TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE with merges

# llama.cpp (llama-vocab.cpp) patches token attributes by `general.name`; these names break a byte-level vocab.
NAMES_LLAMA_CPP_SPECIAL_CASES = ("phi3", "phi-3")


class GGUFExportError(ValueError):
    """A checkpoint, option or tokenizer that cannot be written as a llama.cpp GGUF file as it is."""


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, llama.cpp architecture, its file type (the requested float type, or for
    a quantized checkpoint the ggml type that holds most of its quantized weights), each tensor's stored type
    (GGUF name -> ggml type name), notes on every tensor stored otherwise than requested, the tensors written
    from the checkpoint's quantized codes, and for those that GGUF could not hold exactly the largest weight
    difference measured (GGUF name -> max |w_gguf − w_slmkit|; empty when the export is exact)."""

    path: Path
    architecture: str
    file_type: str
    tensor_types: dict[str, str]
    notes: list[str] = field(default_factory=list)
    held_tensors: list[str] = field(default_factory=list)
    weight_errors: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def export_gguf(ckpt_dir: str | Path, out_path: str | Path, *, type: str = "auto") -> GGUFExport:
    """Write the slmkit checkpoint `ckpt_dir` as the GGUF file `out_path`. Quantized modules keep the codes they
    hold; `type` (auto, f32, f16, q8_0 or q4_0) says how float matrices are stored (see the module docstring)."""
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
    quantized = any(isinstance(m, HELD_TYPES) for m in model.modules())
    float_type = _float_type(model, type, quantized)

    writer = gguf.GGUFWriter(None, arch)
    name = ckpt_dir.resolve().name
    if any(s in name.lower() for s in NAMES_LLAMA_CPP_SPECIAL_CASES):
        notes.append(f"general.name {name!r} not written: llama.cpp rewrites the special tokens of any model whose "
                     "name contains 'phi3' or 'phi-3' for Phi-3's SentencePiece vocabulary, and fails to load this one")
        name = None
    tensors = _Tensors(writer, float_type, tied=config.tie_word_embeddings)
    for tensor_name, value in gguf_tensors(model, arch):
        tensors.add(tensor_name, value)
    notes += tensors.notes()
    file_type = tensors.file_type() if quantized else float_type
    _add_hparams(writer, config, arch, file_type, name=name)
    _add_vocab(writer, vocab)

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
    return GGUFExport(out, arch, file_type, tensors.types, notes, tensors.held, tensors.errors)


def _float_type(model: CausalLM, type: str, quantized: bool) -> str:
    """The storage of float matrices: `type`, or for `auto` f16 (an unquantized checkpoint, as llama.cpp's own
    converter does) or the checkpoint's precision (a quantized one: it ships the numbers it was measured with)."""
    if type != "auto":
        return type
    if not quantized:
        return "f16"
    return "f16" if model.model.norm.weight.dtype == torch.float16 else "f32"


class _Tensors:
    """Adds tensors to the writer: float ones in the type `tensor_type` gives, held quantized ones as their blocks
    (`gguf_blocks.encode`); keeps each tensor's type, what was written from held codes, and measured errors."""

    def __init__(self, writer: "gguf.GGUFWriter", float_type: str, *, tied: bool):
        self.writer, self.float_type, self.tied = writer, float_type, tied
        self.types: dict[str, str] = {}
        self.held: list[str] = []
        self.errors: dict[str, float] = {}
        self._notes: list[str] = []
        self._inexact: list[tuple[str, str, Encoded]] = []  # (name, pass, encoded) converted with an error
        self._unblocked: list[tuple[str, str, tuple]] = []  # (name, stored type, shape) held but not blockable
        self._counts: dict[str, int] = {}  # ggml type -> weights held in it

    def add(self, name: str, value: torch.Tensor | HeldWeight) -> None:
        if isinstance(value, HeldWeight):
            enc = encode(value)
            self.held.append(name)
            if enc.qtype is not None:
                qtype = QT[enc.qtype]
                self.writer.add_tensor(name, enc.data.numpy(), raw_dtype=qtype)
                self.types[name] = qtype.name
                self._counts[qtype.name] = self._counts.get(qtype.name, 0) + math.prod(value.shape)
                if not enc.exact:
                    self.errors[name] = enc.max_error
                    self._inexact.append((name, value.quantized_by, enc))
                return
            value = enc.data  # no block layout: the dequantized fp32 weights, stored as a float matrix
            self._unblocked.append((name, value.shape))
        data = value.detach().float().contiguous().numpy()
        qtype, note = tensor_type(name, data.shape, self.float_type, tied=self.tied)
        if qtype in (QT.F32, QT.F16):
            self.writer.add_tensor(name, data.astype(np.float32 if qtype == QT.F32 else np.float16))
        elif qtype == QT.Q6_K:
            self.writer.add_tensor(name, quantize_q6_k(data.reshape(-1, data.shape[-1])).reshape(
                *data.shape[:-1], -1), raw_dtype=qtype)
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        self.types[name] = qtype.name
        if note:
            self._notes.append(note)

    def file_type(self) -> str:
        """The ggml type holding most of the held quantized weights, as a `TYPES`-style name (q8_0, q4_1, ...)."""
        if not self._counts:
            return self.float_type
        return max(self._counts, key=self._counts.get).lower()

    def notes(self) -> list[str]:
        notes = list(self._notes)
        if self._unblocked:
            name, shape = self._unblocked[0]
            notes.append(f"{len(self._unblocked)} quantized matrices (e.g. {name}, {tuple(shape)}) have rows or groups "
                         "that are not whole 32-weight GGUF blocks; written as their dequantized weights in "
                         f"{self.types[name]}" + (" (exact)" if self.types[name] == "F32" else ""))
        if self._inexact:
            worst_name, _, worst = max(self._inexact, key=lambda t: t[2].max_error / max(t[2].max_abs, 1e-30))
            passes = sorted({p for _, p, _ in self._inexact})
            types = sorted({e.qtype for _, _, e in self._inexact})
            notes.append(
                f"{len(self._inexact)} quantized matrices hold parameters GGUF cannot store exactly (scales that are "
                f"not fp16 values; passes: {', '.join(passes)}): converted to {'/'.join(types)} with fp16-rounded "
                f"parameters, codes kept; largest weight difference {worst.max_error:.3g} ({worst_name}, "
                f"{worst.max_error / max(worst.max_abs, 1e-30):.2%} of its largest weight). For an exact file, "
                "quantize with quant.int4/quant.gptq format=q4_0 or q4_1 (int8 scales are fp16 values already)")
        return notes


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
    _check_shapes(model, where, passes)
    qwen2 = (c.model_type == "qwen2" and not (c.attention_bias or c.mlp_bias) and not c.rope_scaling
             and not c.num_local_experts and c.num_attention_heads * c.head_dim == c.hidden_size)
    return ("qwen2" if qwen2 else "llama"), notes


def _check_modules(model: CausalLM, where: Path | str, passes: list[dict]) -> list[str]:
    """Every projection, embedding and output module is one GGUF can hold (dense, pruned, low-rank, or quantized
    by slmkit); notes on those written otherwise than they are held."""
    from ..compress.lowrank import LowRankLinear
    from ..compress.sparse import SparseLinear

    dense = (nn.Linear, SparseLinear)
    linears = {"lm_head": model.lm_head} if not model.config.tie_word_embeddings else {}
    linears.update({n: m for n, m in model.named_modules() if n.endswith(("_proj", "mlp.gate"))})
    bad = [(n, m) for n, m in linears.items() if type(m) not in (*dense, *HELD_LINEARS, LowRankLinear)]
    bad += [(f"{n}.{part}", getattr(m, part)) for n, m in linears.items() if type(m) is LowRankLinear
            for part in ("down", "up") if type(getattr(m, part)) is not nn.Linear]
    embed = model.model.embed_tokens
    if type(embed) not in (nn.Embedding, QuantizedEmbedding):
        bad.insert(0, ("model.embed_tokens", embed))
    if model.config.tie_word_embeddings and isinstance(embed, QuantizedEmbedding) and \
            getattr(model.lm_head, "embedding", None) is not embed:
        bad.append(("lm_head", model.lm_head))
    if bad:
        name, module = bad[0]
        made_by = _passes_touching(name, passes)
        raise GGUFExportError(
            f"{where}: {len(bad)} modules have no GGUF form (e.g. {name}: {type(module).__name__}, made by "
            f"{made_by}). GGUF holds one dense or llama.cpp-quantized matrix per projection; export the checkpoint "
            "from before that pass, or keep this model in slmkit format (`slm serve`)")
    notes = []
    sparse = [n for n, m in linears.items() if type(m) is SparseLinear]
    if sparse:
        notes.append(f"{len(sparse)} pruned projections (e.g. {sparse[0]}) are written dense: GGUF has no sparse "
                     "storage, so their zeros take the same space as any weight")
    low_rank = [n for n, m in linears.items() if type(m) is LowRankLinear]
    if low_rank:
        notes.append(f"{len(low_rank)} low-rank projections (e.g. {low_rank[0]}) are merged into dense matrices "
                     "(W = up · down, in float64): the same function, but GGUF has no factored form, so they take "
                     "the dense size")
    return notes


def _passes_touching(module: str, passes: list[dict]) -> str:
    """The recorded passes whose report lists `module` (or, when none does, every pass applied)."""
    def listed(p: dict) -> bool:
        report = p.get("report") if isinstance(p.get("report"), dict) else p
        return any(module == m or module.startswith(m + ".") for m in report.get("modules", []) or [])

    named = [p.get("name", "?") for p in passes if listed(p)]
    if named:
        return "pass " + ", ".join(named)
    applied = ", ".join(p.get("name", "?") for p in passes)
    return f"one of the passes applied ({applied})" if applied else "no recorded pass"


def _matrix_shape(m: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the matrix a module holds, whatever form it holds it in."""
    if isinstance(m, nn.Embedding):
        return tuple(m.weight.shape)
    if isinstance(m, QuantizedEmbedding):
        return m.num_embeddings, m.embedding_dim
    if isinstance(m, nn.Linear):
        return tuple(m.weight.shape)
    return m.out_features, m.in_features


def _check_shapes(model: CausalLM, where: Path | str, passes: list[dict] | None = None) -> None:
    """Every tensor has the shape config.json implies: llama.cpp reads one head count and one MLP width for
    all layers, so per-layer sizes (e.g. prune.width with uniform=False) cannot be written."""
    c = model.config
    q, kv, d, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    expected = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F), "mlp.gate": (c.num_local_experts, d)}
    tables = {"model.embed_tokens": model.model.embed_tokens, "lm_head": model.lm_head}
    for name, m in tables.items():
        if _matrix_shape(m) != (c.vocab_size, d):
            raise GGUFExportError(f"{where}: {name}.weight has shape {_matrix_shape(m)}, config.json implies "
                                  f"{(c.vocab_size, d)} (vocab_size, hidden_size)")
    if len(model.model.layers) != c.num_hidden_layers:
        raise GGUFExportError(f"{where}: {len(model.model.layers)} decoder layers, config.json says "
                              f"num_hidden_layers={c.num_hidden_layers}")
    for name, m in model.named_modules():
        suffix = next((s for s in expected if name.endswith(s)), None)
        if suffix is not None and _matrix_shape(m) != expected[suffix]:
            applied = ", ".join(p.get("name", "?") for p in passes or []) or "none recorded"
            raise GGUFExportError(
                f"{where}: {name}.weight has shape {_matrix_shape(m)}, config.json implies {expected[suffix]} "
                f"(passes applied: {applied}). llama.cpp's graph has one head count and one feed_forward_length for "
                "every layer, so per-layer sizes cannot be expressed in GGUF; prune with uniform=True, or keep this "
                "model in slmkit format")


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


def gguf_tensors(model: CausalLM, arch: str = "llama") -> Iterator[tuple[str, torch.Tensor | HeldWeight]]:
    """(GGUF name, tensor in llama.cpp's layout) for every tensor of the file, in llama.cpp's order. A matrix held
    quantized comes as a `HeldWeight` (its codes go into the file; its rows are permuted as the tensor's would be);
    low-rank factors come merged."""
    T, c = gguf.MODEL_TENSOR, model.config
    yield _name(T.TOKEN_EMBD), _matrix(model.model.embed_tokens)
    yield _name(T.OUTPUT_NORM), model.model.norm.weight
    if not c.tie_word_embeddings:
        yield _name(T.OUTPUT), _matrix(model.lm_head)
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
            rows = None
            if arch == "llama" and proj in heads:
                rows = functools.partial(permute_qk, n_heads=heads[proj])
            yield _name(kind, "weight", i), _matrix(linear, rows)
            bias = _bias(linear)
            if bias is not None:
                yield _name(kind, "bias", i), bias if rows is None else rows(bias.detach())
        yield _name(T.FFN_NORM, bid=i), layer.post_attention_layernorm.weight
        if c.num_local_experts:
            yield _name(T.FFN_GATE_INP, bid=i), _matrix(layer.mlp.gate)  # (E, d)
            for proj, kind in expert_names.items():  # (E, F, d) for gate/up, (E, d, F) for down
                experts = [getattr(e, proj) for e in layer.mlp.experts]
                if all(isinstance(e, HELD_LINEARS) for e in experts):
                    yield _name(kind, bid=i), HeldWeight(experts, stacked=True)
                else:
                    yield _name(kind, bid=i), torch.stack([_dense(e) for e in experts])
        else:
            for proj, kind in mlp_names.items():
                linear = getattr(layer.mlp, proj)
                yield _name(kind, bid=i), _matrix(linear)
                if _bias(linear) is not None:
                    yield _name(kind, "bias", i), _bias(linear)


def _matrix(m: nn.Module, rows=None) -> torch.Tensor | HeldWeight:
    """The weight matrix of a projection or embedding module: held codes for quantized modules, else floats;
    `rows` permutes its rows (Q/K)."""
    if isinstance(m, HELD_TYPES):
        return HeldWeight([m], rows=rows)
    w = _dense(m)
    return w if rows is None else rows(w)


def _dense(m: nn.Module) -> torch.Tensor:
    """A float module's (out, in) weight; low-rank factors merged, W = up · down (float64, rounded once)."""
    from ..compress.lowrank import LowRankLinear

    if isinstance(m, LowRankLinear):
        w = m.up.weight.detach().double() @ m.down.weight.detach().double()  # (out, r) @ (r, in)
        return w.to(m.up.weight.dtype)
    if isinstance(m, HELD_TYPES):
        return m.dequantize(torch.float32)
    return m.weight.detach()


def _bias(m: nn.Module) -> torch.Tensor | None:
    from ..compress.lowrank import LowRankLinear

    return m.up.bias if isinstance(m, LowRankLinear) else getattr(m, "bias", None)


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
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                  "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
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
