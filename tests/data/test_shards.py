import json

import numpy as np
import pytest

from slmkit.data import DataError, open_dataset, token_byte_lengths
from slmkit.data.shards import ShardWriter, TokenStream


def test_writer_and_window_across_shards(tmp_path):
    w = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=7)
    docs = [np.arange(i * 10, i * 10 + n) for i, n in enumerate([3, 9, 1, 12, 5])]
    for d in docs:
        w.add_document(d, nbytes=len(d))
    entry = w.close()
    every = np.concatenate(docs)
    assert entry["tokens"] == every.size == 30 and entry["documents"] == 5
    assert [s["tokens"] for s in entry["shards"]] == [7, 7, 7, 7, 2]
    assert not list(tmp_path.glob("train/*.tmp"))
    stream = TokenStream(tmp_path, "train", entry, np.uint16)
    assert len(stream) == 30
    for start in range(30):
        for length in (0, 1, 6, 7, 8, 15, 30 - start):
            if start + length <= 30:
                got = stream.window(start, length)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, every[start : start + length])
    with pytest.raises(IndexError):
        stream.window(25, 6)


def test_built_dataset_reads_back(built):
    meta, out = built
    ds = open_dataset(out)
    assert ds.meta == meta and ds.vocab_size == meta["vocab_size"] <= 320
    assert meta["dtype"] == "uint16" and (ds.bos_token_id, ds.eos_token_id, ds.pad_token_id) == (1, 2, 0)
    train = ds.split("train")
    assert len(train.__dict__["_arrays"]) > 1  # forced multiple shards with shard_tokens=97
    assert isinstance(train._arrays[0], np.memmap) and not train._arrays[0].flags.writeable
    every = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["splits"]["train"]["shards"]])
    np.testing.assert_array_equal(train.window(90, 20), every[90:110])  # crosses 97
    # every document is bos ... eos, and token byte lengths add up to the split's UTF-8 bytes
    assert every[0] == 1 and every[-1] == 2 and (every == 1).sum() == meta["splits"]["train"]["documents"]
    lengths = token_byte_lengths(ds.tokenizer())
    for name in ("train", "val"):
        s = ds.split(name)
        assert int(lengths[s.window(0, len(s))].sum()) == s.bytes == meta["splits"][name]["bytes"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_datasets_are_clear_errors(built, tmp_path):
    meta, out = built
    with pytest.raises(DataError, match="does not exist.*slm data"):
        open_dataset(tmp_path / "nope")
    d = _copy(out, tmp_path / "no_meta")
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing.*slm data"):
        open_dataset(d)
    d = _copy(out, tmp_path / "truncated")
    shard = d / meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    expected = meta["splits"]["train"]["shards"][0]["tokens"] * 2
    with pytest.raises(DataError, match=rf"000000.bin has {expected - 3} bytes, expected {expected}"):
        open_dataset(d)
    d = _copy(out, tmp_path / "missing_shard")
    (d / meta["splits"]["val"]["shards"][0]["file"]).unlink()
    with pytest.raises(DataError, match="val/000000.bin is missing"):
        open_dataset(d)
    d = _copy(out, tmp_path / "wrong_format")
    (d / "meta.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(DataError, match="other/9"):
        open_dataset(d)
