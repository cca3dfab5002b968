"""Teacher logit cache: the teacher's top-k next-token log-probabilities, computed once, so distillation
runs train without loading (or paying for) the teacher.

Logit KD needs the teacher's distribution at every position; storing all V logits per token is
impossible at scale (V = 128k -> 256 KB per token in fp16), while the top-k carry almost all of the mass.
We keep, per position, the k largest log-probabilities, their token ids, and the exact log-mass of
everything else (the "tail"), so a sparse KD loss can still treat the teacher as a proper distribution
over k + 1 outcomes (top-k tokens + "other"). This is the scheme of sparse/top-k KD caches used for LLM
pretraining distillation (e.g. Gemma 2's on-the-fly top-k, Raman et al. 2023 "for the price of a few
logits", Anshumann et al. 2025 "sparse logit sampling").

A teacher's prediction depends on the context it saw, so a cache is only valid for the exact windows it
was computed on. The train split is cut into fixed, non-overlapping chunks:

    chunk i = train tokens [i*seq_len, i*seq_len + seq_len + 1)   inputs = first seq_len, labels = last seq_len
    num_chunks = (len(train) - 1) // seq_len        (optionally capped by max_chunks)

and `CachedKDBatches` samples whole chunks, never arbitrary windows.

Layout of a cache directory (raw little-endian arrays, memory-mapped; no pickle):

    topk_ids.bin        uint16 (uint32 if V > 65536)  (num_chunks, seq_len, k)  sorted by descending prob
    topk_logprobs.bin   float16                       (num_chunks, seq_len, k)  clamped to fp16's finite range
    tail_logprob.bin    float32                       (num_chunks, seq_len)     log(1 - sum exp(top-k)); -inf if k = V
    progress.json       only while building: chunks done + a fingerprint of the build's inputs
    meta.json           written LAST; its presence means the cache is complete

The tail is computed without cancellation as logsumexp(logits with the top-k masked to -inf) - logsumexp(
logits): `log1p(-sum(exp(topk)))` loses all precision exactly when it matters (top-k mass close to 1).
It is stored in float32 because it costs 4 bytes per position against 4k bytes for the top-k (3% at
k = 16) and keeps very negative tails (e.g. -40 when the top-k hold everything) precise to ~1e-6 rather
than fp16's 0.03 spacing there.

A build is resumable: each batch of chunks is written into the pre-sized memory maps, flushed, then
`progress.json` is replaced atomically, so an interrupted build restarts after the last flushed batch
and produces byte-identical files (same batches, same kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import WEIGHTS, Checkpoint, atomic_write_text, load_checkpoint, sha256_file
from ..data.shards import Dataset, check_same_tokenizer, open_dataset, token_dtype
from ..model import ConfigError, ModelConfig

FORMAT = "slmkit.teacher_cache/1"
IDS_FILE, LOGPROBS_FILE, TAIL_FILE = "topk_ids.bin", "topk_logprobs.bin", "tail_logprob.bin"
META_FILE, PROGRESS_FILE = "meta.json", "progress.json"
LOGPROB_DTYPE, TAIL_DTYPE = np.dtype("<f2"), np.dtype("<f4")
FP16_MIN = float(np.finfo(np.float16).min)  # -65504: exp() of it is 0 in any float, unlike -inf it keeps 0*x finite
CHUNK_RULE = "chunk i = train[i*seq_len : i*seq_len + seq_len + 1]; inputs = [:-1], labels = [1:]"


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be built or used as asked; the message says why and what to do."""


# -- identities of the inputs ---------------------------------------------------------------------

def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_identity(teacher: Checkpoint | str | Path) -> dict:
    """Path and digests of a teacher checkpoint, from its files (the weights are not loaded for a path).
    For a loaded `Checkpoint` this describes the files it came from, not in-memory edits to its model."""
    path = Path(teacher.path if isinstance(teacher, Checkpoint) else teacher)
    if not (path / "config.json").is_file():
        raise TeacherCacheError(f"{path}: not a checkpoint directory (no config.json)")
    if isinstance(teacher, Checkpoint):
        prov = teacher.provenance
    else:
        try:
            prov = json.loads((path / "slmkit.json").read_text()) if (path / "slmkit.json").is_file() else {}
        except json.JSONDecodeError:
            prov = {}
    weights_sha = prov.get("files", {}).get(WEIGHTS, {}).get("sha256")
    if weights_sha is None:  # imported or hand-made checkpoint without provenance digests
        if not (path / WEIGHTS).is_file():
            raise TeacherCacheError(f"{path / WEIGHTS}: missing; cannot identify the teacher's weights")
        weights_sha = sha256_file(path / WEIGHTS)
    tok = path / "tokenizer.json"
    return {"path": str(path.resolve()), "weights_sha256": weights_sha,
            "config_sha256": _sha256_bytes(path / "config.json"),
            "tokenizer_sha256": _sha256_bytes(tok) if tok.is_file() else None}


