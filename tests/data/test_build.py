import hashlib
import json

import pytest

from slmkit.data import DataError, build_dataset, open_dataset, split_of, token_byte_lengths


def test_meta_accounting(built, corpus):
    meta, out = built
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["format"] == "slmkit.dataset/1" and meta["sources"] == [str(corpus)]
    assert meta["dedup_removed"] == 2  # copy_of_code.py and crlf_copy.md (equal after cleaning)
    assert meta["empty_removed"] == 1  # blank.txt
    assert meta["skipped_counts"] == {"binary": 1, "not utf-8": 1, "unreadable": 1, "missing field": 2, "bad json": 1}
    assert {e["path"].rsplit("/", 1)[-1] for e in meta["skipped"]} >= {"image.bin", "records.jsonl:4"}
    # 13 kept documents: code.py, notes.md, windows.txt, 8 modules, 2 JSONL records
    assert meta["documents"] == 13 == sum(s["documents"] for s in meta["splits"].values())
    assert meta["tokens"] == sum(s["tokens"] for s in meta["splits"].values())
    assert meta["bytes"] == sum(s["bytes"] for s in meta["splits"].values())
    assert meta["pii"] is None
    tok_bytes = (out / "tokenizer.json").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok_bytes).hexdigest()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_split_is_stable_and_order_independent():
    ids = [f"doc/{i}.py" for i in range(2000)]
    a = {i: split_of(i, 0.1) for i in ids}
    b = {i: split_of(i, 0.1) for i in reversed(ids)}
    assert a == b
    frac = sum(v == "val" for v in a.values()) / len(ids)
    assert 0.07 < frac < 0.13
    h = int.from_bytes(hashlib.sha256(b"doc/0.py").digest()[:8], "big") / 2**64
    assert split_of("doc/0.py", 0.1) == ("val" if h < 0.1 else "train")


