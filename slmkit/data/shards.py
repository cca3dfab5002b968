"""Token shards: flat little-endian ``uint16``/``uint32`` arrays on disk, read back with ``np.memmap``.

A split is a directory of ``000000.bin, 000001.bin, ...``; concatenated they are one token stream in
which each document is ``[bos] + ids + [eos]``. There is no header: ``meta.json`` records every shard's
token count and the dtype, and a reader checks each file's size against it before trusting it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, TokenizerMismatchError

FORMAT = "slmkit.dataset/1"
DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays to ``dir/000000.bin``..., starting a new shard every ``shard_tokens``."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.root, self.split, self.dtype, self.shard_tokens = Path(root), split, np.dtype(dtype), shard_tokens
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.documents = 0
        self.bytes = 0
        self._file = None
        self._filled = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._filled

    def _rel(self) -> str:
        return f"{self.split}/{len(self.shards):06d}.bin"

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        rel = self._rel()
        os.replace(self.root / (rel + ".tmp"), self.root / rel)
        self.shards.append({"file": rel, "tokens": self._filled})
        self._file, self._filled = None, 0

    def add_document(self, ids: np.ndarray, nbytes: int) -> None:
        """Append one document's tokens (already wrapped in bos/eos) and account its text bytes."""
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        self.documents += 1
        self.bytes += nbytes
        while ids.size:
            if self._file is None:
                self._file = open(self.root / (self._rel() + ".tmp"), "wb")
            room = self.shard_tokens - self._filled
            head, ids = ids[:room], ids[room:]
            head.tofile(self._file)
            self._filled += head.size
            if self._filled == self.shard_tokens:
                self._close_shard()

    def close(self) -> dict:
        """Finish the last shard; return this split's meta entry."""
        self._close_shard()
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes}


class TokenStream:
    """One split as a single read-only token sequence over memory-mapped shards."""

    def __init__(self, root: Path, name: str, entry: dict, dtype: np.dtype):
        self.name = name
        self.documents = int(entry.get("documents", 0))
        self.bytes = int(entry.get("bytes", 0))
        self.dtype = np.dtype(dtype)
        self._arrays: list[np.ndarray] = []
        for shard in entry.get("shards", []):
            path = root / shard["file"]
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"shard {path} is missing; the dataset is incomplete, rebuild it with `slm data`")
            actual = path.stat().st_size
            if actual != expected:
                raise DataError(
                    f"shard {path} has {actual} bytes, expected {expected} "
                    f"({shard['tokens']} tokens x {self.dtype.itemsize}); the dataset is corrupt, rebuild it with `slm data`"
                )
            if expected:
                self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        sizes = [a.size for a in self._arrays]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, crossing shard boundaries as needed."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) out of range for {self.name} of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            arr = self._arrays[shard]
            offset = pos - int(self._starts[shard])
            take = min(length - filled, arr.size - offset)
            out[filled : filled + take] = arr[offset : offset + take]
            filled += take
            pos += take
            shard += 1
        return out

    def __repr__(self) -> str:
        return f"TokenStream({self.name!r}, tokens={len(self)}, documents={self.documents}, shards={len(self._arrays)})"


@dataclass
class Dataset:
    """A dataset directory written by ``build_dataset``: tokenizer, token shards and ``meta.json``."""

    path: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def tokenizer_sha256(self) -> str:
        """Digest of the tokenizer.json that made the token ids: recorded in meta.json by `slm data`, else
        (a hand-made dataset) computed from the tokenizer.json beside the shards."""
        return self.meta.get("tokenizer_sha256") or hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def bos_token_id(self) -> int | None:
        return self.meta.get("bos_token_id")

    @property
    def eos_token_id(self) -> int:
        return self.meta["eos_token_id"]

    @property
    def pad_token_id(self) -> int | None:
        return self.meta.get("pad_token_id")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def split(self, name: str) -> TokenStream:
        if name not in self.meta["splits"]:
            raise DataError(f"dataset {self.path} has no split {name!r}; it has {self.splits}")
        return TokenStream(self.path, name, self.meta["splits"][name], self.dtype)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, vocab_size={self.vocab_size}, tokens={self.meta.get('tokens')})"


def open_dataset(path: str | Path) -> Dataset:
    """Open and validate a dataset directory (meta.json, shard sizes); DataError says what is wrong."""
    root = Path(path)
    meta_path = root / "meta.json"
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist; build one with `slm data <sources> --out {root}`")
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path} is missing, so {root} is not a complete dataset; build it with `slm data <sources> --out {root}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is not readable JSON ({e}); rebuild the dataset with `slm data`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r}; rebuild the dataset with `slm data`")
    for key in ("dtype", "vocab_size", "eos_token_id", "splits"):
        if key not in meta:
            raise DataError(f"{meta_path} lacks the field {key!r}; rebuild the dataset with `slm data`")
    if not (root / "tokenizer.json").is_file():
        raise DataError(f"{root / 'tokenizer.json'} is missing; rebuild the dataset with `slm data`")
    ds = Dataset(path=root, meta=meta)
    for name in ds.splits:  # validates every shard file now rather than mid-training
        ds.split(name)
    return ds


def check_same_tokenizer(ds: Dataset, tokenizer_file: str | Path | None, *, alternative: str | None = None) -> None:
    """Refuse to use `ds` with a model whose tokenizer is `tokenizer_file` (a checkpoint's tokenizer.json)
    unless that file is byte-identical to the tokenizer the dataset's ids were made with: with another
    tokenizer the same ids spell other text, so losses, bits per byte, calibration statistics and distillation
    targets would all be silently wrong. `None` (a checkpoint without a tokenizer.json) is not checked.

    Raises TokenizerMismatchError naming both files and the `slm data` command that fixes it; `alternative`
    ("use `slm distill --mode sequence`") is offered as a second way out where there is one."""
    if tokenizer_file is None:
        return
    tokenizer_file = Path(tokenizer_file)
    mine = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    theirs = ds.tokenizer_sha256
    if mine == theirs:
        return
    owner = tokenizer_file.parent
    fix = (f"rebuild the dataset with that tokenizer (`slm data <sources> --out <new dir> --tokenizer {owner}`)"
           + (f" or {alternative}" if alternative else ""))
    raise TokenizerMismatchError(
        f"{tokenizer_file} (sha256 {mine[:12]}) is not the tokenizer dataset {ds.path} was built with "
        f"({ds.tokenizer_path}, sha256 {theirs[:12]}): the same token ids would mean other text; {fix}")
