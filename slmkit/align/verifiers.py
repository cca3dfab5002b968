"""Verifiers: programs that judge a completion of a prompt, for synthesizing preference pairs (`slm pairs`).

A verifier maps ``(prompt, completion)`` to ``VerifierResult(passed, score, reason)``. ``VERIFIERS`` maps a name
to a factory (a dataclass whose fields are the verifier's options); :func:`build_verifier` reads the same
``NAME:key=value,...`` syntax as ``slm compress --pass`` (a value may contain commas unless they are followed
by ``key=``). Built-ins:

- ``python-syntax``: the prompt (e.g. a ``def`` signature and docstring) followed by the completion must parse
  with ``ast.parse``. *Cut rule*: the function ends at the first non-blank line of the completion whose
  indentation is at or below the indentation of the last ``def`` in the prompt; the completion is judged up
  to that line (and ``span`` holds that part), so a model that writes on past the function is judged on the
  function. A line of a multi-line string that is dedented that far also ends it (the rule reads lines, not
  tokens). A method (indented ``def``) is judged from its ``def`` line, dedented. With ``require_body=true``
  (default) a completion with no statement (blank or comments only) fails, because the docstring alone
  already parses.
- ``python-exec``: the function (cut and parsed as ``python-syntax`` does) *runs and does what it should*,
  judged in a sandbox process (``exec_sandbox.py``: its own session and temporary directory, ``python -I -S``,
  limits on memory, CPU time and file size, a timer per call, no process creation, network or file changes
  outside that directory): the ``>>>`` examples of its docstring pass (doctest), and, when the prompt is a
  function of the standard library (``reference=true``, default; the default domain's prompts), it behaves
  as the library's own implementation does on probed arguments: same return value, same ``self`` and
  arguments afterwards. Only references whose cases every trivial body (``pass``, ``return x``, a constant)
  fails can judge, so ``return x`` never passes. A prompt with neither fails, saying so. Options:
  ``timeout`` (seconds per call, 1), ``memory_mb`` (1024), ``grace`` (seconds without progress before the
  process is killed, 10). A syntax error, exception, timeout, memory error or a crash of the process is a
  failed verdict with its reason.
- ``json``: the completion (stripped; with ``extract=true`` the first JSON object or array in it) is valid JSON,
  and, with ``schema=FILE``, conforms to it (a small subset of JSON Schema, see ``json_schema.py``).
- ``regex``: ``pattern=`` must match somewhere (``re.search``), or the whole completion with ``fullmatch=true``.
- ``length``: ``min_chars``/``max_chars`` and/or ``min_tokens``/``max_tokens`` (tokens of ``tokenizer=PATH`` or
  of the tokenizer of the model being sampled).
- ``teacher``: the mean log-likelihood (nats/token) of the completion's tokens given the prompt under
  ``ckpt=PATH``; graded (pairs rank by it), passing at or above ``threshold`` when one is given.
- plug-ins: ``module:function`` or ``path/to/file.py:function`` (optionally ``:key=value,...``, passed to the
  function as keyword string arguments). The function takes ``(prompt, completion)`` and returns a bool, a
  number (a graded score; ``threshold=`` makes it pass/fail too) or a ``VerifierResult``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


class VerifierError(ValueError):
    """A verifier spec or option that cannot be used; the message says which and what to write instead."""


@dataclass(frozen=True)
class VerifierResult:
    passed: bool
    score: float
    reason: str = ""
    span: str | None = None  # the part of the completion the verdict is about (None: all of it)


class Verifier:
    """Base class: subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str] = ""
    graded: ClassVar[bool] = False  # scores are more than pass/fail (rank by them)

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        raise NotImplementedError

    def score_batch(self, prompts: list[str], completions: list[str]) -> list[VerifierResult]:
        return [self(p, c) for p, c in zip(prompts, completions)]

    def describe(self) -> str:
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if not f.name.startswith("_") and getattr(self, f.name) != f.default and f.init)
        return f"{self.name}:{opts}" if opts else self.name


VERIFIERS: dict[str, type[Verifier]] = {}


