"""`slm eval --tasks ...`: one call that scores a checkpoint on several tasks and returns one JSON.

Task names:
- `lm`: bits per byte, perplexity and top-1 accuracy on the dataset's held-out split (needs `--data`);
- `next-line`: built in, default domain — pick the real next line of a held-out standard-library file among
  distractor lines from other held-out files (multiple choice, `acc` and `acc_norm`);
- `function-parse`: built in, default domain — complete a held-out function from its signature (and
  docstring, where it has one); the pass rate is the fraction whose completion parses (`python-syntax`
  verifier). These are the `eval` half of the functions; `slm pairs --prompts default` uses the other half;
- `function-exec`: built in, default domain — the same kind of prompts, judged by running the completed
  function (`python-exec` verifier): it must behave as the standard library's own implementation does on
  probed arguments (return value, `self` and arguments afterwards). Only functions whose prompt determines
  them (no other library function has the same prompt and another body) and whose probed cases every
  trivial body (`pass`, `return x`, a constant) fails are asked: 19 of the `eval` half's 103 functions at
  `val_fraction` 0.02, 36 at 0.05, only 4 of 39 at 0.01. The held-out docstrings hold no `>>>` examples
  to run instead;
- `ood`: bits per byte on English prose outside the domain that every machine carries (licence texts of the
  Python installation and `/usr/share/common-licenses`; see `slmkit.evaluate.ood`): what specialisation
  costs elsewhere. `ood:N` scores the first N bytes of that text (default 65536), the same bytes for every
  tokenizer;
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
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .tasks import TaskData

# A progress hook: called once per task with (description, total units); returns the function to call with
# each batch's units done (or None for no progress).
ProgressHook = Callable[[str, int], "Callable[[int], None] | None"]


def _task_error(message: str) -> ValueError:
    """A `slmkit.evaluate.tasks.TaskError` (imported on first use: this module is read by `slm --help`)."""
    from .tasks import TaskError

    return TaskError(message)

BUILTIN_TASKS = ("lm", "next-line", "function-parse", "function-exec", "ood")


@dataclass(frozen=True)
class SuiteConfig:
    """What `slm eval`, recipe `eval`/`select` stages and `run_suite` score with: one set of defaults, so the
    `lm` numbers are the same whichever entry point, and whichever other tasks, ran."""

    seq_len: int = 256
    max_tokens: int | None = 65536  # held-out tokens scored by `lm` (None: the whole split)
    items: int = 200  # items per built-in task
    max_new_tokens: int = 128  # generation tasks
    batch_size: int = 16  # multiple-choice continuations (or generation prompts) per forward
    seed: int = 0
    split: str = "val"  # the dataset split `lm` scores
    precision: str = "fp32"  # fp32 | bf16 (autocast) for `lm`

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise _task_error(f"precision={self.precision!r}: use fp32 or bf16")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _task_error(f"max_tokens={self.max_tokens}: give a positive token count (or none for the whole split)")


def score_lm(model, data, cfg: SuiteConfig, progress=None) -> dict:
    """The `lm` task: bits per byte, perplexity and top-1 accuracy on `cfg.split` of dataset `data`."""
    import torch

    from ..data import token_byte_lengths
    from .lm import evaluate_lm, lm_windows

    if data is None:
        raise _task_error("the lm task scores the dataset's held-out split: pass --data DIR")
    stream = data.split(cfg.split)
    advance = progress(f"lm ({cfg.split} bits/byte)", lm_windows(len(stream), cfg.seq_len, cfg.max_tokens)) \
        if progress is not None else None
    return evaluate_lm(model, stream, token_byte_lengths(data.tokenizer()), seq_len=cfg.seq_len,
                       max_tokens=cfg.max_tokens, autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                       progress=advance)


def score_ood_task(model, tokenizer, name: str, cfg: SuiteConfig, progress=None) -> dict:
    """The `ood` task (`ood:N`: the first N bytes of the prose): bits per byte outside the domain."""
    import torch

    from .ood import DEFAULT_MAX_BYTES, score_ood

    count = name.partition(":")[2]
    return score_ood(model, tokenizer, seq_len=cfg.seq_len, max_bytes=int(count) if count else DEFAULT_MAX_BYTES,
                     autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None, progress=progress)


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
            raise _task_error(f"unknown task {t!r}: use {', '.join(BUILTIN_TASKS)} (NAME:N for N items) or a .jsonl "
                            "task file (optionally FILE.jsonl@VERIFIER)")
        if count and (name == "lm" or not count.isdigit() or int(count) < 1):
            raise _task_error(f"task {t!r}: ':N' sets the item count of next-line, function-parse or function-exec "
                              "(the bytes of prose for ood), N >= 1")
    return tasks


@functools.lru_cache(maxsize=8)  # a selection scores several candidates on the same items
def builtin_task(name: str, cfg: SuiteConfig, val_fraction: float | None = None) -> TaskData:
    """The default domain's held-out tasks (see `slmkit.data.default_tasks`). Items come from the files the
    dataset held out: pass the dataset's `val_fraction` (a smaller one than training used is safe, a larger
    one would draw from training files)."""
    from ..data import default_tasks
    from .tasks import ChoiceItem, GenerationItem, TaskData

    vf = val_fraction or default_tasks.DEFAULT_VAL_FRACTION
    if name == "next-line":
        raw = default_tasks.next_line_items(limit=cfg.items, seed=cfg.seed, val_fraction=vf)
        items = [ChoiceItem(r.context, list(r.choices), r.answer) for r in raw]
        return TaskData(name, "choice", items)
    if name == "function-exec":
        from ..align.exec_verifier import executable_functions
        from ..align.verifiers import PythonExec

        found = executable_functions(limit=cfg.items, seed=cfg.seed, val_fraction=vf)
        if not found:
            raise _task_error(f"function-exec: no held-out function at val_fraction={vf} can be judged by running "
                              "it; a dataset with a larger val_fraction holds out more")
        verifier = PythonExec()
        verifier.add_references({r.prompt: r for r in found})
        return TaskData(name, "generation", [GenerationItem(r.prompt, r.body) for r in found], verifier=verifier)
    raw = default_tasks.function_prompts(limit=cfg.items, seed=cfg.seed, val_fraction=vf, require_docstring=False,
                                         part="eval")
    return TaskData(name, "generation", [GenerationItem(r.prompt, r.body) for r in raw])


def run_suite(model, tokenizer, tasks: list[str], *, data=None, cfg: SuiteConfig = SuiteConfig(),
              progress: ProgressHook | None = None) -> dict:
    """Score `model` on `tasks`; returns {"tasks": {name: result}, "summary": {metric: value}}.
    Each task is scored the same whichever others run beside it (the `lm` task by `score_lm` alone).

    The summary holds the headline numbers a selection compares: bits_per_byte, perplexity, accuracy (lm),
    next_line_acc, parse_rate, exec_pass_rate, ood_bits_per_byte, and `<file>_acc` / `<file>_score` for task
    files."""
    from .tasks import load_task_file, score_choice_task, score_generation_task

    results: dict[str, dict] = {}
    summary: dict[str, float] = {}
    bos = model.config.bos_token_id
    for name in tasks:
        t0 = time.perf_counter()
        if name == "lm":
            res = score_lm(model, data, cfg, progress)
            summary.update(bits_per_byte=res["bits_per_byte"], perplexity=res["perplexity"], accuracy=res["accuracy"])
        elif name.partition(":")[0] == "ood":
            res = score_ood_task(model, tokenizer, name, cfg, progress)
            name = "ood"
            summary["ood_bits_per_byte"] = res["bits_per_byte"]
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
                advance = progress(f"{name} (multiple choice)", sum(len(it.choices) for it in task.items)) \
                    if progress is not None else None
                res = score_choice_task(model, tokenizer, task.items, batch_size=cfg.batch_size, bos_id=bos,
                                        progress=advance)
                res.pop("loglikelihoods")
                summary["next_line_acc" if name == "next-line" else f"{task.name}_acc"] = res["acc"]
            else:
                functions = name in ("function-parse", "function-exec")
                scorer = scorer or task.verifier or ("python-syntax" if name == "function-parse" else "rouge-l")
                advance = progress(f"{name} (generation)", len(task.items)) if progress is not None else None
                res = score_generation_task(model, tokenizer, task.items, scorer=scorer,
                                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                            seed=cfg.seed, stop=["\ndef ", "\nclass ", "\n\n\n"]
                                            if functions else None, progress=advance)
                if functions:
                    summary["parse_rate" if name == "function-parse" else "exec_pass_rate"] = res["pass_rate"]
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
                        cfg: SuiteConfig = SuiteConfig(), progress: ProgressHook | None = None) -> dict:
    """Load a checkpoint (and dataset) and `run_suite`; the dataset must share the checkpoint's tokenizer."""
    from ..checkpoint import load_checkpoint
    from ..compress.vocab_remap import dataset_for_checkpoint
    from ..data import open_dataset

    ck = load_checkpoint(path)
    ds = open_dataset(data) if data is not None else None
    if ds is not None:  # a vocabulary-trimmed checkpoint reads the dataset in its own ids
        ds = dataset_for_checkpoint(ds, path, splits=(cfg.split,))
    if ck.tokenizer_path is None:
        raise _task_error(f"{path}: no tokenizer.json; tasks need the checkpoint's tokenizer")
    result = run_suite(ck.model, ck.tokenizer(), tasks, data=ds, cfg=cfg, progress=progress)
    return {"checkpoint": str(path), "data": str(data) if data else None, **result}
