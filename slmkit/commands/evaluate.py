"""`slm eval`, `slm info`, `slm bench`, `slm select`: measuring checkpoints and choosing one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..evaluate.suite import SuiteConfig
from .common import QUIET_HELP, err_console, out_console, print_selection, progress_bars

SUITE = SuiteConfig()  # the defaults `slm eval` shares with recipe eval/select stages

app = typer.Typer()


@app.command("eval")
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory (its held-out split is "
                                                                    "scored by the lm task)."),
    tasks: str = typer.Option("lm", help="Comma-separated: lm, next-line, function-parse, ood (out-of-domain "
                                         "prose), FILE.jsonl, FILE.jsonl@VERIFIER."),
    split: str = typer.Option(SUITE.split, help="Dataset split the lm task scores."),
    seq_len: int = typer.Option(SUITE.seq_len, help="Window length of the lm task."),
    max_tokens: Optional[int] = typer.Option(None, help=f"Score at most this many tokens (lm) [default: "
                                             f"{SUITE.max_tokens}; 0 scores the whole split]."),
    items: int = typer.Option(SUITE.items, help="Items per built-in task."),
    max_new_tokens: int = typer.Option(SUITE.max_new_tokens, help="Tokens generated per item (generation tasks)."),
    batch_size: int = typer.Option(SUITE.batch_size, help="Choices (multiple choice) or prompts (generation) "
                                   "per forward pass."),
    precision: str = typer.Option(SUITE.precision, help="fp32 | bf16 (lm task)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Score a checkpoint: bits per byte on held-out data, multiple-choice and generation tasks.

    Multiple choice is scored by log-likelihood (acc, and acc_norm per byte, as lm-evaluation-harness);
    generation tasks by a verifier (`python-syntax`, `json`, ...) or ROUGE-L against `reference`. The
    built-in `next-line` and `function-parse` tasks come from held-out files of the default domain. The lm
    task scores the same tokens whichever other tasks run beside it. The `ood` task scores English prose
    outside the domain (licence texts every machine carries), to show what specialisation costs there.

    Examples:

        slm eval runs/small --data runs/ds --json runs/small/eval.json
        slm eval runs/small --data runs/ds --tasks lm,next-line,function-parse
        slm eval runs/small --data runs/ds --tasks lm,ood
        slm eval runs/small --tasks mc.jsonl,prompts.jsonl@python-syntax
    """
    from ..evaluate.suite import SuiteConfig, evaluate_checkpoint, parse_tasks

    tokens = SUITE.max_tokens if max_tokens is None else (None if max_tokens == 0 else max_tokens)
    cfg = SuiteConfig(seq_len=seq_len, max_tokens=tokens, items=items, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, split=split, precision=precision)
    if tasks.strip() == "lm":
        if data is None:
            raise typer.BadParameter("the lm task needs --data DIR (the dataset whose held-out split is scored)")
        with progress_bars(quiet) as progress:
            _eval_lm(ckpt, data, cfg, json_out, progress)
        return
    with progress_bars(quiet) as progress:
        res = evaluate_checkpoint(ckpt, parse_tasks(tasks), data=data, cfg=cfg, progress=progress)
    table = Table(title=f"{ckpt}")
    table.add_column("task")
    table.add_column("result")
    table.add_column("items", justify="right")
    table.add_column("seconds", justify="right")
    for name, r in res["tasks"].items():
        if name == "lm":
            text = f"bits/byte {r['bits_per_byte']:.4f}, ppl {r['perplexity']:.2f}, acc {r['accuracy']:.3f}"
        elif name == "ood":
            text = (f"bits/byte {r['bits_per_byte']:.4f} on {r['bytes']:,} bytes of prose outside the domain "
                    f"({', '.join(Path(f['path']).name for f in r['files'])})")
        elif "acc" in r:
            text = f"acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f} (chance {r['chance']:.3f})"
        else:
            text = f"{r['scorer']} {r['score']:.3f}" + (f", pass rate {r['pass_rate']:.3f}" if "pass_rate" in r else "")
        table.add_row(name, text, f"{r.get('items', r.get('tokens', 0)):,}", f"{r['seconds']:.1f}")
        for line in r.get("skipped_lines", [])[:5]:
            err_console.print(f"[yellow]skipped {line}")
    out_console.print(table)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


