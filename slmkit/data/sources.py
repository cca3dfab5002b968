"""Reading documents from files, directories, globs, JSONL files, and the default domain.

A *source* is a path (file or directory, read recursively) or a glob pattern. Every document gets a
stable id (path relative to its source root; ``<file>:<line>`` for JSONL records) and documents are
yielded in sorted-id order, so two runs over the same inputs see the same sequence. Whether a file is
text is decided by its content (no NUL byte in the first 8 KiB, valid UTF-8), never by its extension;
only ``.jsonl`` is special, because its records carry the text in a field.

Files that cannot be used (binary, unreadable, not UTF-8, bad JSONL lines) are reported through a
:class:`SkipLog`, never raised: a large corpus always has a few.

Memory stays flat and private data stays out by default:

- a file larger than ``max_file_bytes`` (default 64 MiB) is skipped as "too large" from its size alone, and
  the binary sniff reads only the first 8 KiB, so a stray disk image or database dump is never read whole.
  JSONL files are streamed record by record, so the limit applies to each record (line), not the file.
- hidden files and directories (``.env``, ``.netrc``, ``.npmrc``, ``.git/``, ``.venv/``) found while walking a
  directory are skipped as "hidden": they hold credentials and tool state, not domain text.
  ``include_hidden=True`` reads hidden *files*; hidden directories stay skipped (they are repositories and
  environments, not corpora) unless named as a source. A path named as a source, or matched by a glob
  whose pattern spells the leading dot (glob's own rule), is read whatever its name: the user asked for it.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError

DEFAULT_SOURCE_LABEL = "<default: python stdlib + pydoc topics>"
BINARY_SNIFF_BYTES = 8192
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # far above any source file or document; far below a dump or an image
MAX_SKIP_ENTRIES = 1000
# Path components that mark a test suite or non-stdlib code inside the stdlib directory.
_DEFAULT_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_GLOB_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class SkipLog:
    """Counts skipped inputs per reason; keeps the first ``MAX_SKIP_ENTRIES`` of them by name."""

    entries: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, path: str, reason: str, detail: str | None = None) -> None:
        self.counts[reason] += 1
        if len(self.entries) < MAX_SKIP_ENTRIES:
            entry = {"path": path, "reason": reason}
            if detail:
                entry["detail"] = detail
            self.entries.append(entry)

    def __len__(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class _Entry:
    """One file to read: ``id`` is its document id (or id prefix, for JSONL)."""

    id: str
    path: Path
    jsonl: bool


def _is_glob(source: str) -> bool:
    return any(c in _GLOB_MAGIC for c in source)


def _walk(root: Path, skips: SkipLog | None, include_hidden: bool) -> Iterator[Path]:
    """Every non-directory entry under ``root``, broken links included. Hidden directories are not entered
    and hidden files are left out unless ``include_hidden``; each is counted in ``skips`` as "hidden"."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        for d in sorted(d for d in dirnames if d.startswith(".")):
            if skips is not None:
                skips.add(str(Path(dirpath) / d), "hidden", "hidden directory, not entered; name it as a source "
                                                             "to read it")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") and not include_hidden:
                if skips is not None:
                    skips.add(str(Path(dirpath) / name), "hidden", "hidden file (often credentials); "
                                                                   "--include-hidden reads it")
                continue
            yield Path(dirpath) / name


def _entry(path: Path, root: Path) -> _Entry:
    rel = path.relative_to(root).as_posix() if path != root else path.name
    return _Entry(id=rel, path=path, jsonl=path.name.endswith(".jsonl"))


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of ``pattern`` without glob magic (ids are relative to it)."""
    parts = Path(pattern).parts
    root_parts = []
    for part in parts:
        if _is_glob(part):
            break
        root_parts.append(part)
    return Path(*root_parts) if root_parts else Path(".")


def collect_entries(sources: list[str], skips: SkipLog | None = None, *, include_hidden: bool = False) -> list[_Entry]:
    """Expand sources to files, sorted by document id. Raise DataError for a missing path. Hidden files
    met while walking a directory are left out (and counted in ``skips``) unless ``include_hidden``."""
    entries: list[_Entry] = []
    for source in sources:
        source = str(source)
        if _is_glob(source) and not os.path.lexists(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise DataError(f"source pattern {source!r} matched no files; check the pattern or quote it")
            root = _glob_root(source)
            for match in matches:
                p = Path(match)
                if p.is_dir() and not p.is_symlink():
                    entries.extend(_entry(f, root) for f in _walk(p, skips, include_hidden))
                else:
                    entries.append(_entry(p, root))
            continue
        p = Path(source)
        if not os.path.lexists(p):
            raise DataError(f"source {source!r} does not exist; pass files, directories or glob patterns")
        if p.is_dir():
            entries.extend(_entry(f, p) for f in _walk(p, skips, include_hidden))
        else:
            entries.append(_Entry(id=p.name, path=p, jsonl=p.name.endswith(".jsonl")))
    # Sort by id; the path breaks ties between equal ids from different sources.
    entries.sort(key=lambda e: (e.id, str(e.path)))
    return entries


def _too_large_detail(size: int | str, limit: int) -> str:
    return f"{size} bytes, over the {limit}-byte limit (raise it with --max-file-bytes / max_file_bytes)"


def read_text_file(path: Path, skips: SkipLog, display: str,
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """The file's text, or None (and a skip entry) when it is too large, binary, unreadable or not UTF-8.
    Never holds more than ``max_file_bytes + 1`` bytes of it: the size is checked before reading and the
    binary sniff reads only the head."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            skips.add(display, "unreadable", "not a regular file")
            return None
        if st.st_size > max_file_bytes:
            skips.add(display, "too large", _too_large_detail(st.st_size, max_file_bytes))
            return None
        with open(path, "rb") as f:
            head = f.read(BINARY_SNIFF_BYTES)
            if b"\x00" in head:
                skips.add(display, "binary")
                return None
            # Bounded even here: the file may have grown since the stat (a live log).
            data = head + f.read(max(max_file_bytes + 1 - len(head), 0))
    except OSError as e:
        skips.add(display, "unreadable", f"{type(e).__name__}: {e.strerror or e}")
        return None
    if len(data) > max_file_bytes:
        skips.add(display, "too large", _too_large_detail(f"more than {max_file_bytes}", max_file_bytes))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skips.add(display, "not utf-8")
        return None


