"""prune.vocab: trim the vocabulary to the tokens one domain uses.

A small model's output matrix (and, tied, its embedding) is often its largest tensor: SmolLM2-135M spends
28.3M of its 134.5M parameters on 49,152 rows, and every decode step multiplies by all of them, while a
single domain's text uses a fraction of the tokens. This pass keeps

    every token the dataset's training split uses at least `min_count` times
    + the 256 byte-level base tokens (so any text still encodes)
    + every added/special token and the model's bos/eos/pad ids
    + `keep` (extra tokens, spelled as in tokenizer.json)

and then closes the set under BPE merges: for every merge `a b -> ab` whose result is kept, `a` and `b`
are kept (recursively). Merges whose result is removed are dropped. Why this is exact on the training
text: byte-level BPE encodes a word by repeatedly applying the lowest-ranked merge present; every merge
used on a training word produces an ancestor of a kept token, so it survives, and removing other merges
cannot change which surviving merge is lowest at any step. So the trimmed tokenizer splits every training
word exactly as before (ids mapped), never produces a removed token (it is not in its vocabulary), and
still encodes any text losslessly (all 256 byte tokens stay; words it cannot merge fully fall back to
shorter kept pieces).

Kept ids are renumbered compactly in their original order. The embedding rows, the output rows (tied
stays tied), `config.vocab_size`, bos/eos/pad ids, tokenizer.json (vocab, merges, added tokens,
post-processor and padding ids) and tokenizer_config.json (`added_tokens_decoder`) all follow. Logits of
the trimmed model are the original model's logits at the kept ids.

The pass's "calibration" is the dataset itself (the token counts of its training split, and its
tokenizer.json, which `slm compress` has checked is byte-identical to the checkpoint's). The pass changes
only the model; its report records which ids were kept (a bitmap, `kept`), and everything that must follow
the vocabulary — the tokenizer files written into the output checkpoint, the held-out ids `slm compress`
scores after the pass, calibration batches of later passes, datasets and teacher-logit caches made with the
original tokenizer — is derived from that record: the first three here, datasets and caches in
`vocab_remap.py`.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Calibration, PassError, count_parameters, register_pass, state_bytes

PASS = "prune.vocab"


@dataclass(frozen=True)
class VocabConfig:
    min_count: int = 1  # a token the split uses fewer times is removed (unless something else keeps it)
    keep: tuple[str, ...] = ()  # extra tokens to keep, spelled as in tokenizer.json (e.g. "Ġyield")
    split: str = "train"  # the dataset split whose token counts decide

    def __post_init__(self):
        if not isinstance(self.min_count, int) or self.min_count < 1:
            raise PassError(f"{PASS}: min_count={self.min_count!r} must be an integer >= 1")
        if not self.split:
            raise PassError(f"{PASS}: split must name a dataset split, e.g. train")


# -- the kept set ---------------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs; tokenizer.json writes them as "a b" strings or [a, b] lists."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges") or []]


def _has_byte_level(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))


def check_byte_level_bpe(tj: dict, where: Path | str) -> None:
    """Trimming is exact for byte-level BPE only: elsewhere a removed token may be the only way to spell
    some text (SentencePiece's byte_fallback pieces, WordPiece's unknown words)."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _has_byte_level(tj.get("pre_tokenizer")):
        raise PassError(f"{PASS}: {where} is not a byte-level BPE tokenizer (model {model.get('type')!r}, "
                        f"byte_fallback={bool(model.get('byte_fallback'))}); vocabulary trimming supports byte-level "
                        "BPE (GPT-2, Llama 3, Qwen2, SmolLM and slmkit's own tokenizers)")


def tokenizer_size(tj: dict) -> int:
    ids = [*tj["model"]["vocab"].values(), *(t["id"] for t in tj.get("added_tokens") or [])]
    return max(ids, default=-1) + 1


def token_counts(stream, size: int, *, block: int = 1 << 24) -> np.ndarray:
    """int64 (size,): how often each id occurs in a token stream (read in blocks: shards are memory-mapped)."""
    counts = np.zeros(size, dtype=np.int64)
    n = len(stream)
    for start in range(0, n, block):
        ids = stream.window(start, min(block, n - start))
        if ids.size and int(ids.max()) >= size:
            raise PassError(f"{PASS}: the dataset has token id {int(ids.max())} but its tokenizer only {size} ids")
        counts += np.bincount(ids, minlength=size)
    return counts


