"""``build_dataset``: sources -> cleaned documents -> tokenizer -> token shards + ``meta.json``.

Three streaming passes, so memory stays flat for corpora larger than RAM:
  1. read sources in sorted-id order, clean, de-duplicate, scrub, assign a split, spool to disk;
  2. train the tokenizer on the train split of the spool (or reuse a given one);
  3. encode the spool in batches (``encode_batch`` is multithreaded) into per-split shards.
``meta.json`` is written last; its presence means the directory is a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from . import clean as _clean
from ._io import write_bytes, write_json
from .errors import DataError
from .shards import DEFAULT_SHARD_TOKENS, FORMAT, ShardWriter, token_dtype
from .sources import DEFAULT_MAX_FILE_BYTES, DEFAULT_SOURCE_LABEL, SkipLog, iter_documents
from .tokenizer import (
    MIN_VOCAB_SIZE,
    encode_documents,
    load_tokenizer,
    special_token_ids,
    tokenizer_config,
    tokenizer_file,
    tokenizer_vocab_size,
    train_tokenizer,
)

SPOOL_NAME = ".documents.spool.tmp"
ENCODE_BATCH = 256


def split_hash(doc_id: str) -> float:
    """The document id's position in [0, 1): first 8 bytes of sha256(id), big-endian, / 2**64."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"``; depends only on the id, so it is stable across runs and orderings."""
    return "val" if split_hash(doc_id) < val_fraction else "train"


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class DocsPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} docs/s" if speed else "", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        DocsPerSecond(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _clear_previous(out: Path) -> None:
    """Remove what a previous build wrote (meta.json first, so a crash never leaves it stale)."""
    (out / "meta.json").unlink(missing_ok=True)
    for split_dir in (out / "train", out / "val"):
        if split_dir.is_dir():
            for f in list(split_dir.glob("*.bin")) + list(split_dir.glob("*.bin.tmp")):
                f.unlink()


def _spool_documents(
    sources, out: Path, *, text_field, scrub_pii, max_bytes, val_fraction, progress, max_file_bytes, include_hidden
) -> dict:
    """Pass 1: read, clean, dedup, scrub and split; write one JSON line per kept document."""
    skips = SkipLog()
    docs = iter_documents(sources, skips, text_field=text_field, max_file_bytes=max_file_bytes,
                          include_hidden=include_hidden)  # raises now for missing sources
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    dedup = _clean.Deduplicator()
    pii = Counter({k: 0 for k in _clean.PII_KINDS}) if scrub_pii else None
    stats = {"documents": 0, "train": 0, "val": 0, "bytes": 0, "empty_removed": 0, "truncated": False}
    smallest_train: tuple[float, str] | None = None
    with open(out / SPOOL_NAME, "w", encoding="utf-8") as spool, progress as bar:
        task = bar.add_task("reading", total=None)
        for doc in docs:
            bar.advance(task)
            text = _clean.clean_text(doc.text)
            if not text.strip():
                stats["empty_removed"] += 1
                continue
            if not dedup.is_new(text):
                continue
            if scrub_pii:
                text, counts = _clean.scrub_pii(text)
                pii.update(counts)
            h = split_hash(doc.id)
            split = "val" if h < val_fraction else "train"
            if split == "train" and (smallest_train is None or (h, doc.id) < smallest_train):
                smallest_train = (h, doc.id)
            spool.write(json.dumps({"id": doc.id, "split": split, "text": text}, ensure_ascii=False) + "\n")
            stats["documents"] += 1
            stats[split] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            if max_bytes is not None and stats["bytes"] >= max_bytes:
                stats["truncated"] = True
                break
    stats.update(skips=skips, dedup_removed=dedup.removed, pii=dict(pii) if pii is not None else None)
    # A held-out set of zero documents makes every eval meaningless; move the lowest-hash one over.
    stats["forced_val"] = None
    if stats["val"] == 0 and stats["documents"] >= 2 and val_fraction > 0:
        stats["forced_val"] = smallest_train[1]
        stats["val"], stats["train"] = 1, stats["train"] - 1
    return stats


def _iter_spool(out: Path, forced_val: str | None) -> Iterator[tuple[str, str]]:
    with open(out / SPOOL_NAME, encoding="utf-8") as spool:
        for line in spool:
            rec = json.loads(line)
            yield ("val" if rec["id"] == forced_val else rec["split"]), rec["text"]


def _prepare_tokenizer(
    tokenizer, out: Path, stats: dict, *, vocab_size, min_frequency, progress, model_max_length
) -> tuple[bytes, dict]:
    """Pass 2: the tokenizer.json bytes and the tokenizer_config dict (trained or reused)."""
    if tokenizer is not None:
        src = tokenizer_file(tokenizer)
        tok = load_tokenizer(src)
        tok_bytes = src.read_bytes()
        config_path = src.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        ids = special_token_ids(tok, config)
        if ids["eos"] is None:
            raise DataError(
                f"tokenizer {src} has no end-of-sequence token (looked for eos_token in tokenizer_config.json "
                "and for <|eos|>, </s>, <|end_of_text|>, <|endoftext|>); add one or let slmkit train a tokenizer"
            )
        if not config:
            config = tokenizer_config(tok, ids, model_max_length=model_max_length)
        return tok_bytes, config
    train_texts = (text for split, text in _iter_spool(out, stats["forced_val"]) if split == "train")
    tok = train_tokenizer(
        train_texts, vocab_size=vocab_size, min_frequency=min_frequency, length=stats["train"], progress=progress
    )
    config = tokenizer_config(tok, special_token_ids(tok), model_max_length=model_max_length)
    return tok.to_str(pretty=False).encode("utf-8"), config


