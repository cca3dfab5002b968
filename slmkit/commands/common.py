"""What several command modules share: the two consoles, the LoRA options of train/distill/sft/dpo, the
TrainConfig built from a YAML plus command-line overrides, and the candidates table of select/run."""

from __future__ import annotations

import json
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


def train_config(config, **overrides):
    """TrainConfig from the --config YAML (if any) with the options the user gave (not None) on top."""
    from ..train import TrainConfig

    overrides = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig.from_yaml(config, **overrides) if config else TrainConfig(**overrides)


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