def _bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of binary file ``f``; None for a line longer than ``limit`` bytes, which is consumed in
    chunks and never held whole (one runaway line must not cost its size in memory)."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            while chunk := f.readline(1 << 20):
                if chunk.endswith(b"\n"):
                    break
            yield None
        else:
            yield raw


def _read_jsonl(entry: _Entry, text_field: str, skips: SkipLog,
                max_record_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Document]:
    try:
        if not stat.S_ISREG(os.stat(entry.path).st_mode):  # a FIFO or device would block or never end
            skips.add(str(entry.path), "unreadable", "not a regular file")
            return
        f = open(entry.path, "rb")
    except OSError as e:
        skips.add(str(entry.path), "unreadable", f"{type(e).__name__}: {e.strerror or e}")
        return
    with f:
        for lineno, raw in enumerate(_bounded_lines(f, max_record_bytes + 1), start=1):  # +1: the newline
            where = f"{entry.path}:{lineno}"
            if raw is None:
                skips.add(where, "too large", _too_large_detail(f"more than {max_record_bytes}", max_record_bytes))
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skips.add(where, "not utf-8")
                continue
            except json.JSONDecodeError:
                skips.add(where, "bad json")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add(where, "missing field", f"no string field {text_field!r}")
                continue
            yield Document(id=f"{entry.id}:{lineno}", text=text)


def iter_documents(sources: list[str], skips: SkipLog, *, text_field: str = "text",
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, include_hidden: bool = False) -> Iterator[Document]:
    """Documents of ``sources`` in sorted-id order (JSONL records in line order within their file).

    Sources are expanded eagerly, so a missing path raises DataError here, before anything is read.
    ``sources == []`` means the default domain. Files over ``max_file_bytes`` (JSONL: records over it) are
    skipped as "too large"; hidden files inside directories as "hidden" unless ``include_hidden``.
    """
    if max_file_bytes <= 0:
        raise DataError(f"max_file_bytes={max_file_bytes} must be positive")
    if not sources:
        return iter_default_documents(skips, max_file_bytes=max_file_bytes)
    entries = collect_entries(sources, skips, include_hidden=include_hidden)
    return _iter_entries(entries, skips, text_field, max_file_bytes)


def _iter_entries(entries: list[_Entry], skips: SkipLog, text_field: str,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Document]:
    for entry in entries:
        if entry.jsonl:
            yield from _read_jsonl(entry, text_field, skips, max_file_bytes)
        else:
            text = read_text_file(entry.path, skips, str(entry.path), max_file_bytes)
            if text is not None:
                yield Document(id=entry.id, text=text)


def default_stdlib_files() -> list[tuple[str, Path]]:
    """(id, path) of every non-test ``.py`` file of this interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _DEFAULT_EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _DEFAULT_EXCLUDED_DIRS.intersection(rel.parts[:-1]):
                continue
            found.append(("stdlib/" + rel.as_posix(), path))
    found.sort()
    return found


def iter_default_documents(skips: SkipLog, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Document]:
    """The default domain: pydoc topic texts and the standard library's source, in sorted-id order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    # "pydoc/..." sorts before "stdlib/...", so yielding topics first keeps the global id order.
    for name in sorted(topics):
        yield Document(id=f"pydoc/{name}", text=topics[name])
    for doc_id, path in default_stdlib_files():
        text = read_text_file(path, skips, str(path), max_file_bytes)
        if text is not None:
            yield Document(id=doc_id, text=text)