def register(cls: type[Verifier]) -> type[Verifier]:
    VERIFIERS[cls.name] = cls
    return cls


def _pass(ok: bool, reason: str = "", span: str | None = None) -> VerifierResult:
    return VerifierResult(bool(ok), 1.0 if ok else 0.0, reason, span)


# -- python-syntax -------------------------------------------------------------------------------

_DEF_LINE = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]", re.M)


def _indent_width(line: str) -> int:
    stripped = line.lstrip(" \t")
    return len(line[:len(line) - len(stripped)].expandtabs(8))


def cut_function_body(prompt: str, completion: str, def_indent: int) -> str:
    """``completion`` up to the first non-blank line that starts at or left of ``def_indent``."""
    text = prompt + completion
    start = len(prompt)
    offset = 0 if start == 0 or prompt.endswith("\n") else completion.find("\n") + 1
    if offset == 0 and start and not prompt.endswith("\n"):
        return completion  # a one-line completion of the prompt's last line
    while offset < len(completion):
        end = text.find("\n", start + offset)
        line = text[start + offset:end if end >= 0 else len(text)]
        if line.strip() and _indent_width(line) <= def_indent:
            return completion[:offset]
        if end < 0:
            break
        offset = end - start + 1
    return completion


def _dedent_by(text: str, width: int) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        k = 0
        while k < len(line) and line[k] in " \t" and _indent_width(line[:k + 1]) <= width:
            k += 1
        out.append(line[k:])
    return "".join(out)


def judged_source(prompt: str, span: str) -> tuple[str, int]:
    """(the code a function verifier judges, the prompt line it starts at): ``prompt + span``, or for a
    method (an indented last ``def``) the text from that ``def`` line on, dedented."""
    defs = list(_DEF_LINE.finditer(prompt))
    indent = len(defs[-1].group(1).expandtabs(8)) if defs else 0
    if indent <= 0:
        return prompt + span, 1
    cut_at = defs[-1].start()
    return _dedent_by((prompt + span)[cut_at:], indent), prompt.count("\n", 0, cut_at) + 1


