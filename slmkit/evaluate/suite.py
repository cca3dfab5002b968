"""`slm eval --tasks ...`: one call that scores a checkpoint on several tasks and returns one JSON.

Task names:
- `lm`: bits per byte, perplexity and top-1 accuracy on the dataset's held-out split (needs `--data`);
- `next-line`: built in, default domain — pick the real next line of a held-out standard-library file among
  distractor lines from other held-out files (multiple choice, `acc` and `acc_norm`);
- `function-parse`: built in, default domain — complete a held-out function from its signature (and
  docstring, where it has one); the pass rate is the fraction whose completion parses (`python-syntax`
  verifier). These are the `eval` half of the functions; `slm pairs --prompts default` uses the other half;
- `PATH.jsonl`: a task file (multiple choice or generation, see `slmkit.evaluate.tasks`); a generation file
  is scored with ROUGE-L against `reference`, or with a verifier given after `@`:
  `prompts.jsonl@python-syntax`, `api.jsonl@json:schema=schema.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .tasks import TaskData, TaskError, load_task_file, score_choice_task, score_generation_task

BUILTIN_TASKS = ("lm", "next-line", "function-parse")


@dataclass(frozen=True)
class SuiteConfig:
    seq_len: int = 256
    max_tokens: int | None = 65536  # held-out tokens scored by `lm`
    items: int = 200  # items per built-in task
    max_new_tokens: int = 128  # generation tasks
    batch_size: int = 16
    seed: int = 0


def parse_tasks(text: str | list[str] | None) -> list[str]:
    if text is None:
        return ["lm"]
    items = text if isinstance(text, list) else [t for t in text.split(",")]
    tasks = [t.strip() for t in items if t.strip()]
    for t in tasks:
        if t.split("@", 1)[0].endswith(".jsonl"):
            continue
        name, _, count = t.partition(":")
        if name not in BUILTIN_TASKS:
            raise TaskError(f"unknown task {t!r}: use {', '.join(BUILTIN_TASKS)} (NAME:N for N items) or a .jsonl "
                            "task file (optionally FILE.jsonl@VERIFIER)")
        if count and (name == "lm" or not count.isdigit() or int(count) < 1):
            raise TaskError(f"task {t!r}: ':N' sets the item count of next-line or function-parse, N >= 1")
    return tasks


@functools.lru_cache(maxsize=8)  # a selection scores several candidates on the same items
def builtin_task(name: str, cfg: SuiteConfig, val_fraction: float | None = None) -> TaskData:
    """The default domain's held-out tasks (see `slmkit.data.default_tasks`). Items come from the files the
    dataset held out: pass the dataset's `val_fraction` (a smaller one than training used is safe, a larger
    one would draw from training files)."""
    from ..data import default_tasks
    from .tasks import ChoiceItem, GenerationItem

    vf = val_fraction or default_tasks.DEFAULT_VAL_FRACTION
    if name == "next-line":
        raw = default_tasks.next_line_items(limit=cfg.items, seed=cfg.seed, val_fraction=vf)
        items = [ChoiceItem(r.context, list(r.choices), r.answer) for r in raw]
        return TaskData(name, "choice", items)
    raw = default_tasks.function_prompts(limit=cfg.items, seed=cfg.seed, val_fraction=vf, require_docstring=False,
                                         part="eval")
    return TaskData(name, "generation", [GenerationItem(r.prompt, r.body) for r in raw])


def run_suite(model, tokenizer, tasks: list[str], *, data=None, cfg: SuiteConfig = SuiteConfig(),
              progress=None) -> dict:
    """Score `model` on `tasks`; returns {"tasks": {name: result}, "summary": {metric: value}}.

    The summary holds the headline numbers a selection compares: bits_per_byte, perplexity, accuracy (lm),
    next_line_acc, parse_rate, and `<file>_acc` / `<file>_score` for task files."""
    results: dict[str, dict] = {}
    summary: dict[str, float] = {}
    bos = model.config.bos_token_id
    for name in tasks:
        t0 = time.perf_counter()
        if name == "lm":
            if data is None:
                raise TaskError("the lm task scores the dataset's held-out split: pass --data DIR")
            from ..data import token_byte_lengths
            from .lm import evaluate_lm

            res = evaluate_lm(model, data.split("val"), token_byte_lengths(data.tokenizer()), seq_len=cfg.seq_len,
                              max_tokens=cfg.max_tokens)
            summary.update(bits_per_byte=res["bits_per_byte"], perplexity=res["perplexity"], accuracy=res["accuracy"])
        else:
            path, _, scorer = name.partition("@")
            vf = data.meta.get("val_fraction") if data is not None else None
            builtin, _, count = name.partition(":")  # next-line:400 -> 400 items instead of cfg.items
            if builtin in BUILTIN_TASKS:
                name = builtin
                task = builtin_task(name, dataclasses.replace(cfg, items=int(count)) if count else cfg, vf)
            else:
                task = load_task_file(path)
            if task.kind == "choice":
                res = score_choice_task(model, tokenizer, task.items, batch_size=cfg.batch_size, bos_id=bos,
                                        progress=progress)
                res.pop("loglikelihoods")
                summary["next_line_acc" if name == "next-line" else f"{task.name}_acc"] = res["acc"]
            else:
                scorer = scorer or ("python-syntax" if name == "function-parse" else "rouge-l")
                res = score_generation_task(model, tokenizer, task.items, scorer=scorer,
                                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                            seed=cfg.seed, stop=["\ndef ", "\nclass ", "\n\n\n"]
                                            if name == "function-parse" else None, progress=progress)
                if name == "function-parse":
                    summary["parse_rate"] = res["pass_rate"]
                else:
                    summary[f"{task.name}_score"] = res["score"]
                    if "pass_rate" in res:
                        summary[f"{task.name}_pass_rate"] = res["pass_rate"]
            if task.skipped:
                res["skipped_lines"] = task.skipped
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
    return {"tasks": results, "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                          for k, v in summary.items()}}


def evaluate_checkpoint(path: str | Path, tasks: list[str], *, data: str | Path | None = None,
                        cfg: SuiteConfig = SuiteConfig(), progress=None) -> dict:
    """Load a checkpoint (and dataset) and `run_suite`; the dataset must share the checkpoint's tokenizer."""
    from ..checkpoint import load_checkpoint
    from ..data import check_same_tokenizer, open_dataset

    ck = load_checkpoint(path)
    ds = open_dataset(data) if data is not None else None
    if ds is not None:
        check_same_tokenizer(ds, ck.tokenizer_path)
    if ck.tokenizer_path is None:
        raise TaskError(f"{path}: no tokenizer.json; tasks need the checkpoint's tokenizer")
    result = run_suite(ck.model, ck.tokenizer(), tasks, data=ds, cfg=cfg, progress=progress)
    return {"checkpoint": str(path), "data": str(data) if data else None, **result}