def kept_token_mask(tj: dict, counts: np.ndarray, *, min_count: int = 1, keep: tuple[str, ...] = (),
                    keep_ids: tuple[int, ...] = ()) -> tuple[np.ndarray, dict]:
    """Bool (tokenizer size,) of the ids to keep, closed under merges, and how many each rule kept."""
    vocab: dict[str, int] = tj["model"]["vocab"]
    size = tokenizer_size(tj)
    mask = np.zeros(size, dtype=bool)
    mask[:len(counts)] |= counts[:size] >= min_count
    used = int(mask.sum())
    for ch in _byte_alphabet():
        if ch in vocab:
            mask[vocab[ch]] = True
    for t in tj.get("added_tokens") or []:
        mask[t["id"]] = True
    for i in keep_ids:
        if i is not None and 0 <= i < size:
            mask[i] = True
    missing = [t for t in keep if t not in vocab]
    if missing:
        raise PassError(f"{PASS}: keep names tokens the tokenizer does not have: {missing[:5]} (spell them as in "
                        "tokenizer.json's model.vocab, e.g. 'Ġdef' for ' def')")
    for t in keep:
        mask[vocab[t]] = True
    before_closure = int(mask.sum())
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merge_pairs(tj["model"]):
        producers.setdefault(a + b, []).append((a, b))
    id_to_token = {i: t for t, i in vocab.items()}
    stack = [id_to_token[i] for i in np.flatnonzero(mask) if i in id_to_token]
    while stack:  # parents of every merge producing a kept token, recursively
        for pair in producers.get(stack.pop(), ()):
            for parent in pair:
                j = vocab[parent]
                if not mask[j]:
                    mask[j] = True
                    stack.append(parent)
    return mask, {"used": used, "base_special_keep": before_closure - used,
                  "merge_parents": int(mask.sum()) - before_closure}


# -- the kept set as a record ---------------------------------------------------------------------------

def encode_mask(mask: np.ndarray) -> str:
    """A kept-id bitmap as base64 (49,152 ids -> 8 KB of JSON)."""
    return base64.b64encode(np.packbits(mask.astype(bool), bitorder="little").tobytes()).decode()


def decode_mask(text: str, size: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), bitorder="little")
    return bits[:size].astype(bool)


def kept_ids_of(report: dict) -> np.ndarray | None:
    """Original ids kept by a vocabulary pass (ascending; new id = position), or None for any other pass."""
    vocab = report.get("vocab") if isinstance(report, dict) else None
    if not isinstance(vocab, dict) or "kept" not in vocab:
        return None
    return np.flatnonzero(decode_mask(vocab["kept"], int(vocab["before"])))


def old_to_new_ids(kept: np.ndarray, size: int) -> np.ndarray:
    """int64 (size,): the new id of each original id, -1 where removed."""
    table = np.full(size, -1, dtype=np.int64)
    table[kept] = np.arange(len(kept))
    return table


# -- the tokenizer files --------------------------------------------------------------------------------