def test_rebuild_is_reproducible_and_tokenizer_reuse(built, tmp_path):
    meta, out = built
    again = build_dataset(meta["sources"], tmp_path / "again", vocab_size=320, min_frequency=1,
                          val_fraction=0.2, progress=False, shard_tokens=97)
    assert again["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert again["splits"] == meta["splits"]
    for s in meta["splits"]["train"]["shards"]:
        assert (tmp_path / "again" / s["file"]).read_bytes() == (out / s["file"]).read_bytes()
    reused = build_dataset(meta["sources"], tmp_path / "reused", tokenizer=out, val_fraction=0.2,
                           progress=False)
    assert reused["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert reused["tokens"] == meta["tokens"] and reused["tokenizer_source"] == str(out)
    assert (tmp_path / "reused" / "tokenizer_config.json").read_bytes() == (out / "tokenizer_config.json").read_bytes()


def test_reuse_foreign_tokenizer_without_config(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["</s>"])
    path = tmp_path / "foreign.json"
    tok.save(str(path))
    meta = build_dataset([str(corpus / "code.py"), str(corpus / "notes.md")], tmp_path / "f", tokenizer=path,
                         val_fraction=0.5, progress=False)
    assert meta["eos_token_id"] == vocab["</s>"] and meta["bos_token_id"] is None
    cfg = json.loads((tmp_path / "f" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "</s>"
    del vocab["</s>"]
    no_eos = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    no_eos.save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match="no end-of-sequence token"):
        build_dataset([str(corpus / "code.py")], tmp_path / "g", tokenizer=tmp_path / "noeos.json", progress=False)


def test_autotokenizer_matches(built):
    transformers = pytest.importorskip("transformers")
    _, out = built
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    raw = open_dataset(out).tokenizer()
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for text in ["héllo wörld 日本語 🙂", "def f(x):\n\treturn x  # c\n", "  two leading spaces", "a<|end|>b"]:
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert hf.decode(ids) == text
    chat = hf.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    assert chat == "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert hf.convert_tokens_to_ids("<|assistant|>") == 5


def test_pii_scrub_in_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("mail me at jane@example.org or call 555-123-4567 from 10.0.0.1\n" * 3)
    (src / "b.py").write_text('API_KEY = "d41d8cd98f00b204e9800998ecf8427e"\ncard = "4111 1111 1111 1111"\n')
    meta = build_dataset([str(src)], tmp_path / "o", vocab_size=280, min_frequency=1, scrub_pii=True,
                         val_fraction=0.1, progress=False)
    assert meta["pii"] == {"email": 3, "phone": 3, "ip": 3, "card": 1, "secret": 1}
    ds = open_dataset(tmp_path / "o")
    tok = ds.tokenizer()
    text = "".join(tok.decode(ds.split(s).window(0, len(ds.split(s))).tolist()) for s in ("train", "val"))
    assert "jane@" not in text and "<EMAIL>" in text and "<SECRET>" in text and "4111" not in text


def test_val_forced_and_empty_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"document number {i}\n")
    meta = build_dataset([str(src)], tmp_path / "o", vocab_size=280, val_fraction=1e-9, progress=False)
    assert meta["splits"]["val"]["documents"] == 1 and meta["val_forced"] is not None
    smallest = min(["0.txt", "1.txt", "2.txt"], key=lambda i: hashlib.sha256(i.encode()).digest()[:8])
    assert meta["val_forced"] == smallest

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.md").write_text("  \n")
    (empty / "bin.dat").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="no documents found.*binary"):
        build_dataset([str(empty)], tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset([str(tmp_path / "missing")], tmp_path / "m", progress=False)
    with pytest.raises(DataError, match="vocab_size"):
        build_dataset([str(src)], tmp_path / "v", vocab_size=100, progress=False)


def test_default_domain_small(tmp_path):
    meta = build_dataset([], tmp_path / "d", vocab_size=512, max_bytes=300_000, progress=False)
    assert meta["sources"] == ["<default: python stdlib + pydoc topics>"] and meta["truncated"]
    assert 300_000 <= meta["bytes"] < 1_500_000 and meta["splits"]["val"]["documents"] >= 1
    ds = open_dataset(tmp_path / "d")
    lengths = token_byte_lengths(ds.tokenizer())
    for name in ("train", "val"):
        s = ds.split(name)
        assert int(lengths[s.window(0, len(s))].sum()) == s.bytes


def _corpus_with_secrets_and_a_dump(root):
    from tests.data.conftest import CODE, PROSE

    root.mkdir()
    (root / "code.py").write_text(CODE)
    (root / "notes.md").write_text(PROSE * 4)
    (root / ".env").write_text("DATABASE_PASSWORD=hunter2\n" + PROSE)
    with open(root / "dump.txt", "wb") as f:  # text head, then a 1 GiB hole: no disk, no memory
        f.write(PROSE.encode() * 100)
        f.truncate(2**30)
    return root


def test_slm_data_skips_hidden_and_large_files_and_its_flags_include_them(tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app

    src = _corpus_with_secrets_and_a_dump(tmp_path / "src")
    common = ["data", str(src), "--vocab-size", "300", "--val-fraction", "0"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["skipped_counts"] == {"hidden": 1, "too large": 1} and meta["documents"] == 2
    assert "hidden: 1" in r.output and "too large: 1" in r.output
    assert "hunter2" not in (tmp_path / "a" / "tokenizer.json").read_text()

    # notes.md (~700 bytes) is over a 500-byte limit; code.py and .env are under it
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b"), "--include-hidden",
                                 "--max-file-bytes", "500"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["skipped_counts"] == {"too large": 2} and meta["documents"] == 2
    assert meta["include_hidden"] is True and meta["max_file_bytes"] == 500


def test_slm_data_default_file_limit_is_the_library_default():
    import inspect

    from slmkit.commands.data import data
    from slmkit.data.sources import DEFAULT_MAX_FILE_BYTES

    assert inspect.signature(data).parameters["max_file_bytes"].default.default == DEFAULT_MAX_FILE_BYTES
    with pytest.raises(DataError, match="max_file_bytes=-1"):
        build_dataset([], "unused", max_file_bytes=-1)
