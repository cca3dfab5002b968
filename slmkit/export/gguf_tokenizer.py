"""A Hugging Face `tokenizer.json` rebuilt from the vocabulary a GGUF file carries.

A GGUF holds a byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) as three arrays — token strings,
token types and merges — plus special-token ids and one name, `tokenizer.ggml.pre`, for the rule that splits
text into words before BPE runs. llama.cpp (llama-vocab.cpp) maps each name to a fixed list of regexes; the
same split is built here from `tokenizers` pre-tokenizers, so the rebuilt tokenizer produces the ids llama.cpp
produces, which are the ids the model was trained on:

- `gpt-2`: GPT-2's regex -> ByteLevel(use_regex=True).
- `llama-bpe` (also `llama3`, `llama-v3`): the Llama-3 regex, and a whole word found in the vocabulary is
  emitted without merging -> Split(Llama-3 regex), ByteLevel, BPE(ignore_merges=True). llama.cpp also
  prepends bos for this name unless the file says otherwise.
- `qwen2`: the Qwen2 regex (digits one at a time) -> Split(Qwen2 regex), ByteLevel.
- `smollm`: `\\p{N}` (every digit alone), then GPT-2's regex -> Split(\\p{N}), ByteLevel(use_regex=True).

`smollm` is the split of SmolLM's own tokenizer.json (Digits(individual_digits) + ByteLevel), which llama.cpp
shares with StarCoder. transformers' GGUF loader (5.x) gives `smollm` files GPT-2's split without the digit
step; both agree on every text except where two or more whitespace characters precede a digit (an indented
line starting with a number: `"\\n    0"`), where this tokenizer follows llama.cpp and the original.

Any other name is refused: another model's regex would tokenize most text the same and some text
differently, and the model would silently see token sequences it was never trained on.

Control tokens (type 3) become special added tokens and user-defined tokens (type 4) plain added tokens,
matched whole in text as llama.cpp does; the bos/eos/pad/unk tokens are special as well. No post-processor
adds bos: slmkit prepends `bos_token_id` itself when the model has one (see `gguf_import`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .gguf import LLAMA3_REGEX, QWEN2_REGEX

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class GGUFTokenizerError(ValueError):
    """A GGUF vocabulary that cannot be rebuilt as a tokenizer.json without guessing."""


@dataclass
class GGUFVocabulary:
    """The tokenizer keys of a GGUF file, as read (ids are None where the file has no such key)."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool | None = None
    chat_template: str | None = None


def _byte_level(split_regex: str | None = None, *, digits_first: bool = False):
    from tokenizers import Regex, pre_tokenizers

    if split_regex is not None:  # the regex does the splitting, ByteLevel only maps bytes to its alphabet
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits_first:
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    return pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]


@dataclass(frozen=True)
class PreTokenizer:
    build: Callable[[], Any]
    ignore_merges: bool = False  # llama.cpp emits a whole word found in the vocabulary without merging it
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer(lambda: _byte_level(LLAMA3_REGEX), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer(lambda: _byte_level()),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": PreTokenizer(lambda: _byte_level(QWEN2_REGEX)),
    "smollm": PreTokenizer(lambda: _byte_level(digits_first=True)),
}


def pre_tokenizer_for(vocab: GGUFVocabulary, where: str) -> PreTokenizer:
    if vocab.model != "gpt2":
        hint = (" (SentencePiece, as in Llama 2, Mistral v0.1 and Phi-3)" if vocab.model == "llama" else "")
        raise GGUFTokenizerError(
            f"{where}: tokenizer.ggml.model={vocab.model!r}{hint} is not supported; only byte-level BPE "
            "('gpt2': Llama 3, Qwen2, SmolLM, GPT-2 style vocabularies) is imported. Import the model's Hugging "
            "Face directory with `slm import hf` instead")
    if vocab.pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(
            f"{where}: tokenizer.ggml.pre={vocab.pre!r} is not a pre-tokenizer this importer knows; supported: "
            f"{', '.join(PRE_TOKENIZERS)}. Each name stands for llama.cpp's own word-splitting rule, and a guessed "
            "one would give the model token sequences it was never trained on")
    return PRE_TOKENIZERS[vocab.pre]


def build_tokenizer(vocab: GGUFVocabulary, where: str):
    """A `tokenizers.Tokenizer` that splits and merges as llama.cpp does for this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    pre = pre_tokenizer_for(vocab, where)
    n = len(vocab.tokens)
    if len(vocab.token_types) != n:
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.token_type has {len(vocab.token_types)} entries, "
                                 f"tokenizer.ggml.tokens {n}; the vocabulary is inconsistent")
    ids: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if token in ids:
            if kind != TOKEN_UNUSED:
                raise GGUFTokenizerError(f"{where}: token {token!r} appears twice in tokenizer.ggml.tokens (ids "
                                         f"{ids[token]} and {i}); a tokenizer maps each string to one id")
            token = f"[UNUSED_DUPLICATE{i}]"  # never produced from text, but its row must keep its id
        ids[token] = i
    merges = []
    for k, merge in enumerate(vocab.merges):
        pair = merge.split(" ")
        if len(pair) != 2 or not all(pair):
            raise GGUFTokenizerError(f"{where}: tokenizer.ggml.merges[{k}]={merge!r} is not two tokens separated "
                                     "by one space")
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False))
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()

    roles = {vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id} - {None}
    for role_id in roles:
        if not 0 <= role_id < n:
            raise GGUFTokenizerError(f"{where}: special token id {role_id} is outside the vocabulary (0..{n - 1})")
    special = [AddedToken(vocab.tokens[i], special=True, normalized=False)
               for i, kind in enumerate(vocab.token_types) if kind == TOKEN_CONTROL or i in roles]
    user = [AddedToken(vocab.tokens[i], special=False, normalized=False)
            for i, kind in enumerate(vocab.token_types) if kind == TOKEN_USER_DEFINED and i not in roles]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != n:  # an added token got a new id: it was not in the table
        raise GGUFTokenizerError(f"{where}: the rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                                 f"ids, the file's vocabulary {n}")
    return tok


def tokenizer_config(vocab: GGUFVocabulary, *, add_bos: bool, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: what `AutoTokenizer.from_pretrained` needs besides tokenizer.json."""
    def name(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None else None

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(vocab.bos_id),
           "eos_token": name(vocab.eos_id), "pad_token": name(vocab.pad_id), "unk_token": name(vocab.unk_id),
           "model_max_length": model_max_length, "add_bos_token": add_bos, "add_eos_token": False,
           "clean_up_tokenization_spaces": False}
    if vocab.chat_template:
        cfg["chat_template"] = vocab.chat_template
    return cfg