def _remap_post_processor(node: Any, new_id: dict[int, int]) -> Any:
    """Ids inside post-processors: TemplateProcessing's special_tokens, Bert/Roberta's [token, id] pairs."""
    if isinstance(node, list):
        return [_remap_post_processor(n, new_id) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = [new_id[v] for v in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            out[key] = [value[0], new_id[value[1]]]
        else:
            out[key] = _remap_post_processor(value, new_id)
    return out


def trim_tokenizer_json(tj: dict, kept: np.ndarray) -> dict:
    """tokenizer.json with only the kept ids, renumbered compactly; merges whose result is removed dropped."""
    new_id = {int(old): new for new, old in enumerate(kept)}
    tj = copy.deepcopy(tj)
    model = tj["model"]
    vocab = {t: new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
    merges = []
    for m, (a, b) in zip(model.get("merges") or [], _merge_pairs(model)):
        if a + b in vocab:
            if a not in vocab or b not in vocab:  # closure guarantees this; a broken file would not load
                raise PassError(f"{PASS}: merge {a!r} {b!r} keeps its result but not its parents")
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    for t in tj.get("added_tokens") or []:
        t["id"] = new_id[t["id"]]
    if tj.get("post_processor"):
        tj["post_processor"] = _remap_post_processor(tj["post_processor"], new_id)
    if isinstance(tj.get("padding"), dict) and "pad_id" in tj["padding"]:
        tj["padding"]["pad_id"] = new_id.get(tj["padding"]["pad_id"], 0)
    return tj


def trim_tokenizer_config(cfg: dict, kept: np.ndarray) -> dict:
    """tokenizer_config.json: transformers keys `added_tokens_decoder` by id; token names stay as they are."""
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get("added_tokens_decoder"), dict):
        new_id = {int(old): new for new, old in enumerate(kept)}
        cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                       if int(k) in new_id}
    return cfg


def write_trimmed_tokenizer(src: str | Path, kept: np.ndarray, out: str | Path) -> Path:
    """Write the trimmed tokenizer.json (+ tokenizer_config.json) of the tokenizer in `src` into `out`."""
    from tokenizers import Tokenizer

    from ..checkpoint import atomic_write_text

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    # Compact (tokenizers' `save(pretty=False)`): it ships with the model, and indentation is 57% of a
    # SmolLM2-sized vocabulary's file.
    text = json.dumps(trim_tokenizer_json(tj, kept), ensure_ascii=False, separators=(",", ":"))
    Tokenizer.from_str(text)  # refuse to write a file the tokenizers library cannot load
    atomic_write_text(out / "tokenizer.json", text + "\n")
    if (src / "tokenizer_config.json").exists():
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        atomic_write_text(out / "tokenizer_config.json",
                          json.dumps(trim_tokenizer_config(cfg, kept), ensure_ascii=False, indent=2) + "\n")
    return out


# -- the model ------------------------------------------------------------------------------------------

def _check_plain_vocab_modules(model: nn.Module) -> None:
    emb, head = model.model.embed_tokens, model.lm_head
    if type(emb) is not nn.Embedding or type(head) is not nn.Linear:
        raise PassError(f"{PASS}: the embedding ({type(emb).__name__}) and output layer ({type(head).__name__}) "
                        "must be plain; put prune.vocab before quantization or low-rank passes")


def trim_model_vocab_(model: nn.Module, kept: torch.Tensor) -> nn.Module:
    """Keep embedding and output rows `kept` (ascending original ids), in place; ties stay tied."""
    _check_plain_vocab_modules(model)
    emb, head = model.model.embed_tokens, model.lm_head
    kept = kept.to(emb.weight.device)
    weight = emb.weight.detach()[kept].clone()  # (V', d)
    model.model.embed_tokens = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight, _freeze=False)
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None, device="meta")
    else:
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None,
                                  device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            model.lm_head.weight.copy_(head.weight[kept])
    if head.bias is not None:
        model.lm_head.bias = nn.Parameter(head.bias.detach()[kept].clone())
    old_to_new = {int(o): n for n, o in enumerate(kept.tolist())}
    ids = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.config = model.config.replace(vocab_size=int(weight.shape[0]),
                                        **{k: old_to_new.get(v) if v is not None else None for k, v in ids.items()})
    model.tie_weights()
    return model


# -- the pass -------------------------------------------------------------------------------------------

def _dataset_of(calib):
    """The dataset behind the calibration: `slm compress` passes a Calibration drawn from it; the Python API
    may pass the dataset (or its directory) directly."""
    from ..data import open_dataset
    from ..data.shards import Dataset

    if isinstance(calib, Dataset):
        return calib
    if isinstance(calib, Calibration):
        if not calib.source:
            raise PassError(f"{PASS}: the calibration set does not name the dataset it came from")
        return open_dataset(calib.source)
    if isinstance(calib, (str, Path)):
        return open_dataset(calib)
    raise PassError(f"{PASS} needs the dataset whose training split defines the domain: pass --data DATASET")


def apply_vocab(model: nn.Module, cfg: VocabConfig, calib=None) -> tuple[nn.Module, dict]:
    """Trim the vocabulary to the tokens the domain's training split uses (closed under BPE merges)."""
    ds = _dataset_of(calib)
    tj = json.loads(ds.tokenizer_path.read_text(encoding="utf-8"))
    check_byte_level_bpe(tj, ds.tokenizer_path)
    _check_plain_vocab_modules(model)
    size, V = tokenizer_size(tj), model.config.vocab_size
    if size > V:
        raise PassError(f"{PASS}: {ds.tokenizer_path} has {size} ids but the model {V} rows; the model's vocabulary "
                        "was already trimmed or belongs to another tokenizer — trim once, with the dataset the "
                        "model's tokenizer made")
    counts = token_counts(ds.split(cfg.split), size)
    c = model.config
    mask, kept_by = kept_token_mask(tj, counts, min_count=cfg.min_count, keep=cfg.keep,
                                    keep_ids=(c.bos_token_id, c.eos_token_id, c.pad_token_id))
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        i = getattr(c, role)
        if i is not None and not (0 <= i < size):
            raise PassError(f"{PASS}: config {role}={i} is not an id of the tokenizer ({size} ids)")
    mask = np.concatenate([mask, np.zeros(V - size, dtype=bool)])  # rows past the tokenizer (padding) go
    kept = np.flatnonzero(mask)
    params_before, bytes_before = count_parameters(model)[0], state_bytes(model)
    trim_model_vocab_(model, torch.from_numpy(kept))
    return model, {
        "vocab": {"before": V, "after": int(len(kept)), "kept": encode_mask(mask), "tokenizer_size": size,
                  "kept_by": kept_by, "split": cfg.split, "split_tokens": int(counts.sum()),
                  "dataset": str(ds.path)},
        "parameters_before": params_before, "parameters_after": count_parameters(model)[0],
        "bytes_before": bytes_before, "bytes_after": state_bytes(model),
        "modules": ["model.embed_tokens", "lm_head"],
    }


