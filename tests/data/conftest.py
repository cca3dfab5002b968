"""Tiny corpora for the data-pipeline tests (built in tmp dirs, a few KiB each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CODE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        return f"Hello, {self.name}!"
'''

PROSE = (
    "The quick brown fox jumps over the lazy dog. Unicode: café, naïve, Größe, 日本語, emoji 🙂.\n"
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.\n"
)


def make_corpus(root: Path) -> Path:
    """A directory with good, duplicate, binary, latin-1, unreadable and JSONL inputs."""
    src = root / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "code.py").write_text(CODE, encoding="utf-8")
    (src / "notes.md").write_text("# Notes\n\n" + PROSE * 3, encoding="utf-8")
    (src / "windows.txt").write_bytes(("line one\r\nline two\r\n" + PROSE).encode("utf-8"))
    for i in range(8):
        (src / "pkg" / f"mod{i}.py").write_text(CODE.replace("fibonacci", f"fib_{i}") + f"\nVALUE = {i}\n", encoding="utf-8")
    (src / "pkg" / "copy_of_code.py").write_text(CODE, encoding="utf-8")  # exact duplicate
    (src / "crlf_copy.md").write_bytes(("# Notes\r\n\r\n" + PROSE * 3).replace("\n", "\r\n").replace("\r\r", "\r").encode())
    (src / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    (src / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    (src / "broken_link.txt").symlink_to(src / "does_not_exist.txt")
    rows = [{"text": "first json record about Python lists"}, "not an object", {"body": "no text field"}]
    lines = [json.dumps(r) for r in rows] + ["{bad json", json.dumps({"text": "second json record, dicts"})]
    (src / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def built(tmp_path_factory, corpus):
    """One small dataset shared by the read-side tests: (meta, out_dir)."""
    from slmkit.data import build_dataset

    out = tmp_path_factory.mktemp("ds") / "ds"
    meta = build_dataset([str(corpus)], out, vocab_size=320, min_frequency=1, val_fraction=0.2,
                         progress=False, shard_tokens=97)
    return meta, out
