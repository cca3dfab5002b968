import os

import pytest

from slmkit.data import DataError, SkipLog, iter_documents
from slmkit.data.sources import default_stdlib_files


def test_reads_files_dirs_globs_and_jsonl(corpus):
    skips = SkipLog()
    docs = list(iter_documents([str(corpus)], skips))
    ids = [d.id for d in docs]
    assert "code.py" in ids and "pkg/mod0.py" in ids
    assert "records.jsonl:1" in ids and "records.jsonl:5" in ids
    # JSONL records and files all in sorted-id order; records in line order within their file
    assert ids == sorted(ids, key=lambda i: (i.split(":")[0], int(i.split(":")[1]) if ":" in i else 0))
    reasons = {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in skips.entries}
    assert reasons == {
        "image.bin": "binary",
        "latin1.txt": "not utf-8",
        "broken_link.txt": "unreadable",
        "records.jsonl:2": "missing field",
        "records.jsonl:3": "missing field",
        "records.jsonl:4": "bad json",
    }
    assert skips.counts == {"binary": 1, "not utf-8": 1, "unreadable": 1, "missing field": 2, "bad json": 1}

    globbed = [d.id for d in iter_documents([str(corpus / "pkg" / "*.py")], SkipLog())]
    assert globbed == sorted(globbed) and "mod3.py" in globbed and len(globbed) == 9


def test_directory_named_like_a_file_and_permissions(tmp_path):
    (tmp_path / "x.txt").mkdir()  # a glob for *.txt matches it; it is walked, not read as a file
    (tmp_path / "x.txt" / "inner.txt").write_text("inner")
    (tmp_path / "ok.txt").write_text("fine")
    os.mkfifo(tmp_path / "pipe.txt")  # must be skipped, not block forever
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    try:
        skips = SkipLog()
        docs = {d.id: d.text for d in iter_documents([str(tmp_path / "*.txt")], skips)}
    finally:
        locked.chmod(0o600)
    assert docs["ok.txt"] == "fine" and docs["x.txt/inner.txt"] == "inner"
    assert "pipe.txt" not in docs
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        assert skips.counts == {"unreadable": 2} and "locked.txt" not in docs
    else:
        assert skips.counts == {"unreadable": 1}
    # a source that is a directory path ending in .txt is walked too
    assert [d.id for d in iter_documents([str(tmp_path / "x.txt")], SkipLog())] == ["inner.txt"]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does_not_exist"):
        iter_documents([str(tmp_path / "does_not_exist")], SkipLog())
    with pytest.raises(DataError, match="matched no files"):
        iter_documents([str(tmp_path / "*.nothing")], SkipLog())


def test_default_domain_excludes_tests():
    files = default_stdlib_files()
    ids = [i for i, _ in files]
    assert ids == sorted(ids) and len(ids) > 300
    assert "stdlib/os.py" in ids and "stdlib/json/__init__.py" in ids
    for i in ids:
        parts = i.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), i
        assert not parts[-1].startswith("test_"), i
    skips = SkipLog()
    first = next(iter(iter_documents([], skips)))
    assert first.id.startswith("pydoc/")