def restructure_vocab(model: nn.Module, cfg: VocabConfig, record: dict) -> nn.Module:
    """A fresh (meta) model gets the trimmed row count. config.json already records it, so this only acts on
    a model built from a config that predates the pass."""
    n = int(record["vocab"]["after"])
    emb = model.model.embed_tokens
    if type(emb) is nn.Embedding and emb.num_embeddings != n:
        d = emb.embedding_dim
        model.model.embed_tokens = nn.Embedding(n, d, device=emb.weight.device, dtype=emb.weight.dtype)
        model.lm_head = nn.Linear(d, n, bias=model.lm_head.bias is not None, device=emb.weight.device,
                                  dtype=emb.weight.dtype)
        model.config = model.config.replace(vocab_size=n)
        model.tie_weights()
    return model


register_pass(PASS, VocabConfig, needs_calibration=True, restructure=restructure_vocab)(apply_vocab)


# -- ids made with the original tokenizer ---------------------------------------------------------------

class ArrayStream:
    """An in-memory token stream (len() and window()), the TokenStream protocol."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.ids[start:start + length]


def remap_ids(ids: np.ndarray, kept: np.ndarray, old_tok, new_tok) -> np.ndarray:
    """Ids of the original tokenizer -> ids of the trimmed one. Runs of ordinary tokens that use a removed
    token (text outside the training split) are decoded and re-encoded with the trimmed tokenizer, so the
    result is what the trimmed tokenizer makes of the same text; everything else maps id for id."""
    ids = np.asarray(ids, dtype=np.int64)
    table = old_to_new_ids(kept, max(int(ids.max(initial=0)) + 1, int(kept.max()) + 1))
    mapped = table[ids]
    if (mapped >= 0).all():
        return mapped
    special = np.zeros(len(table), dtype=bool)
    special[[i for i in old_tok.get_added_tokens_decoder() if i < len(table)]] = True
    edges = np.flatnonzero(special[ids])  # document boundaries (bos/eos) split the stream into runs
    starts, stops = np.concatenate([[0], edges + 1]), np.concatenate([edges, [len(ids)]])
    pieces, previous = [], old_tok.encode_special_tokens
    new_tok.encode_special_tokens = True  # special-token text inside a document stays text (encode_documents)
    try:
        for a, b in zip(starts, stops):
            if a < b and (mapped[a:b] < 0).any():
                text = old_tok.decode(ids[a:b].tolist(), skip_special_tokens=False)
                pieces.append(np.asarray(new_tok.encode(text, add_special_tokens=False).ids, dtype=np.int64))
            else:
                pieces.append(mapped[a:b])
            if b < len(ids):
                pieces.append(mapped[b:b + 1])  # the special token itself
    finally:
        new_tok.encode_special_tokens = previous
    return np.concatenate(pieces)


def remap_calibration(calib: Calibration | None, kept: np.ndarray) -> Calibration | None:
    """Calibration windows for passes after this one. Windows from the training split map exactly when every
    token they hold is kept (always with min_count=1); windows holding a removed token are dropped."""
    if calib is None:
        return None
    table = old_to_new_ids(kept, max(int(calib.input_ids.max()) + 1, int(kept.max()) + 1))
    mapped = torch.from_numpy(table[calib.input_ids.numpy()])
    whole = (mapped >= 0).all(dim=1)
    if not bool(whole.any()):
        raise PassError(f"{PASS}: every calibration window holds a removed token; lower min_count")
    return Calibration(mapped[whole], None, calib.source,
                       {**calib.meta, "vocab_trimmed": True, "windows_dropped": int((~whole).sum())})


def follow_vocab_trim(kept: np.ndarray, tokenizer_dir: str | Path, scratch: str | Path, *, val=None,
                      lengths: np.ndarray | None = None, calib: Calibration | None = None):
    """What `slm compress` needs after a vocabulary pass: the directory of the trimmed tokenizer files (written
    into `scratch`; the checkpoint copies them from there), the held-out stream and per-token byte lengths in the
    new ids (so bits per byte before and after score the same text), and calibration for later passes."""
    from tokenizers import Tokenizer

    new_dir = write_trimmed_tokenizer(tokenizer_dir, kept, scratch)
    if val is not None:
        old_tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        new_tok = Tokenizer.from_file(str(new_dir / "tokenizer.json"))
        val = ArrayStream(remap_ids(val.window(0, len(val)), kept, old_tok, new_tok))
    if lengths is not None:
        lengths = np.asarray(lengths)[kept]  # a kept token spells the same bytes under its new id
    return new_dir, val, lengths, remap_calibration(calib, kept)