def dataset_identity(ds: Dataset) -> dict:
    return {"path": str(Path(ds.path).resolve()), "tokenizer_sha256": ds.meta.get("tokenizer_sha256"),
            "train_tokens": len(ds.split("train")), "meta_sha256": _sha256_bytes(Path(ds.path) / "meta.json")}


def _fingerprint(meta_like: dict) -> dict:
    """What must match for a partial or complete cache to be the one a build asks for."""
    return {"format": FORMAT, "k": meta_like["k"], "seq_len": meta_like["seq_len"],
            "temperature": meta_like["temperature"], "num_chunks": meta_like["num_chunks"],
            "vocab_size": meta_like["vocab_size"], "dtypes": meta_like["dtypes"],
            "teacher": {key: meta_like["teacher"][key] for key in ("weights_sha256", "config_sha256")},
            "dataset_meta_sha256": meta_like["dataset"]["meta_sha256"]}


def _shapes(num_chunks: int, seq_len: int, k: int) -> dict[str, tuple[int, ...]]:
    return {IDS_FILE: (num_chunks, seq_len, k), LOGPROBS_FILE: (num_chunks, seq_len, k),
            TAIL_FILE: (num_chunks, seq_len)}


def _dtypes(vocab_size: int) -> dict[str, np.dtype]:
    return {IDS_FILE: token_dtype(vocab_size), LOGPROBS_FILE: LOGPROB_DTYPE, TAIL_FILE: TAIL_DTYPE}


def _expected_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# -- the teacher's sparse distribution ------------------------------------------------------------

def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(B, T, V) logits -> top-k ids (B, T, k) int64, their log-probs (B, T, k) float32 and the tail
    log-mass (B, T) float32 of log_softmax(logits / temperature); the tail is exact (no 1 - sum)."""
    z = logits.float() / temperature  # (B, T, V), a fresh tensor we may overwrite
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, 1)
    vals, ids = z.topk(k, dim=-1)  # (B, T, k), descending
    z.scatter_(-1, ids, float("-inf"))  # everything but the top-k; all -inf when k == V
    tail = (torch.logsumexp(z, dim=-1) - lse.squeeze(-1)).clamp_(max=0.0)  # (B, T)
    return ids, vals - lse, tail


def _score_batch(model, input_ids: torch.Tensor, k: int, temperature: float, autocast_dtype):
    """One teacher forward; a separate function so tests can interrupt a build between batches."""
    device_type = input_ids.device.type
    amp = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        logits = model(input_ids)  # (B, T, V)
        return teacher_topk(logits, k, temperature)


# -- building -------------------------------------------------------------------------------------

def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class ChunksPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} chunks/s" if speed else "", style="cyan")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), ChunksPerSecond(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def _check_build_args(config: ModelConfig, teacher_path: Path, ds: Dataset, *, k: int, seq_len: int, temperature: float,
                      batch_size: int, max_chunks: int | None, tid: dict) -> int:
    """Every refusal that can be decided before any work; returns num_chunks."""
    refuse_teacher_with_memory(config, teacher_path)
    V, dsV = config.vocab_size, ds.vocab_size
    retok = f"rebuild the dataset with the teacher's tokenizer: `slm data <sources> --tokenizer {teacher_path}`"
    if V < dsV:
        raise TeacherCacheError(f"teacher {teacher_path} has vocab_size {V}, but dataset {ds.path} was tokenized "
                                f"with a {dsV}-token tokenizer, so its ids are not the teacher's; {retok}")
    if tid["tokenizer_sha256"] is not None:
        check_same_tokenizer(ds, teacher_path / "tokenizer.json")
    if not isinstance(k, int) or not 1 <= k <= V:
        raise TeacherCacheError(f"k={k} must be an integer in [1, vocab_size={V}]")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise TeacherCacheError(f"seq_len={seq_len} must be a positive integer")
    if not temperature > 0:
        raise TeacherCacheError(f"temperature={temperature} must be > 0")
    if batch_size < 1:
        raise TeacherCacheError(f"batch_size={batch_size} must be >= 1")
    if max_chunks is not None and max_chunks < 1:
        raise TeacherCacheError(f"max_chunks={max_chunks} must be >= 1 (or None for the whole train split)")
    n_train = len(ds.split("train"))
    num_chunks = (n_train - 1) // seq_len
    if num_chunks < 1:
        raise TeacherCacheError(f"the train split of {ds.path} has {n_train} tokens, fewer than one chunk of "
                                f"seq_len+1={seq_len + 1}; use a smaller seq_len or more data")
    if seq_len > config.max_position_embeddings:
        raise TeacherCacheError(f"seq_len={seq_len} exceeds the teacher's context "
                                f"(max_position_embeddings={config.max_position_embeddings}); "
                                "use a smaller seq_len")
    return min(num_chunks, max_chunks) if max_chunks is not None else num_chunks


def refuse_teacher_with_memory(config: ModelConfig, teacher_path: Path | str) -> None:
    """A cache scores isolated windows; a teacher with Transformer-XL memory predicts from its memory of the
    earlier segments too, so cached predictions would not be the teacher's."""
    if config.memory_length > 0:
        raise TeacherCacheError(
            f"teacher {teacher_path} has memory_length={config.memory_length} (Transformer-XL memory): a teacher "
            "cache holds its predictions for isolated windows, without the memory of earlier segments it uses "
            "when distilling; distill with the teacher online (drop --cache / --cache-teacher), where it reads "
            "the same consecutive segments as the student and keeps its own memory")


