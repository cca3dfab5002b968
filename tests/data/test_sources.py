import json
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


# -- flat memory: size limit and a head-only binary sniff ------------------------------------------------------

def _sparse(path, size, head=b""):
    """A file of `size` bytes that takes no disk: `head`, then a hole (zeros) up to `size`."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _peak_bytes_while(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_over_the_size_limit_is_skipped_as_too_large(tmp_path):
    from slmkit.data.sources import DEFAULT_MAX_FILE_BYTES

    (tmp_path / "small.md").write_text("kept\n")
    # Text for the first 8 KiB (so the binary sniff alone would not catch it), then a hole past the limit.
    _sparse(tmp_path / "dump.sql", DEFAULT_MAX_FILE_BYTES + 1, b"INSERT INTO t VALUES (1);\n" * 400)
    skips = SkipLog()
    docs = {d.id for d in iter_documents([str(tmp_path)], skips)}
    assert docs == {"small.md"} and skips.counts == {"too large": 1}
    (entry,) = skips.entries
    assert entry["path"].endswith("dump.sql") and "--max-file-bytes" in entry["detail"]

    skips = SkipLog()  # the limit is the caller's
    docs = {d.id for d in iter_documents([str(tmp_path)], skips, max_file_bytes=4)}
    assert docs == set() and skips.counts == {"too large": 2}
    with pytest.raises(DataError, match="max_file_bytes=0"):
        iter_documents([str(tmp_path)], SkipLog(), max_file_bytes=0)


def test_a_huge_file_is_never_read(tmp_path):
    _sparse(tmp_path / "disk.img", 8 * 2**30, b"looks like text\n" * 1000)  # 8 GiB, no disk used
    skips = SkipLog()
    docs, peak = _peak_bytes_while(lambda: list(iter_documents([str(tmp_path)], skips)))
    assert docs == [] and skips.counts == {"too large": 1} and peak < 2**20


def test_the_binary_sniff_reads_only_the_head(tmp_path):
    _sparse(tmp_path / "zeros.db", 48 * 2**20)  # under the size limit, NUL from the first byte
    skips = SkipLog()
    docs, peak = _peak_bytes_while(lambda: list(iter_documents([str(tmp_path)], skips)))
    assert docs == [] and skips.counts == {"binary": 1} and peak < 2**20


def test_a_jsonl_record_over_the_limit_is_skipped_without_holding_it(tmp_path):
    records = [{"text": "short one"}, {"text": "x" * 5000}, {"text": "short two"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    skips = SkipLog()
    docs = [d.text for d in iter_documents([str(tmp_path / "r.jsonl")], skips, max_file_bytes=1000)]
    assert docs == ["short one", "short two"]
    assert skips.counts == {"too large": 1} and skips.entries[0]["path"].endswith("r.jsonl:2")


# -- privacy: hidden files ---------------------------------------------------------------------------------

def _repo_with_secrets(root):
    (root / "sub").mkdir(parents=True)
    (root / "README.md").write_text("# project\n")
    (root / "sub" / "code.py").write_text("x = 1\n")
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=abc\n")
    (root / ".netrc").write_text("machine example.com login me password hunter2\n")
    (root / "sub" / ".npmrc").write_text("//registry.npmjs.org/:_authToken=npm_abc\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    return root


def test_hidden_files_are_skipped_and_counted(tmp_path):
    root = _repo_with_secrets(tmp_path / "repo")
    skips = SkipLog()
    docs = {d.id for d in iter_documents([str(root)], skips)}
    assert docs == {"README.md", "sub/code.py"}
    assert skips.counts == {"hidden": 4}  # three files and the .git directory
    assert {e["path"].rsplit("/", 1)[-1] for e in skips.entries} == {".env", ".netrc", ".npmrc", ".git"}


def test_include_hidden_reads_hidden_files_but_not_hidden_directories(tmp_path):
    root = _repo_with_secrets(tmp_path / "repo")
    skips = SkipLog()
    docs = {d.id for d in iter_documents([str(root)], skips, include_hidden=True)}
    assert docs == {"README.md", "sub/code.py", ".env", ".netrc", "sub/.npmrc"}
    assert skips.counts == {"hidden": 1} and skips.entries[0]["path"].endswith(".git")


def test_a_hidden_path_named_explicitly_is_read(tmp_path):
    root = _repo_with_secrets(tmp_path / "repo")
    skips = SkipLog()
    docs = {d.id for d in iter_documents([str(root / ".env"), str(root / ".git")], skips)}
    assert docs == {".env", "config"} and not skips.counts
