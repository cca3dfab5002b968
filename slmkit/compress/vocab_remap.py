"""Data made with a tokenizer before `prune.vocab`, carried into the trimmed vocabulary: datasets (token
shards) and teacher-logit caches, so a trimmed student can be distilled without re-reading the sources or
re-running the teacher. The kept ids come from the trimmed checkpoint's slmkit.json (the pass's record)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .base import PassError
from .vocab import PASS, kept_ids_of, old_to_new_ids, remap_ids, token_counts


# -- teacher-logit caches -------------------------------------------------------------------------------

def remap_teacher_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, table: np.ndarray,
                       fillers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's cached top-k (ids (..., k), log-probs (..., k), tail (...)) in the trimmed vocabulary.

    The student can only put mass on kept tokens, so its best target is the teacher conditioned on them:
    removed ids are dropped from the top-k and the rest is renormalised, log p'(v) = log p(v) - log Z with
    Z = the mass of the kept top-k entries plus the tail (a logsumexp: no 1 - sum cancellation). The tail
    still holds whatever removed tokens the teacher ranked below the top-k; those are not individually
    known, and a domain's removed tokens carry little mass there by construction. Kept entries move to the
    front (order kept); freed slots get distinct `fillers` ids (tokens the teacher practically never
    predicts, e.g. unused special tokens) at log-prob -65504 (probability 0 in any float), so the k slots
    stay distinct and the KD loss's k + 1 buckets remain a partition of the vocabulary.
    """
    from ..distill.teacher_cache import FP16_MIN

    k = ids.shape[-1]
    flat_ids, flat_lp, flat_tail = ids.reshape(-1, k), logprobs.reshape(-1, k).astype(np.float64), tail.reshape(-1)
    new = table[flat_ids]  # (N, k), -1 where removed
    keep = new >= 0
    lp_kept = np.where(keep, flat_lp, -np.inf)
    z = np.logaddexp(np.logaddexp.reduce(lp_kept, axis=1), flat_tail.astype(np.float64))  # (N,)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their order
    out_ids = np.take_along_axis(new, order, axis=1)
    out_lp = np.take_along_axis(lp_kept, order, axis=1) - z[:, None]
    free = ~np.take_along_axis(keep, order, axis=1)  # (N, k) freed slots, at the end of each row
    if free.any():
        cand = fillers[:2 * k]
        if len(cand) < 2 * k:
            raise PassError(f"{PASS}: need {2 * k} filler ids for a top-{k} cache, have {len(cand)}")
        present = (out_ids[:, :, None] == cand[None, None, :]).any(axis=1)  # (N, 2k) filler already a top-k id
        rank = np.cumsum(~present, axis=1)  # 1-based rank among the usable fillers
        need = free.sum(axis=1)  # (N,)
        rows_all = np.arange(len(need))
        for f in range(1, k + 1):  # the f-th freed slot (at k - need + f - 1) takes the f-th usable filler
            rows = rows_all[need >= f]
            pick = np.argmax((rank[rows] == f) & ~present[rows], axis=1)
            out_ids[rows, k - need[rows] + f - 1] = cand[pick]
        out_lp = np.where(free, FP16_MIN, out_lp)
    out_tail = np.minimum(flat_tail - z, 0.0)
    return (out_ids.reshape(ids.shape), out_lp.astype(np.float32).reshape(ids.shape),
            out_tail.astype(np.float32).reshape(tail.shape))


def _kept_of_checkpoint(ckpt) -> tuple[np.ndarray, Path]:
    from ..checkpoint import Checkpoint, read_provenance

    path = Path(ckpt.path if isinstance(ckpt, Checkpoint) else ckpt)
    records = [r for r in read_provenance(path).get("passes", []) if r.get("name") == PASS]
    if not records:
        raise PassError(f"{path}: no {PASS} pass in its slmkit.json; remap data for a checkpoint whose vocabulary "
                        "was trimmed")
    return kept_ids_of(records[-1]["report"]), path


