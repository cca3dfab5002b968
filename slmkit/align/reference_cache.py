"""Reference log-probabilities, computed once and cached.

DPO and IPO compare the policy with a frozen reference — the starting checkpoint. Its log-probabilities of
every pair's chosen and rejected completion are a fixed function of (pairs, checkpoint, tokenization,
precision), so they are computed in one no-grad pass before training and stored in a safetensors file; the
training process never holds a second model (the policy *is* the reference until its first update). The
file is keyed by a SHA-256 over the pairs file's bytes, the checkpoint's weights and tokenizer digests,
`seq_len` (which decides truncation) and the precision; a cache whose key differs is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write_bytes, sha256_file
from .preference_data import PreferenceExample
from .preference_step import preference_logps

CACHE_FORMAT = "slmkit.reference_logps/1"


class ReferenceCacheError(ValueError):
    """A reference cache file that cannot be used."""


def reference_identity(pairs: str | Path, checkpoint: dict, *, seq_len: int, amp_dtype: torch.dtype | None) -> dict:
    """What the cached numbers depend on. `checkpoint` is a checkpoint identity (path, weights/tokenizer digests)."""
    return {"format": CACHE_FORMAT, "pairs_sha256": sha256_file(Path(pairs)),
            "weights_sha256": checkpoint["weights_sha256"], "tokenizer_sha256": checkpoint.get("tokenizer_sha256"),
            "seq_len": seq_len, "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"}


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_reference_cache(path: str | Path, identity: dict, num_pairs: int) -> torch.Tensor | None:
    """The cached (N, 2) log-probs if `path` holds a cache for exactly this identity, else None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != identity_key(identity):
                return None
            logps = f.get_tensor("logps")
    except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
        raise ReferenceCacheError(f"{path}: unreadable reference cache ({e}); delete it to recompute") from None
    if tuple(logps.shape) != (num_pairs, 2):
        raise ReferenceCacheError(f"{path}: holds {tuple(logps.shape)} log-probs for {num_pairs} pairs although "
                                  "its key matches; delete it to recompute")
    return logps


def build_reference_cache(path: str | Path, identity: dict, model: torch.nn.Module,
                          examples: list[PreferenceExample], *, batch_size: int, device: torch.device,
                          amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Run `model` (the reference) over every pair once and write (N, 2) summed log-probs of (chosen,
    rejected) to `path`. Returns them."""
    from safetensors.torch import save

    t0 = time.perf_counter()
    logps, ntoks = preference_logps(model, examples, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": identity_key(identity), "identity": json.dumps(identity, sort_keys=True),
            "seconds": f"{time.perf_counter() - t0:.2f}"}
    atomic_write_bytes(path, save({"logps": logps.contiguous(), "tokens": ntoks.contiguous()}, metadata=meta))
    return logps


def reference_logps(path: str | Path, identity: dict, model: torch.nn.Module, examples: list[PreferenceExample],
                    *, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, bool]:
    """(the (N, 2) reference log-probs, whether they came from the cache): read `path` when its key matches
    `identity`, otherwise compute them with `model` and (re)write `path`."""
    cached = read_reference_cache(path, identity, len(examples))
    if cached is not None:
        return cached, True
    return build_reference_cache(path, identity, model, examples, batch_size=batch_size, device=device,
                                 amp_dtype=amp_dtype), False
