"""SFT data: JSONL conversations -> token ids with an exact assistant-only loss mask -> packed or padded rows.

Records (one JSON object per line) are either conversations, ``{"messages": [{"role", "content"}, ...]}``
(the form OpenAI fine-tuning, TRL and torchtune read), rendered with the checkpoint's chat template, or plain
``{"prompt", "completion"}`` text pairs, encoded as ``<bos> prompt completion <eos>`` the way pretraining
encodes documents (special-token strings inside the text stay text).

**The mask.** For each assistant message ``i`` the conversation is rendered three ways: up to message ``i``
with the generation prompt (``before``), up to and including message ``i`` (``after``), and whole. A template
is usable only if ``before`` is a prefix of ``after`` and ``after`` of the whole text; then
``after[len(before):]`` is exactly what the assistant turn adds. Its labelled part runs up to and including the
template's end marker (``<|end|>``; see ``chat.assistant_end_marker``); whatever the template writes after that
(a newline) and everything else is context with label -100. The text is tokenized segment by segment, so every
token is wholly inside or outside a labelled span, and the assistant's tokens are exactly those a model
generates after the tokenized prompt at inference time (tests decode the labelled tokens back to the assistant
contents plus end markers).

**Rows.** With packing, whole examples are placed greedily, in order, into rows of ``seq_len + 1`` tokens
(the remainder of a row is padding with no loss); no example is split across rows. Each row records which
example every position belongs to (``document``), and training passes it to the model with positions that
restart at every example: a position attends only to earlier positions of its own example, so a packed row
computes exactly what each example alone would (the document masking of torchtune's packed datasets and of
FlashAttention's variable-length batches), and labels never cross examples. Without packing each example is its own row, right-padded (causal attention never looks right, so
padding needs no attention mask). Examples longer than ``seq_len + 1`` tokens are truncated and counted;
those left with no assistant token are dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.build import split_hash
from ..data.errors import DataError
from .chat import ChatTemplateError, assistant_end_marker, compile_template, render_chat


class SFTDataError(DataError):
    """SFT data that cannot be used; the message names the file and line."""


@dataclass
class SFTRecord:
    where: str  # "file:line"
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None

    def key(self) -> str:
        """Content identity, hashed for the train/val split (the same record always lands on the same side)."""
        body = self.messages if self.messages is not None else [self.prompt, self.completion]
        return json.dumps(body, sort_keys=True, ensure_ascii=False)


@dataclass
class SFTExample:
    where: str
    ids: np.ndarray  # (n,) int64 token ids
    target: np.ndarray  # (n,) bool: token t is predicted (carries loss); target[0] is always False


@dataclass
class SFTStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    no_target: int = 0  # dropped: no assistant token left within seq_len
    problems: list[str] = field(default_factory=list)  # "file:line: reason" of skipped records

    def to_dict(self) -> dict:
        return {"records": self.records, "examples": self.examples, "truncated": self.truncated,
                "dropped_no_assistant_tokens": self.no_target, "skipped": len(self.problems)}


# -- reading -------------------------------------------------------------------------------------

def _record_from(obj, where: str) -> SFTRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs string 'role' and 'content' fields")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to learn from")
        return SFTRecord(where, messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not completion:
            raise ValueError("'completion' is empty: nothing to learn from")
        return SFTRecord(where, prompt=prompt, completion=completion)
    raise ValueError("needs a 'messages' list or 'prompt' and 'completion' strings")


def read_sft_records(paths: list[str | Path]) -> tuple[list[SFTRecord], list[str]]:
    """Records of JSONL files, and ``"file:line: reason"`` for each line that was skipped."""
    records, problems = [], []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SFTDataError(f"{path}: no such file; pass JSONL files of {{\"messages\": [...]}} or "
                               "{\"prompt\", \"completion\"} records")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    records.append(_record_from(obj, where))
                except UnicodeDecodeError:
                    problems.append(f"{where}: not UTF-8")
                except json.JSONDecodeError as e:
                    problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                except ValueError as e:
                    problems.append(f"{where}: {e}")
    return records, problems


# -- tokenizing ----------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    """What tokenizing a conversation needs: the template, its variables and the tokenizer's special ids."""

    template: str | None  # None: prompt/completion records only
    variables: dict
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None

    def __post_init__(self):
        self.end_marker = ""
        if self.template is not None:
            compile_template(self.template)  # fail early on a template that does not compile
            specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
            self.end_marker = assistant_end_marker(self.template, specials, **self.variables)


