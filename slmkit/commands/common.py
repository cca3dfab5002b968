"""What several command modules share: the two consoles, progress bars, the LoRA options of
train/distill/sft/dpo, the TrainConfig built from stage defaults, a YAML and command-line overrides, and the
candidates table of select/run."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

out_console = Console()
err_console = Console(stderr=True)

LORA_RANK_HELP = "Train LoRA adapters of this rank on a frozen checkpoint instead of all weights (OUT gets the " \
                 "merged model, OUT/adapter/ the PEFT-format adapter)."
LORA_TARGETS_DEFAULT = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def lora_config(rank, alpha, targets, dropout):
    """The LoRAConfig of the --lora-* options, or None when --lora-rank is not given (full fine-tuning)."""
    if rank is None:
        return None
    from ..align.lora import LoRAConfig

    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(t.strip() for t in targets.split(",")))


def print_lora_summary(out: Path) -> None:
    """Trainable parameters and peak memory of a LoRA run, from the stage it recorded in OUT/slmkit.json."""
    stages = json.loads((Path(out) / "slmkit.json").read_text()).get("stages", [])
    rec = stages[-1].get("lora") if stages else None
    if rec and "trainable_parameters" in rec:
        out_console.print(f"LoRA: {rec['trainable_parameters']:,} of {rec['total_parameters']:,} parameters trained "
                          f"({rec['trainable_parameters'] / rec['total_parameters']:.2%}); peak RSS "
                          f"{rec['peak_rss_bytes'] / 2**20:,.0f} MiB; adapter -> {Path(out) / rec['adapter']}")


def train_config(config, *, stage: str | None = None, ckpt=None, resume_from=None, **flags):
    """The TrainConfig of a training command: the stage's defaults, then the --config YAML (if any), then the
    flags the user gave (a flag left at None was not given; see `slmkit.align.defaults.stage_train_config`).
    `resume_from`: OUT of a `--resume`, whose saved total steps stand in for the default when --steps (and
    `steps:` in --config) is not given."""
    from ..align.defaults import stage_train_config

    return stage_train_config(stage, config_file=config, explicit=flags, ckpt=ckpt, where="command-line options",
                              resume_from=resume_from)


def default_help(text: str, defaults, name: str, note: str = "") -> str:
    """Help text that shows a default held in a defaults mapping (the option itself defaults to None, so that
    a --config file can set it)."""
    return f"{text} [default: {defaults[name]}{note}]".strip()


QAT_HELP = ("Quantization-aware training against the format that will ship: q4_0 | q4_1 | q8_0 (GGUF blocks; "
            "q4_* in groups of 32) or a quant.int4:... / quant.int8:... pass spec. The forward uses the weights "
            "that pass will store (straight-through gradients); afterwards `slm compress OUT --pass ...` writes "
            "exactly those codes (the command is printed).")


def print_qat_next_step(cfg, out) -> None:
    """After a --qat run: the command that turns the trained float weights into the codes they trained against."""
    plan = cfg.qat_plan()
    if plan is not None:
        out_console.print(f"quantization-aware: ship it with  slm compress {out} --pass {plan.pass_text} "
                          f"--out {out}-{plan.name.split('.')[-1]}   (then slm export gguf)")


QUIET_HELP = "No progress bars (they are also off when stderr is not a terminal)."


@contextmanager
def progress_bars(quiet: bool = False):
    """A progress hook `(description, total) -> advance(n)` drawing one rich bar per piece of work on stderr
    (so stdout stays clean for tables and JSON); None when quiet or stderr is not a terminal (logs, pipes)."""
    if quiet or not err_console.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console) as bars:
        def hook(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield hook


def print_selection(selection_file: Path, report: Path | None) -> None:
    """The candidates table and the reasons for the recommendation from a select stage's selection.json."""
    from ..evaluate.report import candidates_table

    sel = json.loads(selection_file.read_text())
    header, rows = candidates_table(sel)
    t = Table(title="candidates")
    for h in header:
        t.add_column(h, justify="left" if h in ("model", "notes") else "right")
    for r in rows:
        t.add_row(*[c.replace("**", "") for c in r])
    out_console.print(t)
    for reason in sel["reasons"]:
        out_console.print(f"- {reason}")
    if report is not None and report.exists():
        out_console.print(f"report: {report}")
