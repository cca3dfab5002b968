"""Task suites: multiple choice scored by log-likelihood, generation scored by a verifier or ROUGE-L.

Multiple choice follows lm-evaluation-harness (Gao et al., 2021): each choice is scored by the summed
log-probability of its tokens after the context, `log P(choice | context)`. The continuation's tokens are
what the full string `context + choice` tokenizes to beyond the context's own tokens (the harness's
`_encode_pair`), so a BPE merge across the boundary does not split a token oddly. Two accuracies:

- `acc`: the choice with the highest summed log-likelihood;
- `acc_norm`: the highest log-likelihood per UTF-8 byte of the choice — the harness's length
  normalisation (it divides by characters), which removes the bias towards short choices.

Generation tasks sample a completion (greedy by default) for each prompt and score it with a verifier
(`slmkit.align.verifiers`, e.g. `python-syntax`) or against a reference with ROUGE-L (Lin, 2004): the F1 of
the longest common subsequence of whitespace tokens.

Task files are JSONL. Multiple choice: `{"context": str, "choices": [str, ...], "gold": int}`.
Generation: `{"prompt": str, "reference": str?}`. A malformed line is reported by line number and
skipped; a file with no valid line is an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


class TaskError(ValueError):
    """A task file or task spec that cannot be used; the message names the file, line or field."""


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    gold: int


@dataclass
class GenerationItem:
    prompt: str
    reference: str | None = None


@dataclass
class TaskData:
    name: str
    kind: str  # "choice" | "generation"
    items: list
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    verifier: object | None = None  # what a built-in generation task is judged with, when not a spec string


# -- loading -----------------------------------------------------------------------------------------

def _read_jsonl(path: Path, parse: Callable[[dict], object]) -> tuple[list, list[str]]:
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    items, skipped = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must be a JSON object")
                items.append(parse(record))
            except (ValueError, KeyError, TypeError) as e:
                skipped.append(f"{path}:{n}: {e}")
    if not items:
        detail = f" (first problem: {skipped[0]})" if skipped else ""
        raise TaskError(f"{path}: no valid task lines{detail}")
    return items, skipped


def parse_choice(record: dict) -> ChoiceItem:
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str):
        raise ValueError("'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("'choices' must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"'gold' must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
    return ChoiceItem(context, choices, gold)


def parse_generation(record: dict) -> GenerationItem:
    prompt, reference = record.get("prompt"), record.get("reference")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string")
    if reference is not None and not isinstance(reference, str):
        raise ValueError("'reference' must be a string")
    return GenerationItem(prompt, reference)


def load_task_file(path: str | Path, kind: str | None = None) -> TaskData:
    """Read a JSONL task file; the kind is given or recognised from the first valid record's fields."""
    path = Path(path)
    if kind is None:
        kind = _sniff_kind(path)
    parse = {"choice": parse_choice, "generation": parse_generation}.get(kind)
    if parse is None:
        raise TaskError(f"{path}: unknown task kind {kind!r} (choice or generation)")
    items, skipped = _read_jsonl(path, parse)
    return TaskData(path.stem, kind, items, skipped)


def _sniff_kind(path: Path) -> str:
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "choices" in record:
                return "choice"
            if isinstance(record, dict) and "prompt" in record:
                return "generation"
    raise TaskError(f"{path}: cannot tell the task kind: lines need 'context'/'choices'/'gold' "
                    "(multiple choice) or 'prompt' (generation)")


