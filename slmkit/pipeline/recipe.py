"""`slm run recipe.yaml`: a declarative pipeline whose stages are cached by a hash of what they depend on.

A recipe is data (YAML) with a name, a work directory and an ordered list of stages:

    name: my-domain
    workdir: runs/my-domain
    stages:
      - {name: data, kind: data, with: {vocab_size: 8192}}
      - {name: teacher, kind: train, with: {data: "@data", model: small, steps: 2000}}
      - {name: int8, kind: compress, with: {ckpt: "@teacher", data: "@data", passes: [quant.int8]}}

Each stage writes into `workdir/<name>/`. A string `"@name"` in a stage's options refers to an earlier
stage's output (its checkpoint or dataset directory, or the file a stage makes, such as `pairs.jsonl`).

**Caching.** A stage's key is the SHA-256 of its kind, its options, and the keys of the stages it refers to
(plus a digest of any local file or directory it names), so editing one stage re-runs it and everything
downstream of it, and nothing else. A finished stage leaves `.stage.json` with its key, metrics and timing;
a rerun whose key matches is skipped. A stage interrupted midway leaves `.stage.pending.json`: training
stages then resume from their last saved state instead of starting over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .. import yamlio

STAGE_FORMAT = 1  # bump when a stage's output layout changes, so old caches are not reused


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the file, stage and field."""


@dataclass
class StageSpec:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    workdir: Path
    stages: list[StageSpec]
    source: str = "<recipe>"


@dataclass
class StageRecord:
    name: str
    kind: str
    key: str
    output: str
    cached: bool
    seconds: float
    metrics: dict


@dataclass
class RunContext:
    """What a stage function sees: the recipe, the records of stages already run, and a progress hook."""

    recipe: Recipe
    records: dict[str, StageRecord]
    quiet: bool = False
    log: Callable[[str], None] = print
    resume: bool = False  # this stage was interrupted with the same key: pick up its saved state


# -- loading -----------------------------------------------------------------------------------------

BUILTIN_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))


