"""The caller's half of the ``python-exec`` verifier: from (prompt, completion) to sandbox jobs and back.

A completion is first cut and parsed exactly as ``python-syntax`` does; what parses becomes a job for
:mod:`slmkit.align.exec_sandbox` with what the function is tested against:

- the ``>>>`` examples of its docstring (doctest), when it has any;
- its *reference*, when the prompt is a function of the default domain (the running interpreter's standard
  library): the library's own implementation, found by the prompt's exact text (a ``def`` signature and
  docstring, dedented, decorators dropped: how ``slmkit.data.default_tasks`` writes prompts) or given to
  the verifier (``PythonExec.add_references``). A prompt that functions with different bodies share
  (``def getregentry():`` in every codec module) has no reference unless one is given.

The default domain's held-out functions carry no doctest examples (none at ``val_fraction`` 0.01 to 0.05,
one at 0.1; the library's 246 functions with ``>>>`` examples sit almost all in files a model trains on),
so on that domain the reference is what judges behaviour; ``prepare_references`` tells which references can
judge at all (see :mod:`slmkit.align.exec_judge`: deterministic cases that every trivial body fails).
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Reference:
    """A standard-library function a completion is compared with."""

    task_id: str  # "stdlib/xml/sax/xmlreader.py:228:InputSource.setEncoding"
    module: str  # "xml.sax.xmlreader"
    file: str
    prompt: str  # as `slmkit.data.default_tasks` writes it
    body: str  # the real body (the sandbox checks that prompt + body passes the cases it keeps)

    def job(self) -> dict:
        _, line, qualname = self.task_id.rsplit(":", 2)
        return {"module": self.module, "file": self.file, "qualname": qualname, "line": int(line),
                "source": self.prompt + self.body}


def module_name(doc_id: str) -> str:
    """'stdlib/xml/sax/xmlreader.py' -> 'xml.sax.xmlreader'; 'stdlib/json/__init__.py' -> 'json'."""
    parts = doc_id.removeprefix("stdlib/").removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


@functools.lru_cache(maxsize=1)
def _stdlib_paths() -> dict[str, Path]:
    from ..data.sources import default_stdlib_files

    return dict(default_stdlib_files())


def reference_of(task) -> Reference:
    """The reference of a `slmkit.data.default_tasks.FunctionTask` (id, prompt, body)."""
    doc_id = task.id.rsplit(":", 2)[0]
    return Reference(task.id, module_name(doc_id), str(_stdlib_paths()[doc_id]), task.prompt, task.body)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w+[^\n]*", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def _stdlib_def_lines() -> dict[str, list[str]]:
    """The first line of every ``def`` in the standard library (stripped) -> ids of the files holding it."""
    index: dict[str, list[str]] = {}
    for doc_id, path in _stdlib_paths().items():
        for m in _DEF.finditer(_read(path)):
            files = index.setdefault(m.group(0).strip(), [])
            if not files or files[-1] != doc_id:
                files.append(doc_id)
    return index


@functools.lru_cache(maxsize=256)
def _file_tasks(doc_id: str) -> list:
    from ..data.default_tasks import file_function_tasks

    return file_function_tasks(doc_id, _read(_stdlib_paths()[doc_id]), max_prompt_chars=1 << 30,
                               max_body_lines=1 << 30, require_docstring=False)


@functools.lru_cache(maxsize=4096)
def find_reference(prompt: str) -> tuple[Reference | None, str]:
    """(the standard-library function whose prompt is exactly ``prompt``, or None; why not)."""
    first = _DEF.search(prompt)
    if first is None:
        return None, "the prompt has no def"
    prompt = prompt.rstrip("\n")
    lines = [ln.strip() for ln in prompt.splitlines() if ln.strip()]
    matches = []
    for doc_id in _stdlib_def_lines().get(first.group(0).strip(), []):
        text = _read(_stdlib_paths()[doc_id])
        if not all(ln in text for ln in lines):  # cheap test before parsing the file
            continue
        matches += [t for t in _file_tasks(doc_id) if t.prompt == prompt]
        if len({t.body for t in matches}) > 1:
            return None, (f"standard-library functions with this prompt differ ({matches[0].id}, "
                          f"{next(t.id for t in matches if t.body != matches[0].body)})")
    if not matches:
        return None, "the prompt is not a standard-library function"
    return reference_of(matches[0]), ""


def docstring_examples(source: str) -> str | None:
    """The docstring of the last top-level ``def`` of ``source`` when it holds ``>>>`` examples."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    doc = ast.get_docstring(defs[-1], clean=True) if defs else None
    return doc if doc and ">>>" in doc else None


def prepare_references(references: list[Reference], *, timeout: float, memory_mb: int) -> list[dict]:
    """For each reference: {"decidable", "cases", "reason"} (one sandbox process for all)."""
    from .exec_sandbox import run_jobs

    return run_jobs([{"op": "prepare", "reference": r.job()} for r in references], timeout=timeout,
                    memory_mb=memory_mb)


def executable_functions(*, limit: int, seed: int = 0, val_fraction: float, timeout: float = 1.0,
                         memory_mb: int = 1024) -> list[Reference]:
    """Up to ``limit`` held-out functions of the default domain (the `eval` half, in the seeded order of
    `slmkit.data.default_tasks.function_prompts`) that running can judge: the prompt determines the
    function (no other standard-library function has the same prompt and another body; one item per
    prompt) and the sandbox keeps cases for it that every trivial body fails."""
    from ..data.default_tasks import function_prompts

    tasks = function_prompts(limit=1 << 30, seed=seed, val_fraction=val_fraction, require_docstring=False,
                             part="eval")
    kept: list[Reference] = []
    seen: set[str] = set()
    step = max(2 * limit, 32)
    for start in range(0, len(tasks), step):
        batch = []
        for task in tasks[start:start + step]:
            if task.prompt not in seen and find_reference(task.prompt)[0] is not None:
                batch.append(reference_of(task))
            seen.add(task.prompt)
        verdicts = prepare_references(batch, timeout=timeout, memory_mb=memory_mb) if batch else []
        kept += [ref for ref, v in zip(batch, verdicts) if v["decidable"]]
        if len(kept) >= limit:
            break
    return kept[:limit]
