"""A Hugging Face `tokenizer.json` rebuilt from the vocabulary a GGUF file carries, and the GGUF name of a
tokenizer.json's pre-tokenizer: one table, `PRE_TOKENIZERS`, read both ways by import and export.

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

The other direction (`pre_tokenizer_splits`, used by the exporter): a tokenizer.json pre-tokenizer is read as
its list of split regexes — Split(regex, isolated) and Digits(individual_digits) steps, then a ByteLevel that
adds GPT-2's regex when `use_regex` is set — and has a GGUF name only when that list is exactly one row of the
table. Digits(individual_digits) is Split(\\p{N}): both isolate every character of Unicode class N.

Control tokens (type 3) become special added tokens and user-defined tokens (type 4) plain added tokens,
matched whole in text as llama.cpp does; the bos/eos/pad/unk tokens are special as well. No post-processor
adds bos: slmkit prepends `bos_token_id` itself when the model has one (see `gguf_import`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# The split regexes llama.cpp applies for these names (llama-vocab.cpp), in the syntax of tokenizers' Regex.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_REGEX = r"\p{N}"
GPT2_SPLIT = "<GPT-2 regex of ByteLevel(use_regex=True)>"  # stands for ByteLevel's built-in regex; last only


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


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]  # split regexes in the order applied; GPT2_SPLIT (last only) is ByteLevel's own
    ignore_merges: bool = False  # llama.cpp emits a whole word found in the vocabulary without merging it
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token

    def build(self):
        """The `tokenizers` pre-tokenizer: an isolating Split per regex, then ByteLevel (with GPT-2's regex
        when the list ends with it; otherwise it only maps bytes to its alphabet)."""
        from tokenizers import Regex, pre_tokenizers

        gpt2 = self.splits[-1:] == (GPT2_SPLIT,)
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self.splits if r != GPT2_SPLIT]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2))
        return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
# Aliases share one entry; the first name of an entry is the one the exporter writes.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer((GPT2_SPLIT,)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": PreTokenizer((QWEN2_REGEX,)),
    "smollm": PreTokenizer((DIGITS_REGEX, GPT2_SPLIT)),
}
SUPPORTED_SPLITS = ("`gpt-2`: ByteLevel with GPT-2's regex (slmkit's own tokenizer); `llama-bpe`: Split(Llama-3 "
                    "regex) + ByteLevel(use_regex=false), BPE ignore_merges=true; `qwen2`: Split(Qwen2 regex) + "
                    "ByteLevel(use_regex=false); `smollm`: Digits(individual_digits) or Split(\\p{N}) + ByteLevel "
                    "with GPT-2's regex; each ByteLevel with no prefix space")


def pre_tokenizer_splits(pre_tokenizer: dict | None) -> tuple[str, ...] | None:
    """A tokenizer.json `pre_tokenizer` as `PreTokenizer.splits`, or None when it is anything but isolating
    regex/digit splits followed by one ByteLevel without prefix space."""
    pre = pre_tokenizer or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    splits = []
    for step in steps[:-1]:
        pattern = step.get("pattern") or {}
        if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") \
                and "Regex" in pattern:
            splits.append(pattern["Regex"])
        elif step.get("type") == "Digits" and step.get("individual_digits"):
            splits.append(DIGITS_REGEX)
        else:
            return None
    if steps[-1].get("use_regex", True):
        splits.append(GPT2_SPLIT)
    return tuple(splits)


def pre_tokenizer_named(splits: tuple[str, ...] | None, preferred: str | None = None) -> str | None:
    """The GGUF name of the pre-tokenizer that splits by `splits`: `preferred` when it is one of that entry's
    names (a file imported as `llama3` exports as `llama3`), else the entry's first name; None when none does."""
    names = [name for name, pre in PRE_TOKENIZERS.items() if pre.splits == splits]
    if preferred in names:
        return preferred
    return names[0] if names else None


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
