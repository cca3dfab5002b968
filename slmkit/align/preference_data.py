"""Preference data: JSONL `{prompt, chosen, rejected}` -> token ids with an exact prompt/completion boundary.

Two record forms, the ones TRL's DPOTrainer accepts:

- text: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, encoded as pretraining encodes documents:
  `<bos> prompt` then `completion <eos>` (special-token strings inside the text stay text);
- chat: `{"prompt": [{"role": "user", "content": "..."}, ...], "chosen": [{"role": "assistant", "content":
  "..."}], "rejected": [...]}`, rendered with the checkpoint's chat template (`align/chat.py`, sandboxed Jinja
  like transformers): the prompt with the generation prompt, the completion as what the assistant turn adds
  up to and including the template's end marker (`<|end|>`).

Prompt and completions are tokenized *separately* and their ids concatenated, so the boundary is exact and
the completion tokens are exactly those the model generates after the tokenized prompt. Sequences longer
than `seq_len` lose prompt tokens from the left (the completions are what is compared); completions still
too long are cut from the right. Lines that cannot be used are skipped and reported as `file:line: reason`;
pairs whose chosen and rejected texts are identical carry no preference and are dropped with a count.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.build import split_hash
from ..data.errors import DataError
from .chat import ChatTemplateError, assistant_end_marker, chat_template_of, render_chat

FIELDS = ("prompt", "chosen", "rejected")
FORMAT_HINT = ('each line needs "prompt", "chosen" and "rejected": three strings, or a list of chat messages '
               'for the prompt and a one-message assistant list for each completion')


class PreferenceDataError(DataError):
    """Preference data that cannot be used at all; the message names the file."""


class PreferenceDataWarning(UserWarning):
    """Pairs were changed (truncated) or left out (malformed lines, identical completions)."""


@dataclass
class PreferenceExample:
    where: str  # "file:line"
    key: str  # content identity, hashed for the train/val split
    prompt: np.ndarray  # (P,) int64 token ids
    chosen: np.ndarray  # (C,) int64
    rejected: np.ndarray  # (R,) int64


@dataclass
class PreferenceStats:
    lines: int = 0
    pairs: int = 0
    identical: int = 0  # dropped: chosen == rejected
    prompts_truncated: int = 0
    completions_truncated: int = 0
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of skipped lines

    def to_dict(self) -> dict:
        return {"lines": self.lines, "pairs": self.pairs, "skipped": len(self.problems),
                "identical_dropped": self.identical, "prompts_truncated": self.prompts_truncated,
                "completions_truncated": self.completions_truncated}


@dataclass
class PromptFormat:
    """How records become text and ids: the tokenizer, its special ids and (for chat records) the template."""

    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    template: str | None = None
    variables: dict = field(default_factory=dict)
    end_marker: str = ""

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, tokenizer) -> "PromptFormat":
        from ..data.tokenizer import special_token_ids

        cfg_file = Path(ckpt_dir) / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        ids = special_token_ids(tokenizer, config)
        fmt = cls(tokenizer, ids["bos"], ids["eos"])
        try:
            fmt.template, fmt.variables = chat_template_of(config)
        except ChatTemplateError:
            return fmt  # text records still work; chat records are refused line by line
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        fmt.end_marker = assistant_end_marker(fmt.template, specials, **fmt.variables)
        return fmt


def _messages(value, name: str, *, completion: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{name}' must be a non-empty list of messages in the chat form")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"'{name}' message {i} needs string 'role' and 'content' fields")
    if completion and (len(value) != 1 or value[0]["role"] != "assistant"):
        raise ValueError(f"'{name}' must hold exactly one assistant message in the chat form")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _record(obj) -> dict:
    """The validated record: strings, or message lists (chat form)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(repr(k) for k in missing)}; {FORMAT_HINT}")
    if isinstance(obj["prompt"], list):
        return {"prompt": _messages(obj["prompt"], "prompt", completion=False),
                "chosen": _messages(obj["chosen"], "chosen", completion=True),
                "rejected": _messages(obj["rejected"], "rejected", completion=True)}
    bad = [k for k in FIELDS if not isinstance(obj[k], str)]
    if bad:
        raise ValueError(f"{', '.join(repr(k) for k in bad)} must be string(s) when 'prompt' is a string")
    empty = [k for k in ("chosen", "rejected") if not obj[k]]
    if empty:
        raise ValueError(f"{', '.join(repr(k) for k in empty)} is empty: nothing to compare")
    return {k: obj[k] for k in FIELDS}