def remap_dataset(dataset, ckpt, out: str | Path, *, splits: tuple[str, ...] | None = None):
    """A dataset built with the original tokenizer, rewritten in the trimmed vocabulary of `ckpt` (for
    distilling or evaluating the trimmed model without re-reading the sources). The tokenizer files are the
    checkpoint's, byte for byte, so `check_same_tokenizer` accepts the pair; ids map one to one where every
    token is kept, and documents holding a removed token are re-encoded from their text. `splits` limits the
    rewrite to those splits (e.g. ("val",) to evaluate)."""
    from ..checkpoint import atomic_write_text
    from ..data import open_dataset
    from ..data.shards import Dataset, ShardWriter, token_dtype

    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    kept, ck_path = _kept_of_checkpoint(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (ck_path / name).exists():
            shutil.copyfile(ck_path / name, out / name)
    old_tok, new_tok = ds.tokenizer(), _tokenizer_from(out / "tokenizer.json")
    table = old_to_new_ids(kept, max(ds.vocab_size, int(kept.max()) + 1))
    meta = copy.deepcopy(ds.meta)
    dtype = token_dtype(len(kept))
    one_to_one = {}
    wanted = ds.splits if splits is None else [s for s in ds.splits if s in splits]
    meta["splits"] = {k: v for k, v in meta["splits"].items() if k in wanted}
    for split in wanted:
        stream = ds.split(split)
        ids = stream.window(0, len(stream))
        one_to_one[split] = bool((table[ids] >= 0).all())
        writer = ShardWriter(out, split, dtype)
        writer.add_document(remap_ids(ids, kept, old_tok, new_tok), 0)
        entry = writer.close()
        meta["splits"][split] = {**entry, "documents": stream.documents, "bytes": stream.bytes}
    meta.update({"vocab_size": int(len(kept)), "dtype": dtype.name,
                 "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
                 "tokens": sum(s["tokens"] for s in meta["splits"].values()),
                 **{f"{r}_token_id": (int(table[meta[f"{r}_token_id"]]) if meta.get(f"{r}_token_id") is not None
                                      else None) for r in ("bos", "eos", "pad")},
                 "vocab_trimmed": {"from_dataset": str(Path(ds.path).resolve()),
                                   "from_meta_sha256": hashlib.sha256((Path(ds.path) / "meta.json").read_bytes())
                                   .hexdigest(), "checkpoint": str(ck_path.resolve()), "one_to_one": one_to_one}})
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return open_dataset(out)


def is_trimmed_from(ds, ckpt_path: Path) -> np.ndarray | None:
    """The kept ids when the checkpoint at `ckpt_path` has a prune.vocab-trimmed tokenizer made from the
    tokenizer `ds` was built with (its tokenizer.json is exactly that tokenizer trimmed to the recorded ids),
    else None."""
    from ..checkpoint import read_provenance
    from .vocab import trim_tokenizer_json

    records = [r for r in read_provenance(ckpt_path).get("passes", []) if r.get("name") == PASS]
    if not records or not (ckpt_path / "tokenizer.json").exists():
        return None
    kept = kept_ids_of(records[-1]["report"])
    if kept is None or int(kept.max()) >= ds.vocab_size:
        return None
    original = json.loads((Path(ds.path) / "tokenizer.json").read_text(encoding="utf-8"))
    mine = json.loads((ckpt_path / "tokenizer.json").read_text(encoding="utf-8"))
    return kept if trim_tokenizer_json(original, kept) == mine else None


def dataset_for_checkpoint(ds, ckpt_path: str | Path, *, splits: tuple[str, ...] = ("val",)):
    """`ds` itself when the checkpoint speaks its tokenizer; for a checkpoint whose vocabulary `prune.vocab`
    trimmed from that tokenizer, `ds` carried into the trimmed ids (`splits` only), cached in the dataset's
    `.vocab-remap/` (or a temporary directory when the dataset is read-only), so every model of one run is
    measured on the same text. Any other tokenizer is refused as `check_same_tokenizer` does."""
    import tempfile

    from ..data import check_same_tokenizer, open_dataset
    from ..data.errors import TokenizerMismatchError

    ckpt_path = Path(ckpt_path)
    try:
        check_same_tokenizer(ds, ckpt_path / "tokenizer.json" if (ckpt_path / "tokenizer.json").exists() else None)
        return ds
    except TokenizerMismatchError:
        if is_trimmed_from(ds, ckpt_path) is None:
            raise
    sha = hashlib.sha256((ckpt_path / "tokenizer.json").read_bytes()).hexdigest()
    key = f"{sha[:16]}-{'-'.join(sorted(splits))}"
    source_meta = hashlib.sha256((Path(ds.path) / "meta.json").read_bytes()).hexdigest()
    for root in (Path(ds.path) / ".vocab-remap", Path(tempfile.gettempdir()) / "slmkit-vocab-remap"):
        out = root / f"{source_meta[:16]}-{key}"
        if (out / "meta.json").exists():
            cached = open_dataset(out)
            if cached.meta.get("vocab_trimmed", {}).get("from_meta_sha256") == source_meta:
                return cached
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        except OSError:
            continue  # a read-only dataset directory: the temporary directory instead
        remap_dataset(ds, ckpt_path, tmp, splits=splits)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same remap first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return open_dataset(out)
    raise PassError(f"{ds.path}: could not write the remapped dataset for {ckpt_path} (no writable directory)")


def _tokenizer_from(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def remap_teacher_cache(cache, ckpt, dataset, out: str | Path, *, block: int = 256) -> Path:
    """A teacher cache built on the original dataset, rewritten for the trimmed vocabulary of `ckpt` and the
    dataset `remap_dataset` made from it (whose train split must map one to one, as it does with
    min_count=1: the cache's chunks are positions in that stream). See `remap_teacher_topk` for the math."""
    from ..checkpoint import atomic_write_text
    from ..data import open_dataset
    from ..data.shards import Dataset
    from ..distill.teacher_cache import (IDS_FILE, LOGPROBS_FILE, META_FILE, TAIL_FILE, TeacherCache, _dtypes,
                                         _shapes, dataset_identity, open_teacher_cache)

    cache = cache if isinstance(cache, TeacherCache) else open_teacher_cache(cache)
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    trimmed = ds.meta.get("vocab_trimmed") or {}
    if trimmed.get("from_meta_sha256") != cache.meta["dataset"]["meta_sha256"]:
        raise PassError(f"{ds.path} is not `remap_dataset` of the dataset cache {cache.path} was built on "
                        f"({cache.meta['dataset']['path']}); remap that dataset first")
    if not trimmed.get("one_to_one", {}).get("train"):
        raise PassError(f"{ds.path}: its train split did not map one to one (trimmed with min_count > 1), so the "
                        "cache's chunks no longer line up; trim with min_count=1 or rebuild the cache")
    kept, ck_path = _kept_of_checkpoint(ckpt)
    V = len(kept)
    table = old_to_new_ids(kept, max(cache.vocab_size, int(kept.max()) + 1))
    # Fillers for freed top-k slots: special tokens no document body predicts, then the rarest kept tokens.
    counts = token_counts(ds.split("train"), V)
    roles = {ds.bos_token_id, ds.eos_token_id}
    specials = [i for i in _tokenizer_from(Path(ds.path) / "tokenizer.json").get_added_tokens_decoder()
                if i not in roles]
    rare = [int(i) for i in np.argsort(counts, kind="stable") if int(i) not in roles and int(i) not in specials]
    fillers = np.asarray((specials + rare)[:2 * cache.k], dtype=np.int64)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes, dtypes = _shapes(cache.num_chunks, cache.seq_len, cache.k), _dtypes(V)
    arrays = {n: np.memmap(out / n, dtype=dtypes[n], mode="w+", shape=shapes[n]) for n in shapes}
    for start in range(0, cache.num_chunks, block):
        idx = np.arange(start, min(start + block, cache.num_chunks))
        ids, lp, tail = remap_teacher_topk(*cache.chunk_arrays(idx), table, fillers)
        arrays[IDS_FILE][idx] = ids.astype(dtypes[IDS_FILE])
        arrays[LOGPROBS_FILE][idx] = lp.astype(dtypes[LOGPROBS_FILE])
        arrays[TAIL_FILE][idx] = tail.astype(dtypes[TAIL_FILE])
    for a in arrays.values():
        a.flush()
    del arrays
    meta = {**copy.deepcopy(cache.meta), "vocab_size": V, "dtypes": {n: dt.name for n, dt in dtypes.items()},
            "dataset": dataset_identity(ds),
            "vocab_remap": {"from_cache": str(cache.path.resolve()), "checkpoint": str(ck_path.resolve()),
                            "rule": "removed ids dropped from the top-k; the rest renormalised over kept top-k + "
                                    "tail; freed slots hold filler ids at log-prob -65504"},
            "bytes": sum((out / n).stat().st_size for n in shapes)}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out
