"""`slm pairs`: preference pairs made by sampling a model and judging its samples with a verifier.

For each prompt the model samples K completions (several prompts x K rows per batched `generate` call); the
verifier scores every sample; a pair is the best passing sample (highest score, then earliest) against the
worst failing one. Prompts where every sample passes or every sample fails give no pair — unless the verifier
is graded (teacher log-likelihood, a plug-in returning numbers), in which case the best and worst samples
form a pair when their scores differ by at least ``margin``. This is the rejection-sampling recipe behind
"self-rewarding"/RLAIF-style data with a programmatic judge (cf. Pace et al., 2024, "West-of-N"; Yuan et al.,
2024, "Self-Rewarding Language Models"), here with verifiers instead of a reward model.

The pair stores what the verifier judged: when a verifier judges only part of a completion (``python-syntax``
cuts at the end of the function) that part is written, so DPO compares exactly the texts that were judged.
Output lines are ``{id, prompt, chosen, rejected, chosen_score, rejected_score, verifier, ...}``; for chat
prompts (``messages``) the prompt is the message list and chosen/rejected are one-message assistant lists, the
form `slm dpo` reads. Sampling is seeded per batch, so the same ``--seed`` and ``--batch-prompts`` give the
same file. With a progress hook, sampling and verifying each draw a bar counted in samples (prompts x K).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..data.errors import DataError
from .chat import ChatTemplateError, assistant_end_marker, chat_template_of, render_chat
from .defaults import PAIRS_SAMPLING
from .verifiers import Verifier, VerifierResult

if TYPE_CHECKING:
    from ..evaluate.suite import ProgressHook


class PromptFileError(DataError):
    """A prompt file with no usable prompt; the message names the file."""


@dataclass
class PromptItem:
    id: str
    text: str  # what the model reads (chat prompts: rendered with the generation prompt)
    record: str | list[dict]  # what the pairs file stores as "prompt"

    @property
    def chat(self) -> bool:
        return isinstance(self.record, list)


@dataclass
class PairStats:
    prompts: int = 0
    samples: int = 0
    passed: int = 0
    pairs: int = 0
    all_passed: int = 0
    all_failed: int = 0
    small_margin: int = 0
    identical: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "samples": self.samples, "pass_rate": self.passed / max(self.samples, 1),
                "pairs": self.pairs, "skipped_all_passed": self.all_passed, "skipped_all_failed": self.all_failed,
                "skipped_small_margin": self.small_margin, "skipped_identical": self.identical,
                "skipped_lines": len(self.problems)}


# -- prompts -------------------------------------------------------------------------------------

def _is_jsonl(path: Path) -> bool:
    """Decided by content: the first non-blank line is a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def read_prompts(path: str | Path, *, template: Callable[[list[dict]], str] | None,
                 problems: list[str]) -> list[PromptItem]:
    """Prompts of a JSONL file (``prompt`` strings or ``messages`` lists) or a text file (one per line).
    ``template`` renders messages with the generation prompt; skipped lines go to ``problems``."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file; pass JSONL with 'prompt' or 'messages', a text file with "
                              "one prompt per line, or `default`")
    items = []
    jsonl = _is_jsonl(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{where}: not UTF-8")
                continue
            if not jsonl:
                items.append(PromptItem(where, line.rstrip("\r\n"), line.rstrip("\r\n")))
                continue
            try:
                items.append(_prompt_from_json(json.loads(line), where, template))
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            except ValueError as e:
                problems.append(f"{where}: {e}")
    if not items:
        raise PromptFileError(f"{path}: no usable prompt ({len(problems)} line(s) skipped"
                              f"{': ' + problems[0] if problems else ''})")
    return items


def _prompt_from_json(obj, where: str, template) -> PromptItem:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("messages"), list):
        if template is None:
            raise ValueError("a 'messages' prompt, but the checkpoint has no chat template")
        messages = obj["messages"]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs string 'role' and 'content' fields")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return PromptItem(str(obj.get("id", where)), template(messages), messages)
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return PromptItem(str(obj.get("id", where)), obj["prompt"], obj["prompt"])
    raise ValueError("needs a non-empty 'prompt' string or a 'messages' list")


def default_prompts(*, limit: int, val_fraction: float, seed: int = 0) -> list[PromptItem]:
    """Function-completion prompts from the default domain's held-out files (``data/default_tasks.py``)."""
    from ..data.default_tasks import function_prompts

    # The `pairs` half, documented or not: the `eval` half stays unseen for `slm eval --tasks function-parse`.
    tasks = function_prompts(limit=limit, seed=seed, val_fraction=val_fraction, require_docstring=False, part="pairs")
    if not tasks:
        raise PromptFileError(f"no held-out default-domain functions at val_fraction={val_fraction}")
    return [PromptItem(t.id, t.prompt, t.prompt) for t in tasks]