@register
@dataclass
class PythonSyntax(Verifier):
    name: ClassVar[str] = "python-syntax"
    require_body: bool = True  # the completion must hold at least one statement
    cut: bool = True  # judge the completion only up to the end of the function (see the module docstring)

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        defs = list(_DEF_LINE.finditer(prompt))
        indent = len(defs[-1].group(1).expandtabs(8)) if defs else -1
        span = cut_function_body(prompt, completion, indent) if (self.cut and defs) else completion
        code_lines = [ln for ln in span.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if self.require_body and not code_lines:
            return _pass(False, "empty body: the completion has no statement", span)
        source, first = judged_source(prompt, span)
        try:
            ast.parse(source)
        except SyntaxError as e:
            line = (e.lineno or 1) + first - 1
            return _pass(False, f"SyntaxError: {e.msg} (line {line} of prompt+completion)", span)
        except (ValueError, RecursionError, MemoryError) as e:
            return _pass(False, f"{type(e).__name__}: {e}", span)
        return _pass(True, "parses", span)


# -- python-exec ---------------------------------------------------------------------------------

@register
@dataclass
class PythonExec(Verifier):
    """The completed function runs and does what it should (see the module docstring and exec_verifier.py)."""

    name: ClassVar[str] = "python-exec"
    reference: bool = True  # a standard-library prompt is also compared with the library's own function
    timeout: float = 1.0  # seconds per call of the function
    memory_mb: int = 1024  # address-space limit of the sandbox process
    grace: float = 10.0  # seconds of silence past a call's timeout before the sandbox process is killed
    _references: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.timeout <= 0 or self.memory_mb < 64 or self.grace <= 0:
            raise VerifierError("python-exec: timeout and grace must be > 0 seconds and memory_mb >= 64")

    def add_references(self, references: dict) -> None:
        """Compare these prompts with these functions (``{prompt: exec_verifier.Reference}``), instead of
        looking the prompt up in the standard library (which refuses a prompt that several functions share)."""
        self._references.update(references)

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        return self.score_batch([prompt], [completion])[0]

    def score_batch(self, prompts: list[str], completions: list[str]) -> list[VerifierResult]:
        """All runnable completions go to one sandbox process (a new one after a completion kills it)."""
        from .exec_sandbox import run_jobs
        from .exec_verifier import docstring_examples, find_reference

        parse = PythonSyntax()
        out: list[VerifierResult | None] = [None] * len(prompts)
        jobs, owners = [], []
        for k, (prompt, completion) in enumerate(zip(prompts, completions)):
            parsed = parse(prompt, completion)
            if not parsed.passed:
                out[k] = _pass(False, f"does not parse: {parsed.reason}", parsed.span)
                continue
            source = judged_source(prompt, parsed.span)[0]
            examples = docstring_examples(source)
            if prompt in self._references:
                ref, why = self._references[prompt], ""
            else:
                ref, why = find_reference(prompt) if self.reference else (None, "reference=false")
            if examples is None and ref is None:
                out[k] = _pass(False, f"nothing to run it against: no >>> examples in the docstring, and {why}",
                               parsed.span)
                continue
            jobs.append({"op": "judge", "source": source, "examples": examples,
                         "reference": ref.job() if ref is not None else None})
            owners.append((k, parsed.span))
        verdicts = run_jobs(jobs, timeout=self.timeout, memory_mb=self.memory_mb, grace=self.grace) if jobs else []
        for (k, span), v in zip(owners, verdicts):
            out[k] = VerifierResult(bool(v["passed"]), float(v["score"]), v["reason"], span)
        return out  # type: ignore[return-value]


# -- json ----------------------------------------------------------------------------------------

@register
@dataclass
class JSONVerifier(Verifier):
    name: ClassVar[str] = "json"
    schema: str | None = None  # path of a JSON Schema file (subset, see json_schema.py)
    extract: bool = False  # judge the first JSON object/array in the completion instead of all of it
    _schema: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.schema:
            from .json_schema import SchemaError, load_schema

            try:
                self._schema = load_schema(self.schema)
            except SchemaError as e:
                raise VerifierError(f"json verifier: {e}") from None

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        text = completion.strip()
        try:
            if self.extract:
                starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
                if not starts:
                    return _pass(False, "no JSON object or array in the completion")
                value, end = json.JSONDecoder().raw_decode(text, min(starts))
                text = text[min(starts):end]
            else:
                value = json.loads(text)
        except json.JSONDecodeError as e:
            return _pass(False, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        if self._schema is not None:
            from .json_schema import validate

            err = validate(value, self._schema)
            if err:
                return _pass(False, f"schema: {err}", text if self.extract else None)
        return _pass(True, "valid JSON" + (" matching the schema" if self._schema is not None else ""),
                     text if self.extract else None)


# -- regex ---------------------------------------------------------------------------------------

@register
@dataclass
class RegexVerifier(Verifier):
    name: ClassVar[str] = "regex"
    pattern: str = ""
    fullmatch: bool = False  # the whole completion must match (default: a match anywhere)
    ignorecase: bool = False
    dotall: bool = False
    _re: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.pattern:
            raise VerifierError("regex verifier needs pattern=..., e.g. --verifier 'regex:pattern=^\\d+$'")
        flags = (re.IGNORECASE if self.ignorecase else 0) | (re.DOTALL if self.dotall else 0)
        try:
            self._re = re.compile(self.pattern, flags)
        except re.error as e:
            raise VerifierError(f"regex verifier: pattern {self.pattern!r} does not compile: {e}") from None

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        m = self._re.fullmatch(completion) if self.fullmatch else self._re.search(completion)
        how = "fully matches" if self.fullmatch else "matches"
        return _pass(m is not None, f"{how} {self.pattern!r}" if m else f"does not {how[:-2]} {self.pattern!r}")


# -- length --------------------------------------------------------------------------------------

@register
@dataclass
class LengthVerifier(Verifier):
    name: ClassVar[str] = "length"
    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    tokenizer: str | None = None  # tokenizer.json (or a directory with one) for token bounds
    _tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        bounds = (self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)
        if all(b is None for b in bounds):
            raise VerifierError("length verifier needs min_chars, max_chars, min_tokens or max_tokens")
        if self.tokenizer:
            from ..data import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer)

    def bind_tokenizer(self, tokenizer) -> None:
        if self._tok is None:
            self._tok = tokenizer

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        checks = [("chars", len(completion), self.min_chars, self.max_chars)]
        if self.min_tokens is not None or self.max_tokens is not None:
            if self._tok is None:
                raise VerifierError("length verifier: token bounds need tokenizer=PATH (or a model's tokenizer)")
            checks.append(("tokens", len(self._tok.encode(completion, add_special_tokens=False).ids),
                           self.min_tokens, self.max_tokens))
        for unit, n, lo, hi in checks:
            if lo is not None and n < lo:
                return _pass(False, f"{n} {unit} < min {lo}")
            if hi is not None and n > hi:
                return _pass(False, f"{n} {unit} > max {hi}")
        return _pass(True, ", ".join(f"{n} {unit}" for unit, n, _, _ in checks))


# -- teacher -------------------------------------------------------------------------------------

@register
@dataclass
class TeacherVerifier(Verifier):
    """Mean log-likelihood (nats/token) of the completion under a teacher checkpoint."""

    name: ClassVar[str] = "teacher"
    graded: ClassVar[bool] = True
    ckpt: str = ""
    threshold: float | None = None  # pass at or above this mean log-likelihood; None: graded only
    batch_size: int = 8
    device: str = "cpu"
    _model: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.ckpt:
            raise VerifierError("teacher verifier needs ckpt=PATH (a checkpoint directory)")
        from ..checkpoint import load_checkpoint

        ck = load_checkpoint(self.ckpt, device=self.device)
        self._model, self._tok = ck.model, ck.tokenizer()

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        return self.score_batch([prompt], [completion])[0]

    def score_batch(self, prompts: list[str], completions: list[str]) -> list[VerifierResult]:
        import torch

        cfg = self._model.config
        out = []
        for i in range(0, len(prompts), self.batch_size):
            rows = []
            for p, c in zip(prompts[i:i + self.batch_size], completions[i:i + self.batch_size]):
                head = ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + \
                    self._tok.encode(p, add_special_tokens=False).ids
                tail = self._tok.encode(c, add_special_tokens=False).ids[:cfg.max_position_embeddings - 1]
                head = head[-(cfg.max_position_embeddings - len(tail)):]  # keep the prompt's end
                rows.append((head, tail))
            out += [self._result(s) for s in _mean_loglik(self._model, rows, torch.device(self.device))]
        return out

    def _result(self, score: float) -> VerifierResult:
        if not math.isfinite(score):
            return VerifierResult(False, score, "empty completion")
        passed = self.threshold is None or score >= self.threshold
        rel = "" if self.threshold is None else (" >= " if passed else " < ") + f"threshold {self.threshold}"
        return VerifierResult(passed, score, f"mean log-likelihood {score:.3f}{rel}")


def _mean_loglik(model, rows: list[tuple[list[int], list[int]]], device) -> list[float]:
    """Mean log p(tail token | everything before it) for each (head, tail); -inf for an empty tail."""
    import torch

    width = max(len(h) + len(t) for h, t in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    is_tail = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (h, t) in enumerate(rows):
        ids[r, :len(h) + len(t)] = torch.tensor(h + t)
        is_tail[r, len(h):len(h) + len(t)] = True
    with torch.inference_mode():
        logits = model(ids[:, :-1].to(device)).float()  # (B, W-1, V); right padding is never attended
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()  # (B, W-1)
    mask = is_tail[:, 1:]
    sums, counts = (logp * mask).sum(-1), mask.sum(-1)
    return [float(s / n) if n else float("-inf") for s, n in zip(sums.tolist(), counts.tolist())]


# -- plug-ins ------------------------------------------------------------------------------------

@dataclass
class PluginVerifier(Verifier):
    """A user function ``(prompt, completion) -> bool | float | VerifierResult``."""

    spec: str = ""
    fn: Callable | None = None
    options: dict = field(default_factory=dict)
    threshold: float | None = None
    returned_scores: bool = False

    @property
    def graded(self) -> bool:  # a function that returns numbers grades; one that returns bools does not
        return self.returned_scores

    @property
    def name(self) -> str:
        return self.spec

    def describe(self) -> str:
        return self.spec + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")

    def __call__(self, prompt: str, completion: str) -> VerifierResult:
        value = self.fn(prompt, completion, **self.options)
        if isinstance(value, VerifierResult):
            return value
        if isinstance(value, bool):
            return _pass(value, f"{self.spec} returned {value}")
        if isinstance(value, (int, float)):
            self.returned_scores = True
            score = float(value)
            passed = self.threshold is None or score >= self.threshold
            return VerifierResult(passed, score, f"{self.spec} scored {score:.4g}")
        raise VerifierError(f"plug-in {self.spec} returned {type(value).__name__}; return a bool, a number or "
                            "a slmkit.align.verifiers.VerifierResult")


def load_plugin(target: str) -> Callable:
    """``path/to/file.py:function`` or ``package.module:function`` -> the function."""
    module_part, _, fn_name = target.rpartition(":")
    if not module_part or not fn_name:
        raise VerifierError(f"plug-in {target!r}: write module:function or path/to/file.py:function")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise VerifierError(f"plug-in {target!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"slmkit_verifier_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file failed to import; say so
            raise VerifierError(f"plug-in {target!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise VerifierError(f"plug-in {target!r}: cannot import {module_part!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise VerifierError(f"plug-in {target!r}: {module_part} has no function {fn_name!r}")
    return fn


# -- specs ---------------------------------------------------------------------------------------

_OPTION_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w-]*=)")


def parse_options(text: str, what: str) -> dict[str, str]:
    options = {}
    for item in filter(None, (p.strip() for p in _OPTION_SPLIT.split(text) if text)):
        key, eq, value = item.partition("=")
        if not eq:
            raise VerifierError(f"{what}: option {item!r} must be key=value")
        options[key.strip().replace("-", "_")] = value
    return options


def _coerce(value: str, annotation: str, what: str):
    kinds = [a.strip() for a in str(annotation).split("|")]
    if value.lower() in ("none", "null") and "None" in kinds:
        return None
    for kind in kinds:
        try:
            if kind == "bool":
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if kind == "int":
                return int(value)
            if kind == "float":
                return float(value)
            if kind == "str":
                return value
        except ValueError:
            continue
    raise VerifierError(f"{what}: {value!r} is not a valid {annotation}")


def build_verifier(spec: str, *, tokenizer=None) -> Verifier:
    """A verifier from ``NAME[:key=value,...]`` or a plug-in ``module:function`` / ``file.py:function``.

    ``tokenizer`` (of the model being sampled) is given to verifiers that count tokens."""
    name, _, rest = spec.partition(":")
    if name in VERIFIERS:
        cls = VERIFIERS[name]
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        options = parse_options(rest, name)
        unknown = set(options) - set(fields)
        if unknown:
            raise VerifierError(f"{name}: unknown option(s) {sorted(unknown)}; options: {', '.join(fields) or 'none'}")
        kwargs = {k: _coerce(v, fields[k].type, f"{name}:{k}") for k, v in options.items()}
        verifier = cls(**kwargs)
        if tokenizer is not None and hasattr(verifier, "bind_tokenizer"):
            verifier.bind_tokenizer(tokenizer)
        return verifier
    # plug-in: file.py:function[:opts] or module:function[:opts]
    head, sep, tail = spec.partition(".py:")
    if sep:
        fn_name, _, opts = tail.partition(":")
        target = f"{head}.py:{fn_name}"
    else:
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise VerifierError(f"unknown verifier {spec!r}; built-ins: {', '.join(sorted(VERIFIERS))}, or a plug-in "
                                "module:function / path/to/file.py:function")
        target, opts = f"{parts[0]}:{parts[1]}", (parts[2] if len(parts) > 2 else "")
    options = parse_options(opts, target)
    threshold = options.pop("threshold", None)
    return PluginVerifier(spec=target, fn=load_plugin(target), options=options,
                          threshold=_coerce(threshold, "float", f"{target}:threshold") if threshold else None)
