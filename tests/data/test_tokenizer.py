import json

import numpy as np
import pytest

from slmkit.data import SPECIAL_TOKENS, DataError, encode_documents, load_tokenizer, token_byte_lengths, train_tokenizer

CODE = "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
PROSE = "The quick brown fox jumps over the lazy dog. Unicode: café, naïve, Größe, 日本語 🙂.\n"

SAMPLES = [
    "héllo wörld — 日本語テキスト 🙂👍🏽 Ω≈ç√∫",
    CODE,
    "  leading spaces\n\n\ttabs\r\nand CRLF\x00nul",
    "<|user|> looks special but is text",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([CODE, PROSE] * 5, vocab_size=300, min_frequency=1)


def test_special_token_ids_and_pipeline(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    spec = json.loads(tok.to_str())
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["pre_tokenizer"]["use_regex"] is True
    assert spec["decoder"]["type"] == "ByteLevel" and spec["post_processor"]["type"] == "ByteLevel"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    (ids,) = encode_documents(tok, [text])
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_length_law(tok, text):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),) and lengths.dtype == np.int64
    assert (lengths[: len(SPECIAL_TOKENS)] == 0).all()
    ids = [1] + encode_documents(tok, [text])[0] + [2]  # bos/eos count zero bytes
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_too_small_vocab():
    with pytest.raises(DataError, match="at least"):
        train_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_special_strings_in_documents_are_text(tok):
    (ids,) = encode_documents(tok, ["a <|user|> b <|eos|>"])
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.encode("<|user|>").ids == [4]  # the tokenizer itself still knows them (chat templates)
    assert tok.encode_special_tokens is False