def heldout_fraction(provenance: dict, default: float = 0.01) -> tuple[float, str]:
    """The smallest ``val_fraction`` of the datasets a checkpoint was trained on (from its provenance), so
    default prompts come only from files none of them trained on; ``default`` (slm data's) if none is recorded."""
    found = []
    for stage in provenance.get("stages", []):
        path = (stage.get("data") or {}).get("path") if isinstance(stage.get("data"), dict) else None
        meta = Path(path) / "meta.json" if path else None
        if meta is not None and meta.is_file():
            try:
                vf = json.loads(meta.read_text()).get("val_fraction")
            except json.JSONDecodeError:
                continue
            if isinstance(vf, (int, float)) and vf > 0:
                found.append((float(vf), str(meta.parent)))
    if not found:
        return default, f"no dataset recorded in the checkpoint; using val_fraction={default} (slm data's default)"
    vf, where = min(found)
    return vf, f"val_fraction={vf} from {where}"


# -- pairs ---------------------------------------------------------------------------------------

def select_pair(results: list[VerifierResult], texts: list[str], *, graded: bool,
                margin: float) -> tuple[int, int] | str:
    """(chosen, rejected) sample indices, or the reason for no pair: all_passed | all_failed | small_margin |
    identical."""
    passing = [i for i, r in enumerate(results) if r.passed]
    failing = [i for i, r in enumerate(results) if not r.passed]
    if passing and failing:
        best = max(passing, key=lambda i: (results[i].score, -i))
        worst = min(failing, key=lambda i: (results[i].score, i))
    elif graded and len(results) >= 2:
        finite = [i for i, r in enumerate(results) if not math.isnan(r.score)]
        best = max(finite, key=lambda i: (results[i].score, -i))
        worst = min(finite, key=lambda i: (results[i].score, i))
        if not results[best].score - results[worst].score >= margin or best == worst:
            return "small_margin"
    else:
        return "all_passed" if passing else "all_failed"
    if texts[best] == texts[worst]:
        return "identical"
    return best, worst


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pair_record(item: PromptItem, chosen: str, rejected: str, rc: VerifierResult, rr: VerifierResult,
                 verifier: str) -> dict:
    def wrap(text):
        return [{"role": "assistant", "content": text}] if item.chat else text

    return {"id": item.id, "prompt": item.record, "chosen": wrap(chosen), "rejected": wrap(rejected),
            "chosen_score": _finite(rc.score), "rejected_score": _finite(rr.score), "verifier": verifier,
            "chosen_reason": rc.reason, "rejected_reason": rr.reason}