def _eval_lm(ckpt, data, cfg, json_out, progress) -> None:
    from ..checkpoint import load_checkpoint
    from ..compress.vocab_remap import dataset_for_checkpoint
    from ..data import open_dataset
    from ..evaluate.suite import score_lm

    ck = load_checkpoint(ckpt)
    ds = dataset_for_checkpoint(open_dataset(data), ckpt, splits=(cfg.split,))  # trimmed vocabularies remapped
    res = score_lm(ck.model, ds, cfg, progress)  # the same function `--tasks lm,...` uses
    table = Table(title=f"{ckpt} on {data} ({cfg.split})")
    for k in ("bits_per_byte", "perplexity", "accuracy", "loss", "tokens", "bytes"):
        table.add_column(k, justify="right")
    table.add_row(*(f"{res[k]:.4f}" if isinstance(res[k], float) else f"{res[k]:,}"
                    for k in ("bits_per_byte", "perplexity", "accuracy", "loss", "tokens", "bytes")))
    out_console.print(table)
    if json_out:
        json_out.write_text(json.dumps({"checkpoint": str(ckpt), "data": str(data), "split": cfg.split, **res},
                                       indent=2))


@app.command()
def info(ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
         as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Parameters, bytes on disk, config and provenance of a checkpoint.

    Example:

        slm info runs/small
    """
    from ..checkpoint import load_checkpoint
    from ..compress.base import count_parameters

    ck = load_checkpoint(ckpt)
    files = {p.name: p.stat().st_size for p in sorted(Path(ckpt).iterdir()) if p.is_file()}
    logical, nonzero = count_parameters(ck.model)  # counts weights that compressed modules pack as buffers
    summary = {"path": str(ckpt), "parameters": logical, "nonzero_parameters": nonzero,
               "parameters_without_embeddings": ck.model.num_parameters(exclude_embeddings=True),
               "bytes_on_disk": sum(files.values()), "files": files, "config": ck.config.to_dict(),
               "provenance": {k: v for k, v in ck.provenance.items() if k != "files"}}
    if ck.config.num_local_experts:
        from ..model.moe import active_parameters, total_parameters

        summary.update(total_parameters=total_parameters(ck.model), active_parameters=active_parameters(ck.model))
    if as_json:
        out_console.print_json(json.dumps(summary))
        return
    t = Table(title=str(ckpt), show_header=False)
    params = f"{summary['parameters']:,}"
    if "active_parameters" in summary:  # mixture of experts: a token runs through k of E experts
        params = f"total {summary['total_parameters']:,}, active per token {summary['active_parameters']:,}"
    t.add_row("parameters", f"{params} ({summary['parameters_without_embeddings']:,} without embeddings)")
    if nonzero != logical:
        t.add_row("nonzero parameters", f"{nonzero:,} ({1 - nonzero / max(logical, 1):.1%} sparse)")
    if ck.provenance.get("passes"):
        t.add_row("compression", " -> ".join(p["name"] for p in ck.provenance["passes"]))
    t.add_row("bytes on disk", f"{summary['bytes_on_disk']:,}")
    c = ck.config
    t.add_row("architecture", f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                              f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, MLP {c.intermediate_size}, "
                              f"vocab {c.vocab_size}, context {c.max_position_embeddings}")
    if c.attention_type == "linformer":
        window = "every earlier block" if c.linformer_window is None else f"{c.linformer_window} blocks + running mean"
        t.add_row("attention", f"Linformer: blocks of {c.linformer_block} compressed to {c.linformer_k} rows, "
                               f"window {window}" + (", trained as a block scan" if c.linformer_recompute else ""))
    if c.memory_length:
        t.add_row("attention", f"Transformer-XL memory of {c.memory_length} positions")
    for s in ck.provenance.get("stages", []):
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in s.get("metrics", {}).items())
        t.add_row(f"stage {s.get('stage')}", ", ".join(f"{k}={v}" for k, v in s.get("summary", {}).items())
                  + (f"; {metrics}" if metrics else ""))
    out_console.print(t)


@app.command()
def bench(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory."),
    prompt_len: int = typer.Option(128, help="Prompt tokens for prefill."),
    new_tokens: int = typer.Option(64, help="Decode steps timed."),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(5, help="Timed runs per figure (the median is reported)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (autocast)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Prefill and decode tokens/s (batch 1 and 8), time to first token, peak memory, size and parameters.

    Runs in this process after loading only the checkpoint, so the peak resident memory is the checkpoint's
    (plus torch itself). Medians over `--repeats`; the machine is described in the JSON.

    Examples:

        slm bench runs/small
        slm bench runs/small-int4 --batch-sizes 1,4,16 --json runs/small-int4/bench.json
    """
    from ..evaluate.bench import BenchConfig, bench_checkpoint, bench_runs

    cfg = BenchConfig(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, threads=threads,
                      batch_sizes=tuple(int(b) for b in batch_sizes.split(",") if b.strip()), dtype=precision)
    with progress_bars(quiet) as progress:
        r = bench_checkpoint(ckpt, cfg, progress("warm-up and timed runs", bench_runs(cfg)) if progress else None)
    t = Table(title=f"{ckpt} ({r['machine']['cpu']}, {r['machine']['torch_threads']} threads)", show_header=False)
    params = f"{r['parameters']:,}"
    if r["active_parameters"] != r["parameters"]:
        params += f" (active per token {r['active_parameters']:,})"
    if r["nonzero_parameters"] != r["parameters"]:
        params += f" ({r['nonzero_parameters']:,} nonzero)"
    t.add_row("parameters", params)
    t.add_row("bytes on disk", f"{r['bytes_on_disk']:,}")
    for b in cfg.batch_sizes:
        t.add_row(f"batch {b}", f"prefill {r[f'prefill_tok_s_b{b}']:,.0f} tok/s, decode {r[f'decode_tok_s_b{b}']:,.1f} tok/s")
    t.add_row("time to first token", f"{r['ttft_ms']:.1f} ms ({prompt_len}-token prompt)")
    t.add_row("decode latency", f"{r['decode_ms_per_token']:.2f} ms/token")
    t.add_row("peak resident memory", f"{r['peak_rss_bytes'] / 2 ** 20:,.0f} MiB")
    out_console.print(t)
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@app.command()
def select(
    base: Path = typer.Option(..., "--base", help="Checkpoint to compress into candidates."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (calibration, recovery and held-out scoring)."),
    out: Path = typer.Option(Path("runs/select"), "--out", "-o", help="Work directory (cached between runs)."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher for KD recovery (default: the base) and shown "
                                                      "as a reference."),
    budget: Optional[str] = typer.Option(None, help='Constraints, e.g. "bytes<=20MB,decode_ms<=5,bpb<=1.6".'),
    objective: str = typer.Option("bpb", help="Quality to optimise: bpb, next_line, parse_rate, accuracy, ood_bpb."),
    tasks: str = typer.Option("lm", help="Eval tasks measured for every candidate (see slm eval)."),
    plan: Optional[List[str]] = typer.Option(None, "--plan", help="NAME=PASS+PASS[+recover+PASS]; repeatable. "
                                                                 "Default: a built-in set."),
    recover_steps: int = typer.Option(60, help="KD recovery steps after structural passes (0: none)."),
    items: int = typer.Option(200, help="Items per built-in task."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or training output from the stages "
                                                            "(bars are also off when stderr is not a terminal)."),
):
    """Build compressed candidates, measure each (quality, size, speed), draw the Pareto fronts and
    recommend the best candidate inside the budget.

    Candidates are built as a cached recipe in OUT, and measurements are cached by weights digest, so a
    rerun after changing the budget is instant and a new plan only builds what is new.

    Examples:

        slm select --base runs/small --data runs/ds --budget "bytes<=5MB,decode_ms<=4"
        slm select --base runs/student --teacher runs/teacher --data runs/ds --tasks lm,next-line \\
            --objective next_line --plan "w50q=prune.width:mlp_ratio=0.5+recover+quant.int4"
    """
    from ..evaluate.select import DEFAULT_PLANS, parse_plan, plan_stages
    from ..pipeline.recipe import recipe_from_dict, run_recipe

    plans = [parse_plan(p) for p in plan] if plan else list(DEFAULT_PLANS)
    if recover_steps <= 0:
        plans = [type(p)(p.name, p.passes, False, p.after) for p in plans]
    stages, final = plan_stages(plans, str(base.resolve()), str(data.resolve()),
                                teacher=str(teacher.resolve()) if teacher else None, recover_steps=max(recover_steps, 1))
    refs = {"teacher": str(teacher.resolve())} if teacher else {}
    stages.append({"name": "select", "kind": "select", "with": {
        "candidates": {name: (ref if ref.startswith("@") else ref) for name, ref in final.items()},
        "data": str(data.resolve()), "budget": budget, "objective": objective,
        "tasks": [t.strip() for t in tasks.split(",") if t.strip()], "references": refs, "items": items}})
    stages.append({"name": "report", "kind": "report", "with": {"title": f"slm select: {base}"}})
    recipe = recipe_from_dict({"name": "select", "workdir": str(out), "stages": stages}, source="slm select")
    run_recipe(recipe, quiet=quiet, log=lambda m: err_console.print(m, markup=False, highlight=False))
    print_selection(out / "select" / "selection.json", out / "report" / "report.html")