# -- multiple choice -----------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), splitting the tokens of `context + continuation` after the
    context's own tokens. Trailing spaces of the context move to the continuation (as the harness does),
    because byte-level BPE attaches a space to the word after it."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation).ids
    ctx = tokenizer.encode(stripped).ids if stripped else []
    if whole[:len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encodings
        return ctx, tokenizer.encode(continuation).ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                   bos_id: int | None = None, progress: Callable[[int], None] | None = None,
                   share_context: bool = True) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log P(continuation | context), whether every
    continuation token is the greedy choice). Contexts are cut from the left to fit the model's context.

    Requests that share a context (the choices of one item) run the context once: it is prefilled into a KV
    cache, the cache rows are repeated once per continuation, and all continuations run as one padded
    batch on top (`_score_shared`). The rest, and models without a plain KV cache (Linformer, segment
    memory), run one right-padded row per request (`_score_rows`). Both compute exactly the unbatched
    log-probabilities, up to float rounding of different matmul shapes. `progress(n)` counts requests."""
    if not requests:
        return []
    cfg = model.config
    limit = cfg.max_position_embeddings
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    shared: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    rows: list[tuple[int, list[int], int]] = []  # (request index, ids, number of continuation tokens at the end)
    cacheable = share_context and cfg.attention_type == "full" and not getattr(cfg, "memory_length", 0)
    for r, (ctx, cont) in enumerate(requests):
        if not cont:
            raise TaskError("a choice tokenized to nothing; choices must be non-empty text")
        prefix = ([bos_id] if bos_id is not None else []) + list(ctx)
        if not prefix:  # the first continuation token needs something to be predicted from
            raise TaskError("an empty context needs a BOS token to score the first choice token")
        if cacheable and len(prefix) + len(cont) <= limit + 1:
            shared.setdefault(tuple(prefix), []).append((r, list(cont)))
        else:
            rows.append((r, (prefix + list(cont))[-(limit + 1):], len(cont)))
    was_training = model.training
    model.eval()
    try:
        _score_shared(model, list(shared.items()), results, batch_size, progress)
        _score_rows(model, rows, results, batch_size, progress)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def _score_rows(model, rows: list[tuple[int, list[int], int]], results: list, batch_size: int, progress) -> None:
    """One right-padded row per request (causal attention: padding after a row's tokens changes nothing)."""
    device = next(model.parameters()).device
    pad = _pad_id(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for _, ids, _ in chunk) - 1
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        for j, (_, ids, _) in enumerate(chunk):
            x[j, :len(ids) - 1] = torch.tensor(ids[:-1])
        logits = model(x.to(device))  # (b, width, V)
        for j, (r, ids, n) in enumerate(chunk):
            pos = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=device)
            results[r] = _continuation_score(logits[j, pos], torch.tensor(ids[-n:], device=device))
        if progress is not None:
            progress(len(chunk))


