"""`slm compress`: pruning, low-rank and quantization passes, one measured table row per pass."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import QUIET_HELP, err_console, out_console, progress_bars

app = typer.Typer()


@app.command()
def compress(
    ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint directory to compress."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Compressed checkpoint directory to write."),
    passes: List[str] = typer.Option([], "--pass", "-p", help="NAME or NAME:key=value,... (repeatable; applied "
                                     "in order; tuple options joined with +, e.g. targets=gate_proj+up_proj)."),
    plan: Optional[Path] = typer.Option(None, help="YAML plan: a list of `{pass: NAME, key: value}` entries."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset for calibration and bits/byte "
                                        "(built with this checkpoint's tokenizer)."),
    calib_samples: int = typer.Option(64, help="Calibration sequences."),
    calib_seq_len: int = typer.Option(256, help="Calibration sequence length (also the eval window)."),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens scored before and after each pass."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure decode tokens/s after each pass."),
    list_passes: bool = typer.Option(False, "--list", help="List the available passes and their options."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=f"{QUIET_HELP} No per-pass lines either."),
):
    """Compress a checkpoint with passes (pruning, low-rank, quantization), one measured table row per pass.

    Progress bars on stderr follow the calibrated work of each pass, the held-out bits/byte before and after
    each pass (--data) and the decode speed (--speed); the table goes to stdout at the end.

    Examples:

        slm compress --list
        slm compress runs/small --data runs/ds --pass prune.wanda:sparsity=0.5 --pass quant.int8 --out runs/small-c
        slm compress runs/small --data runs/ds --pass prune.width:mlp_ratio=0.5,heads_ratio=0.5 --out runs/narrow
        slm compress runs/small --data runs/ds --pass quant.gptq:bits=4,group_size=128,act_order=true -o runs/q4
        slm compress runs/small --data runs/ds --plan plan.yaml --out runs/small-c
    """
    import dataclasses as dc

    from ..compress.base import PASSES, _load_builtin_passes
    from ..compress.run import compress as run_compress, load_plan, parse_pass

    if list_passes:
        _load_builtin_passes()
        t = Table(title="compression passes")
        t.add_column("pass")
        t.add_column("calibration")
        t.add_column("options (default)")
        t.add_column("what it does")
        for name, p in sorted(PASSES.items()):
            opts = ", ".join(f"{f.name}={f.default!r}" if f.default is not dc.MISSING else f.name
                             for f in dc.fields(p.config_cls))
            t.add_row(name, "yes" if p.needs_calibration else "", opts, p.summary)
        out_console.print(t)
        return
    if ckpt is None or out is None:
        raise ValueError("give a checkpoint and --out (or --list)")
    specs = (load_plan(plan) if plan else []) + [parse_pass(p) for p in passes]
    if not specs:
        raise ValueError("no passes given: use --pass NAME[:k=v,...] or --plan FILE (see `slm compress --list`)")

    table = Table(title=f"slm compress {ckpt} -> {out}")
    for col in ("pass", "params", "nonzero", "bytes", "bits/byte", "decode tok/s", "seconds"):
        table.add_column(col, justify="left" if col == "pass" else "right")

    def row(r: dict) -> None:
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        tok = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        table.add_row(r["pass"], f"{r['parameters']:,}", f"{r['nonzero']:,}", f"{r['bytes']:,}", bpb, tok,
                      f"{r['seconds']:.1f}")
        for note in r.get("notes", []):  # per-layer deviations from the pass's format (group size fallbacks)
            table.add_row(f"  [dim]{escape(note)}[/]", "", "", "", "", "", "")
        if not quiet:
            err_console.print(f"[dim]{r['pass']}: done[/]")

    with progress_bars(quiet) as progress:
        run_compress(ckpt, out, specs, data=data, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                     eval_tokens=eval_tokens, speed=speed, progress=progress, on_row=row)
    out_console.print(table)
    out_console.print(f"wrote {out}")
