"""Data pipeline: sources -> cleaning/PII scrub -> byte-level BPE tokenizer -> memory-mapped token shards.

Build with :func:`build_dataset`; read with :func:`open_dataset` (``Dataset.split("val").window(...)``);
:func:`token_byte_lengths` gives the per-token byte counts that make bits-per-byte exact;
:func:`check_same_tokenizer` refuses a dataset whose ids were made by another tokenizer than a model's.
"""

from .build import build_dataset, split_of
from .clean import clean_text, luhn_valid, scrub_pii
from .errors import DataError, TokenizerMismatchError
from .shards import FORMAT, Dataset, TokenStream, check_same_tokenizer, open_dataset, token_dtype
from .sources import DEFAULT_SOURCE_LABEL, Document, SkipLog, iter_documents
from .tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    special_token_ids,
    token_byte_lengths,
    tokenizer_vocab_size,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SOURCE_LABEL",
    "FORMAT",
    "SPECIAL_TOKENS",
    "DataError",
    "Dataset",
    "Document",
    "SkipLog",
    "TokenStream",
    "TokenizerMismatchError",
    "build_dataset",
    "check_same_tokenizer",
    "clean_text",
    "encode_documents",
    "iter_documents",
    "load_tokenizer",
    "luhn_valid",
    "open_dataset",
    "scrub_pii",
    "special_token_ids",
    "split_of",
    "token_byte_lengths",
    "token_dtype",
    "tokenizer_vocab_size",
    "train_tokenizer",
]