def _continuation_score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """(sum of log-probabilities of `targets`, all greedy) from the logits (n, V) that predict them."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (n, V)
    token_logp = logp.gather(-1, targets[:, None])[:, 0]
    return float(token_logp.double().sum()), bool((logp.argmax(-1) == targets).all())


def _score_shared(model, groups: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]], results: list,
                  batch_size: int, progress) -> None:
    """Score continuations that share a context: groups of (context ids, [(request index, continuation)]),
    packed so that each forward holds about `batch_size` continuations."""
    groups = sorted(groups, key=lambda g: -len(g[0]))
    i = 0
    while i < len(groups):
        batch, n = [groups[i]], len(groups[i][1])
        i += 1
        while i < len(groups) and n + len(groups[i][1]) <= batch_size:
            batch.append(groups[i])
            n += len(groups[i][1])
            i += 1
        _score_shared_batch(model, batch, results)
        if progress is not None:
            progress(n)


def _score_shared_batch(model, batch, results: list) -> None:
    from ..model.cache import KVCache

    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    pad = _pad_id(model)
    prefixes = [list(p) for p, _ in batch]
    conts = [(g, r, c) for g, (_, items) in enumerate(batch) for r, c in items]
    P = max(len(p) for p in prefixes)
    C = max(len(c) for _, _, c in conts)
    # Contexts left-padded, so every row's last column is its last real token: (G, P).
    ids = torch.full((len(batch), P), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), P), dtype=torch.long)
    for g, p in enumerate(prefixes):
        ids[g, P - len(p):] = torch.tensor(p)
        mask[g, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts its positions from its first real token
    cache = KVCache(model.config, len(batch), P + max(C - 1, 1), device=device, dtype=dtype)
    first = model(ids, position_ids=positions, attention_mask=mask, cache=cache, last_only=True)[:, 0]  # (G, V)
    owner = torch.tensor([g for g, _, _ in conts], device=device)  # (N,) the context row of each continuation
    rest = None
    if C > 1:
        cache.select_rows(owner)  # one copy of its context's keys/values per continuation
        x = torch.full((len(conts), C - 1), pad, dtype=torch.long)  # continuations but their last token, right-padded
        for j, (_, _, c) in enumerate(conts):
            x[j, :len(c) - 1] = torch.tensor(c[:-1])
        lengths = torch.tensor([len(p) for p in prefixes], device=device)[owner]  # (N,)
        new_pos = lengths[:, None] + torch.arange(C - 1, device=device)[None]  # (N, C-1)
        full_mask = torch.cat([mask[owner], torch.ones(len(conts), C - 1, dtype=torch.long, device=device)], 1)
        rest = model(x.to(device), position_ids=new_pos, attention_mask=full_mask, cache=cache)  # (N, C-1, V)
    for j, (g, r, c) in enumerate(conts):
        logits = first[g][None] if rest is None else torch.cat([first[g][None], rest[j, :len(c) - 1]], 0)  # (len(c), V)
        results[r] = _continuation_score(logits, torch.tensor(c, device=device))


def score_choice_task(model, tokenizer, items: list[ChoiceItem], *, batch_size: int = 16,
                      bos_id: int | None = None, progress=None) -> dict:
    """acc, acc_norm and per-item log-likelihoods for multiple-choice items."""
    requests, owners = [], []
    for k, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            requests.append(encode_pair(tokenizer, item.context, choice))
            owners.append((k, c))
    scores = loglikelihoods(model, requests, batch_size=batch_size, bos_id=bos_id, progress=progress)
    per_item: list[list[float]] = [[0.0] * len(it.choices) for it in items]
    for (k, c), (ll, _) in zip(owners, scores):
        per_item[k][c] = ll
    correct = correct_norm = 0
    for item, lls in zip(items, per_item):
        correct += int(max(range(len(lls)), key=lambda c: lls[c]) == item.gold)
        norm = [ll / max(len(ch.encode("utf-8")), 1) for ll, ch in zip(lls, item.choices)]
        correct_norm += int(max(range(len(norm)), key=lambda c: norm[c]) == item.gold)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n,
            "chance": sum(1 / len(it.choices) for it in items) / n, "loglikelihoods": per_item}


# -- generation ----------------------------------------------------------------------------------------

def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens (Lin, 2004), beta = 1."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:  # longest common subsequence, one row at a time
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def score_generation_task(model, tokenizer, items: list[GenerationItem], *, scorer="rouge-l",
                          max_new_tokens: int = 128, batch_size: int = 8, stop: list[str] | None = None,
                          temperature: float = 0.0, seed: int = 0, progress=None) -> dict:
    """Generate for every prompt and score: `rouge-l` against each item's reference, or a verifier (a spec
    such as `python-syntax` or `json:schema=...`, or a built `slmkit.align.verifiers.Verifier`). A verifier
    judges the item's whole prompt and the completion, even where the model saw the prompt cut from the left
    to fit its context. Returns the mean score, the pass rate (verifiers; ROUGE-L has none) and per-item
    outputs."""
    from ..serve.generate import SamplingParams, generate

    if scorer == "rouge-l":
        missing = [i for i, it in enumerate(items) if it.reference is None]
        if missing:
            raise TaskError(f"rouge-l needs a 'reference' on every item; item {missing[0]} has none")
        verify = None
    elif isinstance(scorer, str):
        from ..align.verifiers import build_verifier

        verify = build_verifier(scorer, tokenizer=tokenizer)
    else:
        verify, scorer = scorer, scorer.describe()
    limit = model.config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise TaskError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {model.config.max_position_embeddings}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop or []),
                            seed=seed)
    outputs: list[dict] = []
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [_fit_prompt(tokenizer, it.prompt, limit - 1) for it in chunk]
        results = generate(model, tokenizer, prompts, params)
        verdicts = verify.score_batch([it.prompt for it in chunk], [r.text for r in results]) \
            if verify is not None else None
        for k, (it, res) in enumerate(zip(chunk, results)):
            if verdicts is None:
                score, passed, reason = rouge_l(res.text, it.reference or ""), None, ""
            else:
                v = verdicts[k]
                score, passed, reason = float(v.score), bool(v.passed), v.reason
            outputs.append({"prompt": it.prompt, "completion": res.text, "score": score, "passed": passed,
                            "reason": reason})
        if progress is not None:
            progress(len(chunk))
    n = len(outputs)
    result = {"score": sum(o["score"] for o in outputs) / n, "items": n, "scorer": scorer,
              "seconds": round(time.perf_counter() - t0, 2), "outputs": outputs}
    if verify is not None:
        result["pass_rate"] = sum(bool(o["passed"]) for o in outputs) / n
    return result


def _fit_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    ids = tokenizer.encode(prompt).ids
    if len(ids) <= max_tokens:
        return prompt
    return tokenizer.decode(ids[-max_tokens:], skip_special_tokens=False)
