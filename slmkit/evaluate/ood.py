"""The `ood` task: bits per byte on English prose outside the domain, to show what specialisation costs.

A model made small for one domain (Python code, contracts, tickets) gets worse at everything else; the `lm`
task cannot show that, since it scores the domain's own held-out split. This task scores text that ships on
every machine slmkit runs on and that no domain corpus is likely to hold: licence texts written in plain
English — the running Python's `LICENSE.txt` (its history and the PSF licence; not part of the default
domain, which reads only `.py` files and pydoc topics) and, where present, Debian's
`/usr/share/common-licenses/*` (Apache, GPL, MPL, ...).

The text is the same for every model, whatever its tokenizer: files are read in a fixed order (Python's
licence, then the common licences by name; a file met twice through a link or with the same content counts
once) and cut at a byte budget (at the last line end inside it), not at a token count, so a teacher and a
candidate whose vocabulary was trimmed score exactly the same bytes. Each file is tokenized alone as the
dataset builder does (`[bos] + ids + [eos]`) with the model's own tokenizer, and scored in windows by the
same function as `lm` (`slmkit.evaluate.lm.evaluate_lm`). The result names the files used and their bytes.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import numpy as np

DEFAULT_MAX_BYTES = 65536  # about 16k tokens at ~4 bytes per token (SmolLM2's tokenizer on English prose)
COMMON_LICENSES = Path("/usr/share/common-licenses")


def candidate_files() -> list[Path]:
    """Where out-of-domain prose is looked for, in the order it is read."""
    python = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"]
    common = sorted(COMMON_LICENSES.iterdir()) if COMMON_LICENSES.is_dir() else []
    return [*python, *common]


def prose_files() -> list[tuple[Path, str]]:
    """(path, text) of every readable, non-empty UTF-8 prose file found, each content once, in reading order."""
    found, seen_paths, seen_text = [], set(), set()
    for path in candidate_files():
        try:
            real = path.resolve()
            if real in seen_paths or not real.is_file():
                continue
            text = real.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if not text.strip() or digest in seen_text:
            continue
        seen_paths.add(real)
        seen_text.add(digest)
        found.append((path, text.replace("\r\n", "\n")))
    return found


def prose_texts(max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[Path, str]]:
    """The files and texts scored: whole files in reading order, the last one cut at the last line end that
    keeps the total within `max_bytes` (UTF-8)."""
    from .tasks import TaskError

    files = prose_files()
    if not files:
        looked = ", ".join(str(p) for p in candidate_files()[:2]) + f", {COMMON_LICENSES}/*"
        raise TaskError(f"the ood task found no out-of-domain English prose on this machine (looked for {looked}); "
                        "install a Python that ships LICENSE.txt or Debian's base-files (common-licenses), or "
                        "drop `ood` from the task list")
    chosen, left = [], max_bytes
    for path, text in files:
        data = text.encode("utf-8")
        if len(data) > left:
            cut = data[:left]
            end = cut.rfind(b"\n")
            data = cut[:end + 1] if end >= 0 else b""
        if data:
            chosen.append((path, data.decode("utf-8", errors="ignore")))
            left -= len(data)
        if left <= 0 or len(data) < len(text.encode("utf-8")):
            break
    return chosen


class _Tokens:
    """The window interface `evaluate_lm` reads (len and window) over token ids held in memory."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.ids[start:start + length]


def ood_stream(tokenizer, texts: list[str], bos_id: int | None, eos_id: int | None) -> _Tokens:
    """`[bos] + ids + [eos]` per text, concatenated (the dataset builder's layout)."""
    from ..data import encode_documents

    ids: list[int] = []
    for doc in encode_documents(tokenizer, texts):
        ids += ([bos_id] if bos_id is not None else []) + doc + ([eos_id] if eos_id is not None else [])
    return _Tokens(np.asarray(ids, dtype=np.int64))


def score_ood(model, tokenizer, *, seq_len: int, max_bytes: int = DEFAULT_MAX_BYTES, autocast_dtype=None,
              progress=None) -> dict:
    """Bits per byte (and perplexity, top-1 accuracy, tokens, bytes) on the out-of-domain prose, with the
    files used and the bytes taken from each."""
    from ..data import token_byte_lengths
    from .lm import evaluate_lm, lm_windows

    chosen = prose_texts(max_bytes)
    stream = ood_stream(tokenizer, [t for _, t in chosen], model.config.bos_token_id, model.config.eos_token_id)
    advance = progress("ood (out-of-domain prose bits/byte)", lm_windows(len(stream), seq_len, None)) \
        if progress is not None else None
    res = evaluate_lm(model, stream, token_byte_lengths(tokenizer), seq_len=seq_len, max_tokens=None,
                      autocast_dtype=autocast_dtype, progress=advance)
    return {**res, "max_bytes": max_bytes,
            "files": [{"path": str(p), "bytes": len(t.encode("utf-8"))} for p, t in chosen]}