def load_recipe(path: str | Path, *, workdir: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """A recipe file, or a built-in recipe by name (`quickstart`, `distill-compress-select`)."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (BUILTIN_RECIPES / f"{path}.yaml").exists():
        path = BUILTIN_RECIPES / f"{path}.yaml"
    data = yamlio.load_file(path, RecipeError,
                            missing=f"no such recipe file (built-in recipes: {', '.join(builtin_recipes())})")
    return recipe_from_dict(apply_overrides(data, overrides, str(path)), source=str(path), workdir=workdir)


def apply_overrides(data: Any, overrides: list[str], source: str = "<recipe>") -> Any:
    """`STAGE.OPTION=VALUE` (VALUE read as YAML: `teacher.steps=20`, `select.tasks=[lm]`); `*.OPTION=VALUE`
    sets the option on every stage that already has it."""
    if not overrides:
        return data
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise RecipeError(f"{source}: overrides need a recipe with a list of stages")
    stages = {str(s.get("name") or s.get("kind")): s for s in data["stages"] if isinstance(s, dict)}
    for item in overrides:
        target, eq, raw = item.partition("=")
        stage, dot, option = target.partition(".")
        if not eq or not dot or not option:
            raise RecipeError(f"override {item!r} is not STAGE.OPTION=VALUE (e.g. teacher.steps=20)")
        try:
            value = yamlio.load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({e})") from None
        if stage == "*":
            for s in stages.values():
                if option in (s.get("with") or {}):
                    s["with"][option] = value
            continue
        if stage not in stages:
            raise RecipeError(f"override {item!r}: no stage named {stage!r} (stages: {', '.join(stages)})")
        stages[stage].setdefault("with", {})
        if stages[stage]["with"] is None:
            stages[stage]["with"] = {}
        stages[stage]["with"][option] = value
    return data


def recipe_from_dict(data: Any, *, source: str = "<recipe>", workdir: str | Path | None = None) -> Recipe:
    from .stages import STAGES

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with name, workdir and stages")
    unknown = set(data) - {"name", "workdir", "stages", "description"}
    if unknown:
        raise RecipeError(f"{source}: unknown top-level field(s) {sorted(unknown)}; "
                          "expected name, workdir, stages, description")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list")
    name = str(data.get("name") or Path(source).stem)
    root = Path(workdir or data.get("workdir") or Path("runs") / name)
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(stages_raw):
        where = f"{source}: stage {i + 1}"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise RecipeError(f"{where}: each stage needs at least 'kind' (and usually 'name' and 'with')")
        extra = set(raw) - {"name", "kind", "with"}
        if extra:
            raise RecipeError(f"{where}: unknown field(s) {sorted(extra)}; a stage has name, kind and with")
        kind = raw["kind"]
        if kind not in STAGES:
            raise RecipeError(f"{where}: unknown kind {kind!r}; known: {', '.join(sorted(STAGES))}")
        sname = str(raw.get("name") or kind)
        if sname in seen:
            raise RecipeError(f"{where}: a stage named {sname!r} already exists; names must be unique")
        if not sname.replace("-", "").replace("_", "").isalnum():
            raise RecipeError(f"{where}: stage name {sname!r} must be letters, digits, - and _ (it names a directory)")
        options = raw.get("with") or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where} ({sname}): 'with' must be a mapping of options")
        for ref in references(options):
            if ref not in seen:
                raise RecipeError(f"{where} ({sname}): '@{ref}' does not name an earlier stage "
                                  f"(earlier: {', '.join(sorted(seen)) or 'none'})")
        STAGES[kind].check(options, f"{where} ({sname})")
        seen.add(sname)
        stages.append(StageSpec(sname, kind, options))
    return Recipe(name, root, stages, source)


_EMBEDDED = re.compile(r"(?<==)@([A-Za-z0-9_-]+)")  # "teacher:ckpt=@teacher": a reference inside an option string


def references(value: Any) -> list[str]:
    """Stage names referred to as "@name" anywhere inside `value` (a whole string, or after `=` in one)."""
    if isinstance(value, str):
        if value.startswith("@") and len(value) > 1:
            return [value[1:]]
        return _EMBEDDED.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in references(v)]
    return []


def resolve(value: Any, artifacts: dict[str, str]) -> Any:
    """Replace "@name" by that stage's artifact path."""
    if isinstance(value, str) and value.startswith("@") and value[1:] in artifacts:
        return artifacts[value[1:]]
    if isinstance(value, str):
        return _EMBEDDED.sub(lambda m: artifacts.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: resolve(v, artifacts) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, artifacts) for v in value]
    return value


# -- keys ----------------------------------------------------------------------------------------------

DERIVED_CACHES = {".vocab-remap"}  # caches kept inside an input directory (a dataset's remapped splits)


def _path_digest(p: Path) -> str | None:
    """A cheap digest of a local file or directory an option names (content for small files, size+mtime for
    large ones and directory trees), so editing the input invalidates the stage."""
    try:
        if p.is_file():
            st = p.stat()
            if st.st_size <= 64 << 20:
                return hashlib.sha256(p.read_bytes()).hexdigest()
            return f"{st.st_size}:{st.st_mtime_ns}"
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(p.rglob("*")):
                derived = DERIVED_CACHES.intersection(f.relative_to(p).parts)  # written by readers, not inputs
                if f.is_file() and not f.name.startswith(".stage") and not derived:
                    st = f.stat()
                    h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return h.hexdigest()
    except OSError:
        return None
    return None


def _keyed(value: Any, keys: dict[str, str]) -> Any:
    """`value` with stage references replaced by the referenced stage's key and local paths by digests."""
    if isinstance(value, str):
        if value.startswith("@") and value[1:] in keys:
            return {"stage": keys[value[1:]]}
        if _EMBEDDED.search(value):
            return {"text": value, "stages": [keys.get(n) for n in _EMBEDDED.findall(value)]}
        if ("/" in value or value.endswith((".jsonl", ".yaml", ".json", ".txt"))) and Path(value).exists():
            return {"path": value, "digest": _path_digest(Path(value))}
        return value
    if isinstance(value, dict):
        return {k: _keyed(v, keys) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_keyed(v, keys) for v in value]
    return value


