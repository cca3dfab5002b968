"""Measure candidate checkpoints, draw their Pareto fronts and recommend one inside a budget.

`slm select` turns a base checkpoint into candidates with the compression passes (and, optionally, a short
distillation from the teacher to recover quality after a structural pass), then measures every candidate the
same way — quality with the eval suite, speed and memory with the benchmark in a fresh process — and picks
with `slmkit.evaluate.pareto.recommend`. Candidate building runs as a recipe (`slmkit.pipeline`), so a rerun
reuses every candidate whose plan did not change, and measurements are cached by the checkpoint's weights
digest, so an unchanged checkpoint is never measured twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..compress.base import labelled_progress
from .bench import BenchConfig, bench_in_subprocess, bench_runs
from .pareto import parse_budget, pareto_front, recommend
from .suite import ProgressHook, SuiteConfig, evaluate_checkpoint, parse_tasks


@dataclass(frozen=True)
class Plan:
    """A candidate: passes before recovery (structural), an optional KD recovery, passes after (quantization)."""

    name: str
    passes: tuple[str, ...] = ()
    recover: bool = False
    after: tuple[str, ...] = ()


DEFAULT_PLANS: tuple[Plan, ...] = (
    Plan("base"),
    Plan("int8", after=("quant.int8",)),
    Plan("int4", after=("quant.int4:group_size=64",)),
    Plan("gptq4", after=("quant.gptq:bits=4,group_size=64",)),
    Plan("sparse50", passes=("prune.wanda:sparsity=0.5",), recover=True),
    Plan("asvd60", passes=("lowrank.asvd:ratio=0.6",), recover=True),
    Plan("width50", passes=("prune.width:mlp_ratio=0.5,heads_ratio=0.5",), recover=True),
    Plan("width50-int4", passes=("prune.width:mlp_ratio=0.5,heads_ratio=0.5",), recover=True,
         after=("quant.int4:group_size=64",)),
)


def parse_plan(text: str) -> Plan:
    """`name=PASS+PASS[+recover+PASS...]`, e.g. `w50q=prune.width:mlp_ratio=0.5+recover+quant.int8`.
    Passes separated by `+` run in order; `recover` marks where the KD recovery goes."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"plan {text!r} is not NAME=PASS+PASS (e.g. w50=prune.width:mlp_ratio=0.5+recover)")
    before, after, recover = [], [], False
    for part in filter(None, (p.strip() for p in _split_plus(rest))):
        if part == "recover":
            recover = True
        elif part == "base":
            continue
        else:
            (after if recover else before).append(part)
    return Plan(name.strip(), tuple(before), recover, tuple(after))


def _split_plus(text: str) -> list[str]:
    """Split on `+` where a new pass (a dotted name such as `quant.int8`) or `recover` starts; any other `+`
    belongs to a pass option's tuple value (`targets=q_proj+k_proj`)."""
    parts: list[str] = []
    for piece in text.split("+"):
        starts_pass = piece.strip() in ("recover", "base") or re.match(r"^\s*[a-z_]+\.[a-z0-9_]+(:|\s*$)", piece)
        if parts and not starts_pass:
            parts[-1] += "+" + piece
        else:
            parts.append(piece)
    return parts


def plan_stages(plans: list[Plan], base: str, data: str, *, teacher: str | None = None,
                recover_steps: int = 60, recover_options: dict | None = None) -> tuple[list[dict], dict[str, str]]:
    """Recipe stages that build every candidate, and candidate name -> reference of its final stage."""
    stages: list[dict] = []
    final: dict[str, str] = {}
    for plan in plans:
        current = base
        if plan.passes:
            stages.append({"name": f"{plan.name}-a", "kind": "compress",
                           "with": {"ckpt": current, "data": data, "passes": list(plan.passes)}})
            current = f"@{plan.name}-a"
        if plan.recover:
            stages.append({"name": f"{plan.name}-kd", "kind": "distill", "with": {
                "teacher": teacher or base, "student": current, "data": data, "steps": recover_steps,
                "warmup_steps": min(10, recover_steps // 5), "eval_every": 0, "save_every": 0,
                **(recover_options or {})}})
            current = f"@{plan.name}-kd"
        if plan.after:
            stages.append({"name": f"{plan.name}-b" if plan.passes or plan.recover else plan.name,
                           "kind": "compress", "with": {"ckpt": current, "data": data, "passes": list(plan.after)}})
            current = f"@{stages[-1]['name']}"
        final[plan.name] = current
    return stages, final


def weights_digest(path: Path) -> str:
    """The checkpoint's recorded file digests (written at save), else a hash of its weights file."""
    prov = path / "slmkit.json"
    if prov.exists():
        files = json.loads(prov.read_text()).get("files", {})
        if files:
            return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@dataclass
class MeasureConfig:
    tasks: list[str] = field(default_factory=lambda: ["lm"])
    suite: SuiteConfig = SuiteConfig()
    bench: BenchConfig = BenchConfig()


def measure(path: str | Path, data: str | Path | None, cfg: MeasureConfig, cache_dir: Path | None = None,
            log=print, progress: ProgressHook | None = None, name: str | None = None) -> dict:
    """Quality (eval suite) + speed, memory, size (bench in a fresh process) of one checkpoint, cached.
    With `progress`, each task and the benchmark draw a bar named after the candidate (`name`, default: the
    checkpoint directory's name); a cached measurement draws none."""
    path = Path(path)
    key = hashlib.sha256(json.dumps({"weights": weights_digest(path), "data": str(data), "tasks": cfg.tasks,
                                     "suite": asdict(cfg.suite), "bench": asdict(cfg.bench)},
                                    sort_keys=True, default=str).encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.json" if cache_dir else None
    if cached is not None and cached.exists():
        log(f"      measurement cached: {path}")
        return json.loads(cached.read_text())
    log(f"      measuring {path}")
    progress = labelled_progress(progress, f"{name or path.name}: ")
    quality = evaluate_checkpoint(path, cfg.tasks, data=data, cfg=cfg.suite, progress=progress)
    advance = progress("speed and memory (runs in a fresh process)", bench_runs(cfg.bench)) \
        if progress is not None else None
    speed = bench_in_subprocess(path, cfg.bench, progress=advance)
    row = {"checkpoint": str(path), **quality["summary"],
           **{k: v for k, v in speed.items() if k not in ("config", "checkpoint")}}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row, indent=2))
    return row


def choose(rows: list[dict], names: list[str], budget: str | None, objective: str = "bpb",
           references: dict[str, dict] | None = None) -> dict:
    """Pareto fronts (quality vs bytes, quality vs decode speed) and the recommendation, as one JSON."""
    from .pareto import direction, field_name

    obj = field_name(objective)
    d = direction(obj)
    rec = recommend(rows, parse_budget(budget), obj, names)
    fronts = {"bytes": [names[i] for i in pareto_front(rows, {obj: d, "bytes_on_disk": "min"})],
              "decode": [names[i] for i in pareto_front(rows, {obj: d, "decode_tok_s_b1": "max"})]}
    return {"objective": obj, "budget": budget, "candidates": {n: r for n, r in zip(names, rows)},
            "references": references or {}, "fronts": fronts,
            "recommended": names[rec.index] if rec.index is not None else None,
            "feasible": [names[i] for i in rec.feasible], "reasons": rec.reasons}