def conversation_segments(messages: list[dict], fmt: ChatFormat) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, labelled)`` pieces; labelled pieces are assistant turns up to
    and including the end marker (see the module docstring)."""
    render = compile_template(fmt.template).render
    full = render_chat(fmt.template, messages, **fmt.variables)
    segments, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # messages[:0] is empty, which render_chat refuses; the compiled template takes it.
        before = render(messages=messages[:i], add_generation_prompt=True, **fmt.variables)
        after = render_chat(fmt.template, messages[:i + 1], **fmt.variables)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= pos):
            raise ChatTemplateError(
                f"message {i} (role 'assistant'): the chat template is not prefix-stable (rendering the "
                "conversation up to this message is not a prefix of rendering it whole), so assistant tokens "
                "cannot be located exactly; use a template that renders each message in place")
        turn = after[len(before):]
        end = len(turn)
        if fmt.end_marker and turn.rfind(fmt.end_marker) >= 0:
            end = turn.rfind(fmt.end_marker) + len(fmt.end_marker)
        segments.append((full[pos:len(before)], False))
        segments.append((turn[:end], True))
        pos = len(before) + end
    segments.append((full[pos:], False))
    return [(text, labelled) for text, labelled in segments if text]


def _encode(tokenizer, text: str, *, as_document: bool) -> list[int]:
    if not as_document:
        return tokenizer.encode(text, add_special_tokens=False).ids
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # special-token strings inside plain text stay text
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def tokenize_record(record: SFTRecord, fmt: ChatFormat) -> tuple[list[int], list[bool]]:
    """Token ids and per-token target flags of one record (no truncation)."""
    ids: list[int] = []
    target: list[bool] = []
    if record.messages is not None:
        segments = conversation_segments(record.messages, fmt)
        bos_text = fmt.variables.get("bos_token")
        starts_with_bos = bool(bos_text) and segments[0][0].startswith(bos_text)
        if fmt.bos_id is not None and not starts_with_bos:
            ids.append(fmt.bos_id)
            target.append(False)
        for text, labelled in segments:
            piece = _encode(fmt.tokenizer, text, as_document=False)
            ids += piece
            target += [labelled] * len(piece)
        return ids, target
    if fmt.bos_id is not None:
        ids.append(fmt.bos_id)
        target.append(False)
    prompt = _encode(fmt.tokenizer, record.prompt, as_document=True)
    completion = _encode(fmt.tokenizer, record.completion, as_document=True)
    if fmt.eos_id is not None:
        completion.append(fmt.eos_id)
    ids += prompt + completion
    target += [False] * len(prompt) + [True] * len(completion)
    return ids, target


def build_examples(records: list[SFTRecord], fmt: ChatFormat, seq_len: int, stats: SFTStats) -> list[SFTExample]:
    """Tokenize records into examples of at most ``seq_len + 1`` tokens; a record the template refuses is
    reported as ``file:line: reason`` in ``stats.problems`` and skipped."""
    limit = seq_len + 1
    examples = []
    for rec in records:
        try:
            ids, target = tokenize_record(rec, fmt)
        except ChatTemplateError as e:
            stats.problems.append(f"{rec.where}: {e}")
            continue
        if len(ids) > limit:
            ids, target = ids[:limit], target[:limit]
            stats.truncated += 1
        if not any(target[1:]):
            stats.no_target += 1
            continue
        examples.append(SFTExample(rec.where, np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool)))
    stats.examples += len(examples)
    return examples


def split_records(records: list[SFTRecord], val_fraction: float) -> tuple[list[SFTRecord], list[SFTRecord]]:
    """(train, val) by a hash of each record's content (the rule `slm data` uses for documents). With
    ``val_fraction > 0`` and at least two records, val gets at least one."""
    if not 0 <= val_fraction < 1:
        raise SFTDataError(f"val_fraction={val_fraction} must be in [0, 1)")
    hashes = [split_hash(r.key()) for r in records]
    val_idx = {i for i, h in enumerate(hashes) if h < val_fraction}
    if val_fraction > 0 and not val_idx and len(records) >= 2:
        val_idx = {min(range(len(records)), key=hashes.__getitem__)}
    if len(val_idx) == len(records) and records:
        val_idx.discard(max(val_idx, key=hashes.__getitem__))
    return ([r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx])


# -- rows ----------------------------------------------------------------------------------------

@dataclass
class Rows:
    """Fixed-width rows of ``seq_len + 1`` tokens."""

    tokens: np.ndarray  # (N, L) int64
    target: np.ndarray  # (N, L) bool: the token carries loss
    real: np.ndarray  # (N, L) bool: a real token, not padding
    examples_per_row: np.ndarray  # (N,)
    document: np.ndarray | None = None  # (N, L) int32: 1 + the example's index in its row, 0 on padding

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def fill(self) -> float:
        """Fraction of row positions holding real tokens (not padding)."""
        return float(self.real.mean()) if self.real.size else 0.0


def make_rows(examples: list[SFTExample], seq_len: int, pad_id: int, *, pack: bool) -> Rows:
    """Pack (greedily, whole examples, in order) or pad examples into rows of ``seq_len + 1`` tokens."""
    L = seq_len + 1
    groups: list[list[SFTExample]] = []
    used = L  # forces a new row for the first example
    for ex in examples:
        if not pack or used + len(ex.ids) > L:
            groups.append([])
            used = 0
        groups[-1].append(ex)
        used += len(ex.ids)
    tokens = np.full((len(groups), L), pad_id, dtype=np.int64)
    target = np.zeros((len(groups), L), dtype=bool)
    real = np.zeros((len(groups), L), dtype=bool)
    document = np.zeros((len(groups), L), dtype=np.int32)
    for r, group in enumerate(groups):
        at = 0
        for j, ex in enumerate(group):
            n = len(ex.ids)
            tokens[r, at:at + n], target[r, at:at + n], real[r, at:at + n] = ex.ids, ex.target, True
            document[r, at:at + n] = j + 1
            at += n
    return Rows(tokens, target, real, np.array([len(g) for g in groups], dtype=np.int64), document)


def packed_inputs(document: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs that isolate the examples of packed rows: `document_ids` (N, T) as given and
    `position_ids` (N, T) restarting at 0 where each example (or the padding run) begins."""
    n, t = document.shape
    idx = np.broadcast_to(np.arange(t), (n, t))
    begins = np.ones((n, t), dtype=bool)
    begins[:, 1:] = document[:, 1:] != document[:, :-1]
    start = np.maximum.accumulate(np.where(begins, idx, 0), axis=1)
    return {"document_ids": document.astype(np.int64), "position_ids": (idx - start).astype(np.int64)}


def row_inputs_and_labels(tokens: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token inputs and labels of rows: (N, L) -> (N, L-1) each; labels are -100 off target."""
    labels = np.where(target[:, 1:], tokens[:, 1:], -100)
    return tokens[:, :-1], labels