def _encode_to_shards(tok, out: Path, stats: dict, ids: dict, dtype, shard_tokens: int, progress) -> dict:
    """Pass 3: ``[bos] + ids + [eos]`` per document, appended to its split's shards."""
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    prefix = [ids["bos"]] if ids["bos"] is not None else []
    suffix = [ids["eos"]]
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        encodings = encode_documents(tok, [text for _, text in batch])
        for (split, text), ids in zip(batch, encodings):
            writers[split].add_document(np.array(prefix + ids + suffix, dtype=dtype), len(text.encode("utf-8")))
        bar.advance(task, len(batch))
        batch.clear()

    with progress as bar:
        task = bar.add_task("encoding", total=stats["documents"])
        for item in _iter_spool(out, stats["forced_val"]):
            batch.append(item)
            if len(batch) == ENCODE_BATCH:
                flush()
        if batch:
            flush()
    return {s: w.close() for s, w in writers.items()}


def build_dataset(
    sources: list[str],
    out: str | Path,
    *,
    text_field: str = "text",
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    scrub_pii: bool = False,
    tokenizer: str | Path | None = None,
    max_bytes: int | None = None,
    min_frequency: int = 2,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    model_max_length: int = 2048,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    include_hidden: bool = False,
) -> dict:
    """Build a token dataset in ``out`` from ``sources`` (``[]``: the default domain); return its meta.

    ``out`` gets ``tokenizer.json``, ``tokenizer_config.json``, ``train/*.bin``, ``val/*.bin`` and,
    last, ``meta.json``. ``shard_tokens`` caps tokens per shard file (small values are for tests).
    Files over ``max_file_bytes`` are skipped ("too large"), and hidden files inside directories are skipped
    ("hidden") unless ``include_hidden`` (see ``sources``).
    """
    from slmkit import __version__

    t0 = time.perf_counter()
    out = Path(out)
    sources = [str(s) for s in sources]
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes={max_bytes} must be positive (or None for no limit)")
    if max_file_bytes <= 0:
        raise DataError(f"max_file_bytes={max_file_bytes} must be positive")
    if tokenizer is not None:
        tokenizer_file(tokenizer)  # fail before reading the corpus
    elif vocab_size < MIN_VOCAB_SIZE:  # fail before reading the corpus, not after
        raise DataError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least {MIN_VOCAB_SIZE}")

    stats = _spool_documents(
        sources, out, text_field=text_field, scrub_pii=scrub_pii, max_bytes=max_bytes,
        val_fraction=val_fraction, progress=_progress(progress), max_file_bytes=max_file_bytes,
        include_hidden=include_hidden,
    )
    try:
        skips: SkipLog = stats["skips"]
        if stats["documents"] == 0:
            where = ", ".join(sources) if sources else DEFAULT_SOURCE_LABEL
            detail = f" (skipped: {dict(skips.counts)})" if len(skips) else ""
            raise DataError(
                f"no documents found in {where}{detail}; pass UTF-8 text/code/Markdown files, directories, glob "
                f"patterns, or .jsonl files with a {text_field!r} field (or no sources for the default domain)"
            )
        if stats["train"] == 0:
            raise DataError(
                f"the train split is empty ({stats['documents']} document(s), val_fraction={val_fraction}); "
                "add documents or lower val_fraction"
            )
        tok_bytes, config = _prepare_tokenizer(
            tokenizer, out, stats, vocab_size=vocab_size, min_frequency=min_frequency,
            progress=progress, model_max_length=model_max_length,
        )
        write_bytes(out / "tokenizer.json", tok_bytes)
        write_json(out / "tokenizer_config.json", config)
        tok = load_tokenizer(out / "tokenizer.json")
        ids = special_token_ids(tok, config)
        n_vocab = tokenizer_vocab_size(tok)
        dtype = token_dtype(n_vocab)
        splits = _encode_to_shards(tok, out, stats, ids, dtype, shard_tokens, _progress(progress))
    finally:
        (out / SPOOL_NAME).unlink(missing_ok=True)

    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": n_vocab,
        "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
        "tokenizer_source": str(tokenizer) if tokenizer is not None else "trained",
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "splits": splits,
        "sources": sources or [DEFAULT_SOURCE_LABEL],
        "documents": stats["documents"],
        "bytes": stats["bytes"],
        "tokens": sum(s["tokens"] for s in splits.values()),
        "dedup_removed": stats["dedup_removed"],
        "empty_removed": stats["empty_removed"],
        "skipped": skips.entries,
        "skipped_counts": dict(skips.counts),
        "pii": stats["pii"],
        "val_fraction": val_fraction,
        "val_forced": stats["forced_val"],
        "split_rule": "val if int.from_bytes(sha256(id)[:8], 'big') / 2**64 < val_fraction",
        "text_field": text_field,
        "max_bytes": max_bytes,
        "max_file_bytes": max_file_bytes,
        "include_hidden": include_hidden,
        "truncated": stats["truncated"],
        "vocab_size_requested": vocab_size if tokenizer is None else None,
        "min_frequency": min_frequency if tokenizer is None else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "slmkit_version": __version__,
    }
    write_json(out / "meta.json", meta)
    return meta