def stage_key(spec: StageSpec, keys: dict[str, str]) -> str:
    from ..align.defaults import STAGE_TRAIN_DEFAULTS

    payload = {"format": STAGE_FORMAT, "kind": spec.kind, "options": _keyed(spec.options, keys)}
    if spec.kind in STAGE_TRAIN_DEFAULTS:  # what the stage trains with changes when its defaults do
        payload["train_defaults"] = dict(STAGE_TRAIN_DEFAULTS[spec.kind])
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# -- running -------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_recipe(recipe: Recipe, *, force: tuple[str, ...] = (), until: str | None = None, quiet: bool = False,
               log: Callable[[str], None] = print) -> list[StageRecord]:
    """Run the stages in order, skipping those whose key matches their finished output. `force` re-runs
    the named stages (and so everything downstream); `until` stops after the named stage."""
    names = [s.name for s in recipe.stages]
    for n in [*force, *([until] if until else [])]:
        if n not in names:
            raise RecipeError(f"{recipe.source}: no stage named {n!r} (stages: {', '.join(names)})")
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(recipe):
        return _run_stages(recipe, force=force, until=until, quiet=quiet, log=log)


@contextlib.contextmanager
def _workdir_lock(recipe: Recipe):
    """One run per workdir: two runs would clear and rewrite the same stage directories under each other.
    An advisory lock on `workdir/.lock`, released by the OS if the holder dies (so no stale lock survives a
    crash or kill -9)."""
    import fcntl

    path = recipe.workdir / ".lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RecipeError(f"{recipe.workdir}: another run of this workdir is in progress ({holder}); wait for it "
                              "to finish, or give this run another workdir (--out / --workdir)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run_stages(recipe: Recipe, *, force: tuple[str, ...], until: str | None, quiet: bool,
                log: Callable[[str], None]) -> list[StageRecord]:
    from .stages import STAGES

    keys: dict[str, str] = {}
    artifacts: dict[str, str] = {}
    records: dict[str, StageRecord] = {}
    ctx = RunContext(recipe, records, quiet=quiet, log=log)
    forced_upstream = False
    for i, spec in enumerate(recipe.stages):
        kind = STAGES[spec.kind]
        key = stage_key(spec, keys)
        if kind.always:
            key = hashlib.sha256(f"{key}:always:{time.time_ns()}".encode()).hexdigest()
        elif spec.name in force or forced_upstream:
            key = hashlib.sha256(f"{key}:forced:{time.time_ns()}".encode()).hexdigest()
            forced_upstream = True
        keys[spec.name] = key
        out = recipe.workdir / spec.name
        done = _read_json(out / ".stage.json")
        log(f"[{i + 1}/{len(recipe.stages)}] {spec.name} ({spec.kind})")
        if done and done.get("key") == key:
            rec = StageRecord(spec.name, spec.kind, key, done["output"], True, done.get("seconds", 0.0),
                              done.get("metrics", {}))
            log(f"      cached: {rec.output}")
        else:
            pending = _read_json(out / ".stage.pending.json")
            ctx.resume = bool(pending and pending.get("key") == key)
            if out.exists() and not ctx.resume:
                _clear(out)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / ".stage.pending.json", {"key": key, "started": time.time()})
            options = resolve(spec.options, artifacts)
            t0 = time.perf_counter()
            metrics = kind.execute(options, out, ctx, f"{recipe.source}: stage {spec.name}") or {}
            seconds = time.perf_counter() - t0
            output = str(kind.artifact(out))
            rec = StageRecord(spec.name, spec.kind, key, output, False, round(seconds, 2), metrics)
            _write_json(out / ".stage.json", {**dataclasses.asdict(rec), "options": spec.options,
                                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            (out / ".stage.pending.json").unlink(missing_ok=True)
            log(f"      done in {seconds:.1f}s: {output}")
        records[spec.name] = rec
        artifacts[spec.name] = rec.output
        if until == spec.name:
            break
    _write_json(recipe.workdir / "run.json", {"recipe": recipe.name, "source": recipe.source,
                                              "stages": [dataclasses.asdict(r) for r in records.values()]})
    return list(records.values())


def _clear(out: Path) -> None:
    """Empty a stale stage directory (its key changed), so no file of the old run is mistaken for new."""
    import shutil

    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