def read_preference_records(path: str | Path, stats: PreferenceStats) -> list[tuple[str, dict]]:
    """`(where, record)` for each usable line; each skipped line is reported in `stats.problems`."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file; pass a JSONL file of {{prompt, chosen, rejected}} "
                                  "records (`slm pairs` writes one)")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                out.append((where, _record(json.loads(raw.decode("utf-8")))))
            except UnicodeDecodeError:
                stats.problems.append(f"{where}: not UTF-8")
            except json.JSONDecodeError as e:
                stats.problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            except ValueError as e:
                stats.problems.append(f"{where}: {e}")
    return out


def _encode(tokenizer, text: str, *, plain: bool) -> list[int]:
    """Ids of `text`; with `plain`, special-token strings in it are encoded as text (a document may quote
    `<|end|>` without ending anything)."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = plain
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def render_record(record: dict, fmt: PromptFormat) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) as the model reads them; chat records through the template."""
    if isinstance(record["prompt"], str):
        return record["prompt"], record["chosen"], record["rejected"]
    if fmt.template is None:
        raise ValueError("a chat-form record, but the checkpoint's tokenizer_config.json has no chat_template; "
                         "use plain-text records or add a template")
    prompt = render_chat(fmt.template, record["prompt"], add_generation_prompt=True, **fmt.variables)
    completions = []
    for name in ("chosen", "rejected"):
        full = render_chat(fmt.template, record["prompt"] + record[name], **fmt.variables)
        if not full.startswith(prompt):
            raise ValueError(f"the chat template renders the prompt differently once the '{name}' reply is added, "
                             "so the reply cannot be located exactly (the template is not prefix-stable)")
        turn = full[len(prompt):]
        end = turn.rfind(fmt.end_marker) if fmt.end_marker else -1
        completions.append(turn[:end + len(fmt.end_marker)] if end >= 0 else turn)
    return prompt, completions[0], completions[1]


def tokenize_record(record: dict, fmt: PromptFormat) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids), untruncated. Text records: `<bos>` + prompt, completion +
    `<eos>`. Chat records: the rendered text (with `<bos>` in front unless the template wrote it)."""
    prompt_text, chosen_text, rejected_text = render_record(record, fmt)
    plain = isinstance(record["prompt"], str)
    prompt = _encode(fmt.tokenizer, prompt_text, plain=plain)
    bos_text = fmt.variables.get("bos_token")
    if fmt.bos_id is not None and not (not plain and bos_text and prompt_text.startswith(bos_text)):
        prompt = [fmt.bos_id] + prompt
    completions = [_encode(fmt.tokenizer, t, plain=plain) for t in (chosen_text, rejected_text)]
    if plain and fmt.eos_id is not None:
        completions = [c + [fmt.eos_id] for c in completions]
    if not prompt:
        raise ValueError("empty prompt and the tokenizer has no BOS token: the first completion token has "
                         "nothing to be predicted from; give a prompt")
    return prompt, completions[0], completions[1]


def fit_to_length(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int,
                  stats: PreferenceStats) -> tuple[list[int], list[int], list[int]]:
    """Make both `prompt + completion` sequences fit `seq_len` tokens: drop prompt tokens from the left
    (keeping at least one to predict the first completion token from), then cut completions on the right."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > seq_len:
        keep = max(1, seq_len - longest)
        if keep < len(prompt):
            prompt = prompt[-keep:]
            stats.prompts_truncated += 1
        room = seq_len - len(prompt)
        if longest > room:
            chosen, rejected = chosen[:room], rejected[:room]
            stats.completions_truncated += 1
    return prompt, chosen, rejected


def load_preference_pairs(path: str | Path, fmt: PromptFormat, *, seq_len: int,
                          warn: Callable[[str], None] | None = None) -> tuple[list[PreferenceExample], PreferenceStats]:
    """Tokenized pairs of a JSONL file, in file order, each sequence at most `seq_len` tokens. Skipped lines,
    dropped pairs and truncations are counted in the stats and announced through `warn` (default: a
    `PreferenceDataWarning`). Raises PreferenceDataError when no usable pair is left."""
    if seq_len < 2:
        raise PreferenceDataError(f"seq_len={seq_len} is too short for a prompt and a completion")
    warn = warn or (lambda msg: warnings.warn(msg, PreferenceDataWarning, stacklevel=3))
    stats = PreferenceStats()
    examples = []
    for where, record in read_preference_records(path, stats):
        try:
            prompt, chosen, rejected = tokenize_record(record, fmt)
        except (ValueError, ChatTemplateError) as e:
            stats.problems.append(f"{where}: {e}")
            continue
        if chosen == rejected:
            stats.identical += 1
            continue
        prompt, chosen, rejected = fit_to_length(prompt, chosen, rejected, seq_len, stats)
        key = json.dumps([record[k] for k in FIELDS], sort_keys=True, ensure_ascii=False)
        examples.append(PreferenceExample(where, key, *(np.asarray(x, dtype=np.int64) for x in (prompt, chosen, rejected))))
    stats.pairs = len(examples)
    if stats.problems:
        shown = "\n  ".join(stats.problems[:10])
        more = f"\n  ... and {len(stats.problems) - 10} more" if len(stats.problems) > 10 else ""
        warn(f"skipped {len(stats.problems)} of {stats.lines} line(s) of {path}:\n  {shown}{more}")
    if stats.identical:
        warn(f"dropped {stats.identical} pair(s) whose chosen and rejected completions are identical")
    if stats.prompts_truncated:
        warn(f"{stats.prompts_truncated} prompt(s) longer than the context (seq_len={seq_len} with the longer "
             "completion) were truncated from the left; raise --seq-len to keep them whole")
    if stats.completions_truncated:
        warn(f"{stats.completions_truncated} pair(s) had completions longer than seq_len={seq_len} cut on the right")
    if not examples:
        raise PreferenceDataError(f"{path}: no usable preference pair ({len(stats.problems)} line(s) skipped, "
                                  f"{stats.identical} identical pair(s) dropped); {FORMAT_HINT}")
    return examples, stats


def split_pairs(examples: list[PreferenceExample], val_fraction: float
                ) -> tuple[list[int], list[int]]:
    """(train indices, val indices) by a hash of each pair's content, so a pair always lands on the same
    side. With `val_fraction > 0` and at least two pairs, both sides get at least one."""
    if not 0 <= val_fraction < 1:
        raise PreferenceDataError(f"val_fraction={val_fraction} must be in [0, 1)")
    hashes = [split_hash(e.key) for e in examples]
    val = {i for i, h in enumerate(hashes) if h < val_fraction}
    if val_fraction > 0 and not val and len(examples) >= 2:
        val = {min(range(len(examples)), key=hashes.__getitem__)}
    if len(val) == len(examples) and examples:
        val.discard(max(val, key=hashes.__getitem__))
    return [i for i in range(len(examples)) if i not in val], sorted(val)
