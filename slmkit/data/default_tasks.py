"""Tasks from the held-out files of the default domain (the Python standard library's source).

Held-out files are those `slm data` puts in the val split: ``split_of("stdlib/<path>", val_fraction) == "val"``
over ``default_stdlib_files()`` — the same ids, listing and hash, so no task ever comes from a file a model
trained on the default domain saw (at any ``val_fraction`` at least as large as the one given here: a smaller
fraction picks a subset of the same held-out files).

- :func:`function_prompts`: top-level functions and methods with a docstring (optionally also those
  without, prompted by the signature alone); the prompt is the ``def``
  signature and docstring (dedented to column 0, decorators dropped), the reference body is kept for
  evaluation. Verifiers (``python-syntax``) and DPO use the prompts; the eval suite scores completions.
- :func:`next_line_items`: a context of preceding lines, the real next line and three distractor lines drawn
  from *other* held-out files, re-indented to the real line's indentation (so indentation alone does not give
  the answer), in a seeded order.

Both are deterministic: candidates are ranked by a SHA-256 of ``seed`` and their id and the first ``limit`` are
kept, so the selection is spread over files and stable across runs and machines. Caveat: `slm data` drops
documents whose text duplicates an earlier one; a held-out file identical to a training file (an empty
``__init__.py``) yields no tasks, since it has no functions or lines worth asking about.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .build import split_of
from .sources import default_stdlib_files

DEFAULT_VAL_FRACTION = 0.01  # `slm data`'s default


@dataclass(frozen=True)
class FunctionTask:
    id: str  # "stdlib/json/decoder.py:123:JSONDecoder.decode"
    prompt: str  # signature + docstring, column 0, without the newline that ends its last line
    body: str  # the reference body (indented as in the prompt), starting with that newline
    name: str  # qualified name


@dataclass(frozen=True)
class NextLineItem:
    id: str  # "stdlib/json/decoder.py:124"
    context: str  # the preceding lines, each ending with a newline
    choices: list[str]  # four lines (no newline), in a seeded order
    answer: int  # index of the real next line in choices


def heldout_files(val_fraction: float = DEFAULT_VAL_FRACTION,
                  files: Iterable[tuple[str, Path]] | None = None) -> list[tuple[str, Path]]:
    """(id, path) of the default domain's held-out files. ``files`` defaults to ``default_stdlib_files()``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): with none held out there are no tasks")
    files = default_stdlib_files() if files is None else files
    return sorted((doc_id, Path(p)) for doc_id, p in files if split_of(doc_id, val_fraction) == "val")


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _functions(tree: ast.Module) -> Iterable[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def _dedent(lines: list[str], width: int) -> list[str] | None:
    out = []
    for line in lines:
        if line.strip() and not line.startswith(" " * width):
            return None  # a line left of the def (inside a string): plain dedenting would change the code
        out.append(line[width:] if line.strip() else line.lstrip(" \t"))
    return out


def file_function_tasks(doc_id: str, text: str, *, max_prompt_chars: int = 1200, max_body_lines: int = 25,
                        require_docstring: bool = True) -> list[FunctionTask]:
    """Function-completion tasks of one file's source: functions with a docstring and a body after it (or,
    with ``require_docstring=False``, also undocumented functions, prompted with their signature alone)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    tasks = []
    for qualname, node in _functions(tree):
        first = node.body[0]
        has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                   and isinstance(first.value.value, str))
        if has_doc:
            if len(node.body) < 2 or node.body[1].lineno <= first.end_lineno:
                continue  # no body after the docstring, or code on the docstring's last line
            prompt_end = first.end_lineno
        elif require_docstring or first.lineno == node.lineno:
            continue  # no docstring (or a one-line function: no body line to complete)
        else:
            prompt_end = first.lineno - 1
            if not lines[prompt_end - 1].rstrip().endswith(":"):
                continue  # comments between the signature and the body: keep prompts plain
        width = node.col_offset
        prompt = _dedent(lines[node.lineno - 1:prompt_end], width)
        body = _dedent(lines[prompt_end:node.end_lineno], width)
        if prompt is None or body is None:
            continue
        # The prompt stops before the newline that ends the docstring (or signature) line: in training text
        # byte-level BPE merges that newline with the next line's indentation into one token, so a prompt
        # ending in a bare "\n" would put the model at a token boundary it has rarely seen.
        prompt_text = "".join(prompt).rstrip("\n")
        body_text = "\n" + "".join(body).rstrip() + "\n"
        if len(prompt_text) > max_prompt_chars or body_text.count("\n") > max_body_lines:
            continue
        try:
            ast.parse(prompt_text + body_text)
        except SyntaxError:
            continue
        tasks.append(FunctionTask(f"{doc_id}:{node.lineno}:{qualname}", prompt_text, body_text, qualname))
    return tasks


FUNCTION_PARTS = ("all", "eval", "pairs")


def function_part(task_id: str) -> str:
    """'eval' or 'pairs': a fixed half of the functions each (by a hash of the id, independent of the seed), so
    that preference pairs are never made from the prompts that measure what DPO did."""
    return "eval" if hashlib.sha256(f"part:{task_id}".encode()).digest()[0] < 128 else "pairs"


def function_prompts(*, limit: int = 200, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION,
                     files: Iterable[tuple[str, Path]] | None = None, max_prompt_chars: int = 1200,
                     max_body_lines: int = 25, require_docstring: bool = True, part: str = "all"
                     ) -> list[FunctionTask]:
    """Up to ``limit`` function-completion tasks from held-out files, in a seeded, stable order; ``part``
    keeps only the `eval` or the `pairs` half (see `function_part`)."""
    if part not in FUNCTION_PARTS:
        raise ValueError(f"part={part!r} must be one of {', '.join(FUNCTION_PARTS)}")
    tasks = []
    for doc_id, path in heldout_files(val_fraction, files):
        text = _read(path)
        if text is not None:
            tasks += file_function_tasks(doc_id, text, max_prompt_chars=max_prompt_chars,
                                         max_body_lines=max_body_lines, require_docstring=require_docstring)
    if part != "all":
        tasks = [t for t in tasks if function_part(t.id) == part]
    tasks.sort(key=lambda t: _rank(seed, t.id))
    return tasks[:limit]


def _candidate_lines(text: str, min_chars: int) -> list[int]:
    return [i for i, line in enumerate(text.splitlines()) if len(line.strip()) >= min_chars]


def next_line_items(*, limit: int = 200, seed: int = 0, context_lines: int = 8, distractors: int = 3,
                    min_chars: int = 12, val_fraction: float = DEFAULT_VAL_FRACTION,
                    files: Iterable[tuple[str, Path]] | None = None) -> list[NextLineItem]:
    """Up to ``limit`` multiple-choice next-line items from held-out files (see the module docstring)."""
    texts = {}
    for doc_id, path in heldout_files(val_fraction, files):
        text = _read(path)
        if text is not None and text.strip():
            texts[doc_id] = text.splitlines()
    if len(texts) < 2:
        raise ValueError(f"next-line items need at least two held-out files for distractors, found {len(texts)}; "
                         "raise val_fraction")
    pool = {doc_id: [ln.strip() for ln in lines if len(ln.strip()) >= min_chars] for doc_id, lines in texts.items()}
    candidates = [(doc_id, i) for doc_id, lines in texts.items() for i in range(context_lines, len(lines))
                  if len(lines[i].strip()) >= min_chars]
    candidates.sort(key=lambda c: _rank(seed, f"{c[0]}:{c[1] + 1}"))
    others_all = sorted(texts)
    items = []
    for doc_id, i in candidates:
        if len(items) >= limit:
            break
        lines = texts[doc_id]
        real = lines[i]
        indent = real[:len(real) - len(real.lstrip())]
        chosen = _distractors(seed, f"{doc_id}:{i + 1}", real.strip(), pool, [d for d in others_all if d != doc_id],
                              distractors)
        if chosen is None:
            continue
        choices = [real] + [indent + d for d in chosen]
        order = sorted(range(len(choices)), key=lambda k: _rank(seed, f"{doc_id}:{i + 1}:order:{k}"))
        context = "".join(ln + "\n" for ln in lines[i - context_lines:i])
        items.append(NextLineItem(f"{doc_id}:{i + 1}", context, [choices[k] for k in order], order.index(0)))
    return items


def _distractors(seed: int, key: str, real: str, pool: dict[str, list[str]], others: list[str],
                 n: int) -> list[str] | None:
    """``n`` distinct stripped lines from other files, none equal to ``real``, picked by hash; None if short."""
    picked: list[str] = []
    for attempt in range(8 * n):
        h = _rank(seed, f"{key}:distractor:{attempt}")
        lines = pool[others[int.from_bytes(h[:4], "big") % len(others)]]
        if not lines:
            continue
        line = lines[int.from_bytes(h[4:8], "big") % len(lines)]
        if line != real and line not in picked:
            picked.append(line)
            if len(picked) == n:
                return picked
    return None


def write_jsonl(items: Iterable, path: str | Path) -> int:
    """Write dataclass items (or dicts) one JSON object per line; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item) if hasattr(item, "__dataclass_fields__") else item,
                               ensure_ascii=False) + "\n")
            n += 1
    return n


def write_function_prompts(path: str | Path, **kwargs) -> int:
    return write_jsonl(function_prompts(**kwargs), path)


def write_next_line_items(path: str | Path, **kwargs) -> int:
    return write_jsonl(next_line_items(**kwargs), path)