def make_pairs(model, tokenizer, prompts: list[PromptItem], verifier: Verifier, *, k: int = PAIRS_SAMPLING.k,
               temperature: float = PAIRS_SAMPLING.temperature, top_p: float = PAIRS_SAMPLING.top_p,
               max_new_tokens: int = PAIRS_SAMPLING.max_new_tokens, seed: int = PAIRS_SAMPLING.seed,
               batch_prompts: int = PAIRS_SAMPLING.batch_prompts, margin: float = PAIRS_SAMPLING.margin,
               stop: list[str] | None = None,
               stop_token_ids: list[int] | None = None, progress: ProgressHook | None = None
               ) -> tuple[list[dict], PairStats]:
    """Sample ``k`` completions per prompt, judge them, and return (pair records, stats). ``progress`` gets a
    sampling bar and a verifying bar of ``len(prompts) * k`` samples each."""
    from ..serve.generate import SamplingParams, generate

    if k < 2:
        raise ValueError(f"-k {k}: a pair needs at least 2 samples per prompt")
    if temperature <= 0:
        raise ValueError("--temperature must be > 0: greedy decoding gives K identical samples")
    stats = PairStats(prompts=len(prompts))
    records = []
    spec = verifier.describe()
    total = len(prompts) * k
    sampled = progress(f"sampling ({len(prompts)} prompts x {k})", total) if progress is not None else None
    verified = progress(f"verifying ({spec})", total) if progress is not None else None
    for b, start in enumerate(range(0, len(prompts), batch_prompts)):
        chunk = prompts[start:start + batch_prompts]
        texts = [p.text for p in chunk for _ in range(k)]  # (len(chunk) * k,)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop or []), seed=seed * 1_000_003 + b, stop_token_ids=stop_token_ids)
        outs = generate(model, tokenizer, texts, params)
        completions = [o.text for o in outs]
        if sampled is not None:
            sampled(len(texts))
        results = verifier.score_batch(texts, completions)
        if verified is not None:
            verified(len(texts))
        for j, item in enumerate(chunk):
            rs, cs = results[j * k:(j + 1) * k], completions[j * k:(j + 1) * k]
            judged = [r.span if r.span is not None else c for r, c in zip(rs, cs)]
            stats.samples += k
            stats.passed += sum(r.passed for r in rs)
            choice = select_pair(rs, judged, graded=verifier.graded, margin=margin)
            if isinstance(choice, str):
                setattr(stats, choice, getattr(stats, choice) + 1)
                continue
            ci, ri = choice
            records.append(_pair_record(item, judged[ci], judged[ri], rs[ci], rs[ri], spec))
            stats.pairs += 1
    return records, stats


def write_pairs(records: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def pairs_from_checkpoint(ckpt: str | Path, prompts: str, verifier_spec: str, out: str | Path, *,
                          limit: int | None = None, val_fraction: float | None = None, say=print,
                          progress: ProgressHook | None = None, **sampling) -> PairStats:
    """The `slm pairs` command: load, read prompts, sample, judge, write; returns the counts. ``progress``
    draws the sampling and verifying bars (see `make_pairs`)."""
    from ..checkpoint import load_checkpoint
    from ..data import special_token_ids
    from .verifiers import build_verifier

    ck = load_checkpoint(ckpt)
    tok = ck.tokenizer()
    verifier = build_verifier(verifier_spec, tokenizer=tok)
    problems: list[str] = []
    stop_ids = None
    if prompts == "default":
        if val_fraction is None:
            val_fraction, why = heldout_fraction(ck.provenance)
            say(f"default prompts: held-out stdlib files, {why}")
        items = default_prompts(limit=limit or 200, val_fraction=val_fraction)
    else:
        render = None
        try:
            template, variables = chat_template_of(ck.path)
            render = lambda m: render_chat(template, m, add_generation_prompt=True, **variables)  # noqa: E731
            specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
            marker = assistant_end_marker(template, specials, **variables).strip()
            marker_id = tok.token_to_id(marker) if marker else None
        except ChatTemplateError:
            marker_id = None
        items = read_prompts(prompts, template=render, problems=problems)[:limit]
        if any(i.chat for i in items) and marker_id is not None:  # a chat reply ends at the end marker
            eos = special_token_ids(tok)["eos"]
            stop_ids = sorted({marker_id} | ({eos} if eos is not None else set()))
    for p in problems[:20]:
        say(f"skipped {p}")
    records, stats = make_pairs(ck.model, tok, items, verifier, stop_token_ids=stop_ids, progress=progress,
                                **sampling)
    stats.problems = problems
    write_pairs(records, out)
    return stats