def check_cache_stream(cache: "TeacherCache", stream) -> None:
    """The token stream must be the train split the cache was built on, or its chunks are other tokens."""
    need = cache.num_chunks * cache.seq_len + 1
    recorded = cache.meta["dataset"].get("train_tokens")
    if len(stream) < need or (recorded is not None and len(stream) != recorded):
        raise TeacherCacheError(
            f"the token stream has {len(stream)} tokens but cache {cache.path} was built on a train split of "
            f"{recorded} tokens; pass the train split of the dataset the cache was built on")


def _teacher_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.load(path / "config.json")
    except ConfigError as e:
        raise TeacherCacheError(f"teacher {path}: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherCacheError(f"{path}: not readable JSON ({e})") from None


def _start_or_resume(out: Path, fp: dict, shapes: dict, dtypes: dict) -> tuple[int, float]:
    """Chunks already done and seconds already spent by an earlier, interrupted build of the same cache."""
    prog_path = out / PROGRESS_FILE
    if not prog_path.is_file():
        return 0, 0.0
    prog = _read_json(prog_path)
    if prog.get("fingerprint") != fp:
        raise TeacherCacheError(f"{out} holds a partial cache built from other inputs (teacher, dataset, k, seq_len, "
                                f"temperature or max_chunks differ); delete {out} or choose another --out")
    for name, shape in shapes.items():
        f, want = out / name, _expected_bytes(shape, dtypes[name])
        if not f.is_file() or f.stat().st_size != want:
            return 0, 0.0  # files lost or cut: the recorded progress cannot be trusted, start over
    return int(prog["chunks_done"]), float(prog.get("seconds", 0.0))


def build_teacher_cache(teacher: Checkpoint | str | Path, dataset: Dataset | str | Path, out: str | Path | None = None,
                        *, k: int = 16, seq_len: int = 256, temperature: float = 1.0, batch_size: int = 8,
                        max_chunks: int | None = None, device: str | torch.device = "cpu",
                        autocast_dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Run `teacher` over the train split of `dataset` in fixed chunks and store its top-k log-probs.

    Returns the cache directory (default `<dataset>/teacher_cache/<weights_sha[:12]>-k{k}-s{seq_len}-t{T:g}`).
    An interrupted build resumes where it stopped; a complete cache with the same inputs is returned as
    is. A loaded `Checkpoint` has its model moved to `device` and put in eval mode."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    tid = teacher_identity(teacher)  # cheap (digests from slmkit.json): refusals come before loading weights
    teacher_path = Path(tid["path"])
    config = teacher.config if isinstance(teacher, Checkpoint) else _teacher_config(teacher_path)
    temperature = float(temperature)
    num_chunks = _check_build_args(config, teacher_path, ds, k=k, seq_len=seq_len, temperature=temperature,
                                   batch_size=batch_size, max_chunks=max_chunks, tid=tid)
    V = config.vocab_size
    out = Path(out) if out is not None else (
        Path(ds.path) / "teacher_cache" / f"{tid['weights_sha256'][:12]}-k{k}-s{seq_len}-t{temperature:g}")
    shapes, dtypes = _shapes(num_chunks, seq_len, k), _dtypes(V)
    meta = {"format": FORMAT, "k": k, "seq_len": seq_len, "temperature": temperature, "num_chunks": num_chunks,
            "vocab_size": V, "dtypes": {name: dt.name for name, dt in dtypes.items()}, "teacher": tid,
            "dataset": dataset_identity(ds)}
    fp = _fingerprint(meta)
    if (out / META_FILE).is_file():
        if _fingerprint(_read_json(out / META_FILE)) == fp:
            return out  # already built from these inputs
        raise TeacherCacheError(f"{out} already holds a complete cache built from other inputs; "
                                f"delete it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    done, seconds_before = _start_or_resume(out, fp, shapes, dtypes)
    mode = "r+" if done else "w+"  # w+ pre-sizes the files (sparse), r+ keeps what earlier runs flushed
    arrays = {name: np.memmap(out / name, dtype=dtypes[name], mode=mode, shape=shapes[name]) for name in shapes}

    if not isinstance(teacher, Checkpoint):
        teacher = load_checkpoint(teacher_path)
    model = teacher.model.to(device).eval()
    stream = ds.split("train")
    with _progress_bar(progress) as bar:
        task = bar.add_task("teacher cache", total=num_chunks, completed=done)
        for start in range(done, num_chunks, batch_size):
            stop = min(start + batch_size, num_chunks)
            w = np.stack([stream.window(i * seq_len, seq_len + 1) for i in range(start, stop)])  # (b, seq_len+1)
            ids, logprobs, tail = _score_batch(model, torch.from_numpy(w[:, :-1]).to(device), k, temperature,
                                               autocast_dtype)
            arrays[IDS_FILE][start:stop] = ids.cpu().numpy().astype(dtypes[IDS_FILE])
            arrays[LOGPROBS_FILE][start:stop] = logprobs.clamp(min=FP16_MIN).cpu().numpy().astype(LOGPROB_DTYPE)
            arrays[TAIL_FILE][start:stop] = tail.cpu().numpy().astype(TAIL_DTYPE)
            for a in arrays.values():
                a.flush()
            elapsed = seconds_before + time.perf_counter() - t0
            atomic_write_text(out / PROGRESS_FILE, json.dumps({"chunks_done": stop, "seconds": round(elapsed, 3),
                                                               "batch_size": batch_size, "fingerprint": fp}) + "\n")
            bar.update(task, completed=stop)
    del arrays

    meta.update({
        "chunk_rule": CHUNK_RULE, "max_chunks": max_chunks,
        "tokens": num_chunks * seq_len,
        "bytes": sum((out / name).stat().st_size for name in shapes),
        "seconds": round(seconds_before + time.perf_counter() - t0, 3),
        "batch_size": batch_size, "device": str(device),
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return out


# -- reading --------------------------------------------------------------------------------------

@dataclass
class TeacherCache:
    """A complete, validated cache directory; arrays are memory-mapped read-only."""

    path: Path
    meta: dict

    def __post_init__(self) -> None:
        shapes, dtypes = _shapes(self.num_chunks, self.seq_len, self.k), _dtypes(self.vocab_size)
        self._arrays = {name: np.memmap(self.path / name, dtype=dtypes[name], mode="r", shape=shapes[name])
                        for name in shapes}

    k = property(lambda self: int(self.meta["k"]))
    seq_len = property(lambda self: int(self.meta["seq_len"]))
    temperature = property(lambda self: float(self.meta["temperature"]))
    num_chunks = property(lambda self: int(self.meta["num_chunks"]))
    vocab_size = property(lambda self: int(self.meta["vocab_size"]))

    def chunk_arrays(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k ids (n, seq_len, k) int64, their log-probs (n, seq_len, k) float32 and the tail log-mass
        (n, seq_len) float32 for chunk `indices` (n,)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_chunks):
            raise IndexError(f"chunk indices must be in [0, {self.num_chunks}); got {idx.min()}..{idx.max()}")
        return (self._arrays[IDS_FILE][idx].astype(np.int64), self._arrays[LOGPROBS_FILE][idx].astype(np.float32),
                self._arrays[TAIL_FILE][idx].astype(np.float32))

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, chunks={self.num_chunks}, seq_len={self.seq_len}, k={self.k}, "
                f"temperature={self.temperature:g})")


def _check_meta(path: Path, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise TeacherCacheError(f"{path / META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                                "rebuild the cache with `build_teacher_cache`")
    for key in ("k", "seq_len", "temperature", "num_chunks", "vocab_size", "dtypes", "teacher", "dataset"):
        if key not in meta:
            raise TeacherCacheError(f"{path / META_FILE} lacks the field {key!r}; rebuild the cache")
    shapes, dtypes = _shapes(meta["num_chunks"], meta["seq_len"], meta["k"]), _dtypes(meta["vocab_size"])
    for name, shape in shapes.items():
        if meta["dtypes"].get(name) != dtypes[name].name:
            raise TeacherCacheError(f"{path / META_FILE}: dtype of {name} is {meta['dtypes'].get(name)!r}, "
                                    f"this slmkit reads {dtypes[name].name!r}; rebuild the cache")
        f, want = path / name, _expected_bytes(shape, dtypes[name])
        if not f.is_file():
            raise TeacherCacheError(f"{f} is missing; the cache is incomplete, rebuild it with `build_teacher_cache`")
        if f.stat().st_size != want:
            raise TeacherCacheError(f"{f} has {f.stat().st_size} bytes, expected {want} "
                                    f"({' x '.join(map(str, shape))} x {dtypes[name].itemsize}); the file is "
                                    "truncated or was replaced, rebuild the cache")


def open_teacher_cache(path: str | Path, *, teacher: Checkpoint | str | Path | None = None,
                       dataset: Dataset | str | Path | None = None, temperature: float | None = None) -> TeacherCache:
    """Open and validate a cache; with `teacher`, `dataset` or `temperature`, also check that the cache was
    built from exactly those (by digest), so a KD run never silently trains on another teacher's logits."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = (" — a build was interrupted; rerun `build_teacher_cache` with the same arguments to resume"
                if (path / PROGRESS_FILE).is_file() else "; build one with `build_teacher_cache`")
        raise TeacherCacheError(f"{meta_path} is missing, so {path} is not a complete teacher cache{hint}")
    meta = _read_json(meta_path)
    _check_meta(path, meta)
    if teacher is not None:
        want, have = meta["teacher"], teacher_identity(teacher)
        if (want["weights_sha256"], want["config_sha256"]) != (have["weights_sha256"], have["config_sha256"]):
            raise TeacherCacheError(
                f"cache {path} was built with teacher {want['path']} (sha {want['weights_sha256'][:12]}), not "
                f"{have['path']} (sha {have['weights_sha256'][:12]}); build a cache for this teacher")
    if dataset is not None:
        ds_meta = Path(dataset.path if isinstance(dataset, Dataset) else dataset) / "meta.json"
        if not ds_meta.is_file():
            raise TeacherCacheError(f"{ds_meta} is missing; {Path(ds_meta).parent} is not a dataset")
        if _sha256_bytes(ds_meta) != meta["dataset"]["meta_sha256"]:
            raise TeacherCacheError(
                f"cache {path} was built on dataset {meta['dataset']['path']} (meta sha "
                f"{meta['dataset']['meta_sha256'][:12]}), not {ds_meta.parent}; its chunks would not be these "
                "tokens — build a cache for this dataset")
    if temperature is not None and float(temperature) != float(meta["temperature"]):
        raise TeacherCacheError(
            f"cache {path} holds log-probs at temperature {meta['temperature']:g}, not {float(temperature):g}; "
            "top-k log-probs cannot be re-tempered exactly (the tail's logits are gone), so KD at another "
            "temperature needs a cache rebuilt with that temperature")
    return TeacherCache(path=path, meta=meta)


# -- batches for KD -------------------------------------------------------------------------------

class CachedKDBatches:
    """Batches of whole cached chunks with the teacher's sparse distribution, the `LMBatches` protocol:
    the batch for step s is a pure function of (seed, s), and `rows` slices the global batch (DDP ranks)."""

    def __init__(self, cache: TeacherCache, stream, global_batch: int, seed: int):
        check_cache_stream(cache, stream)
        if global_batch < 1:
            raise TeacherCacheError(f"global_batch={global_batch} must be >= 1")
        self.cache, self.stream, self.global_batch, self.seed = cache, stream, global_batch, seed
        self.seq_len = cache.seq_len

    def chunks(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.cache.num_chunks, size=self.global_batch)

    def batch(self, step: int, rows: slice) -> dict[str, torch.Tensor]:
        idx = self.chunks(step)[rows]
        L = self.seq_len
        w = np.empty((len(idx), L + 1), dtype=np.int64)  # (b, L+1)
        for r, i in enumerate(idx):
            w[r] = self.stream.window(int(i) * L, L + 1)
        ids, logprobs, tail = self.cache.chunk_arrays(idx)
        t = torch.from_numpy(w)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                "teacher_topk_ids": torch.from_numpy(ids),  # (b, L, k)
                "teacher_topk_logprobs": torch.from_numpy(logprobs),  # (b, L, k)
                "teacher_tail_logprob": torch.from_numpy(tail)}  # (b, L)
