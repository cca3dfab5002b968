"""Byte-level BPE tokenizer: training, loading, the HF ``tokenizer_config.json``, byte lengths.

The tokenizer is GPT-2 style byte-level BPE (no normaliser, GPT-2 pre-tokenizer regex, no prefix
space), because that is what llama.cpp's ``gpt-2`` pre-tokenizer reproduces for GGUF export and what
``transformers.PreTrainedTokenizerFast`` loads from a ``tokenizer.json`` without custom code. Every
byte is in the initial alphabet, so any UTF-8 text encodes with no unknown token and decodes back
to itself exactly.

``token_byte_lengths`` is what makes bits-per-byte exact: each token of a byte-level vocabulary stands
for a fixed number of UTF-8 bytes (its string is one alphabet character per byte), so the byte count
of a document is the sum of its tokens' lengths, with special tokens counting zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .errors import DataError

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD, BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
# Names other tokenizers use for the same roles, most specific first.
BOS_CANDIDATES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
EOS_CANDIDATES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def new_byte_level_bpe() -> Tokenizer:
    """An untrained tokenizer with the slmkit pipeline (see the module docstring)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    length: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on ``texts``; special tokens get ids 0..6 in ``SPECIAL_TOKENS`` order."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {MIN_VOCAB_SIZE}"
        )
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} did not get id {i}"
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` names (the file itself or the one inside a directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"no tokenizer.json at {path}: pass a tokenizer.json file or a directory containing one")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory containing one."""
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{p} is not a valid tokenizer.json: {e}") from e


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Number of ids (largest id + 1, added tokens included); the embedding table's row count."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_ids(tok: Tokenizer, config: dict | None = None) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "pad": id}`` from a tokenizer_config dict, else by common names.

    Missing roles are None; the caller decides which are required (eos is, for documents).
    """
    config = config or {}
    found: dict[str, int | None] = {}
    for role, candidates in (("bos", BOS_CANDIDATES), ("eos", EOS_CANDIDATES), ("pad", PAD_CANDIDATES)):
        name = _token_name(config.get(f"{role}_token"))
        token_id = tok.token_to_id(name) if name else None
        if token_id is None:
            token_id = next((tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None), None)
        found[role] = token_id
    return found


def tokenizer_config(
    tok: Tokenizer, ids: dict[str, int | None], *, model_max_length: int = 2048
) -> dict:
    """The ``tokenizer_config.json`` that lets ``AutoTokenizer.from_pretrained`` load the directory."""
    names = {role: (tok.id_to_token(i) if i is not None else None) for role, i in ids.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["pad"] if names["pad"] is not None else names["eos"],
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """int64 array (vocab_size,): UTF-8 bytes each id decodes to; added/special tokens count 0.

    For a byte-level vocabulary each character of a token string is one byte. Tokens of other
    vocabularies (e.g. an imported SentencePiece-style tokenizer) fall back to the length of
    decoding the token alone, which is exact for most of them but not guaranteed to add up.
    """
    lengths = np.zeros(tokenizer_vocab_size(tok), dtype=np.int64)
    added = set(tok.get_added_tokens_decoder())
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if i in added:
            continue
        if all(c in _BYTE_ALPHABET for c in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of raw document texts (``encode_batch``: multithreaded), without bos/eos.

    Special-token strings that occur in a document (``"<|user|>"`` inside code or a chat log) are
    encoded as the text they are, not as control tokens: a corpus must not be able to inject them,
    and it keeps ``token_byte_lengths`` exact. Evaluation code that re-encodes raw text should use
    this function too.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        # encode_batch_fast skips offset tracking (~30% faster here); fall back on older tokenizers.
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = previous
