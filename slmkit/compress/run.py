"""`slm compress`: apply passes in order, measure each, write a checkpoint that loads compressed.

Each pass gets one table row: parameters, nonzero parameters, bytes of the stored tensors, held-out bits per
byte, decode tokens/s at batch 1 (median of a few greedy runs with the KV cache) and seconds taken; the first
row is the model as loaded. Every configuration is validated before any weight changes.

With a progress hook, the long parts draw bars: each pass's calibrated work (`base.pass_progress`), the held-out
bits per byte before and after each pass, and each decode-speed measurement.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import yamlio
from ..checkpoint import load_checkpoint, save_checkpoint
from .base import (PassError, Calibration, calibration_from_dataset, config_to_dict, count_parameters, get_pass,
                   make_config, reporting_progress, state_bytes)
from .vocab import follow_vocab_trim, kept_ids_of

if TYPE_CHECKING:
    from ..evaluate.suite import ProgressHook


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any]


def parse_pass(text: str) -> PassSpec:
    """`NAME` or `NAME:key=value,key=value` (tuple values joined with `+`, e.g. targets=q_proj+k_proj)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassError(f"{name}: option {item!r} must be key=value")
        options[key.strip()] = value.strip()
    return PassSpec(name.strip(), options)


def load_plan(path: str | Path) -> list[PassSpec]:
    """A YAML plan: a list of passes, each `{pass: NAME, key: value, ...}` or a `NAME:k=v` string."""
    data = yamlio.load_file(path, PassError)
    items = data.get("passes", data) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise PassError(f"{path}: expected a list of passes (or a mapping with `passes:`)")
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            specs.append(parse_pass(item))
        elif isinstance(item, dict) and "pass" in item:
            specs.append(PassSpec(item["pass"], {k: v for k, v in item.items() if k != "pass"}))
        else:
            raise PassError(f"{path}: entry {i + 1} must be `NAME:k=v` or a mapping with a `pass:` key")
    return specs


@torch.inference_mode()
def decode_tokens_per_s(model: torch.nn.Module, *, prompt_len: int = 32, new_tokens: int = 64,
                        repeats: int = 3, progress: Callable[[int], None] | None = None) -> float:
    """Greedy decode speed at batch 1 with the KV cache (median over repeats after a warm-up).
    `progress(1)` is called after each of the `repeats + 1` runs, outside the timed part."""
    device = next(model.parameters()).device
    prompt = torch.arange(prompt_len, device=device)[None] % model.config.vocab_size

    def run() -> float:
        cache = model.new_cache(1, prompt_len + new_tokens + 1)
        logits = model(prompt, cache=cache, last_only=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache)
        tok_s = new_tokens / (time.perf_counter() - t0)
        if progress is not None:
            progress(1)
        return tok_s

    run()
    return statistics.median(run() for _ in range(repeats))


SPEED_REPEATS = 3  # timed decode runs per table row (after one warm-up)


def measure(model, evaluate, *, speed: bool, label: str = "", progress: ProgressHook | None = None) -> dict:
    """One table row: sizes, held-out bits per byte (`evaluate(model, label)`) and decode tokens/s."""
    total, nonzero = count_parameters(model)
    row = {"parameters": total, "nonzero": nonzero, "bytes": state_bytes(model)}
    if evaluate is not None:
        row["bits_per_byte"] = evaluate(model, label)["bits_per_byte"]
    if speed:
        advance = progress(f"{label}: decode speed (runs)", SPEED_REPEATS + 1) if progress is not None else None
        row["decode_tok_s"] = decode_tokens_per_s(model, repeats=SPEED_REPEATS, progress=advance)
    return row


def validate_plan(specs: list[PassSpec], calib_available: bool, earlier: list[str] = ()) -> list[Any]:
    """Configs for every pass, and an order that can work, checked before any weight changes. `earlier`
    are the passes already applied to the checkpoint."""
    configs = []
    quantized = next((n for n in earlier if n.startswith("quant.")), None)
    for spec in specs:
        p = get_pass(spec.name)
        configs.append(make_config(spec.name, spec.options))
        if p.needs_calibration and not calib_available:
            raise PassError(f"{spec.name} needs calibration data: pass --data DATASET")
        if quantized and spec.name.startswith(("prune.", "lowrank.")):
            raise PassError(f"{spec.name} after {quantized}: pruning or factorizing quantized weights cannot work; "
                            f"put {spec.name} before {quantized} (quantize last)")
        if spec.name.startswith("quant."):
            quantized = quantized or spec.name
    return configs


def compress(ckpt: str | Path, out: str | Path, specs: list[PassSpec], *, data: str | Path | None = None,
             calib_samples: int = 64, calib_seq_len: int = 256, eval_tokens: int = 32768, speed: bool = True,
             progress: ProgressHook | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Apply `specs` to the checkpoint `ckpt`, write `out`; returns the table rows (first row: the input).
    `on_row(row)` is called as each row is measured; `progress` draws the bars (see the module docstring)."""
    ck = load_checkpoint(ckpt)
    configs = validate_plan(specs, data is not None, [p["name"] for p in ck.provenance.get("passes", [])])
    model = ck.model.eval()
    calib, evaluate = None, None
    if data is not None:
        from ..data import open_dataset, token_byte_lengths
        from ..evaluate.lm import evaluate_lm, lm_windows
        from .vocab_remap import dataset_for_checkpoint

        # the dataset must speak the checkpoint's tokenizer; a vocabulary-trimmed checkpoint reads it remapped
        # (the train split only when a pass calibrates on it)
        calibrated = any(get_pass(s.name).needs_calibration for s in specs)
        ds = dataset_for_checkpoint(open_dataset(data), ck.path, splits=("train", "val") if calibrated else ("val",))
        if calibrated:
            calib = calibration_from_dataset(ds, samples=calib_samples, seq_len=calib_seq_len)
        lengths = token_byte_lengths(ds.tokenizer())
        val = ds.split("val")

        def evaluate(m, label: str):
            windows = lm_windows(len(val), calib_seq_len, eval_tokens)
            advance = progress(f"{label}: held-out bits/byte (windows)", windows) if progress is not None else None
            return evaluate_lm(m, val, lengths, seq_len=calib_seq_len, max_tokens=eval_tokens, progress=advance)

    rows = [{"pass": "(input)", **measure(model, evaluate, speed=speed, label="(input)", progress=progress),
             "seconds": 0.0}]
    if on_row:
        on_row(rows[-1])
    records = []
    tokenizer_dir = ck.path if ck.tokenizer_path else None
    for spec, cfg in zip(specs, configs):
        p = get_pass(spec.name)
        t0 = time.perf_counter()
        with reporting_progress(progress, f"{spec.name}: "):
            model, report = p.apply(model, cfg, calib if p.needs_calibration else None)
        seconds = time.perf_counter() - t0
        model.eval()
        kept = kept_ids_of(report)
        if kept is not None:  # new token ids: the tokenizer, held-out ids and later calibration follow them
            scratch = tempfile.TemporaryDirectory(prefix="slm-vocab-")  # removed when compress() returns
            tokenizer_dir, val, lengths, calib = follow_vocab_trim(kept, tokenizer_dir or ds.path, scratch.name,
                                                                   val=val, lengths=lengths, calib=calib)
        row = {"pass": spec.name, **measure(model, evaluate, speed=speed, label=spec.name, progress=progress),
               "seconds": seconds}
        records.append({"name": spec.name, "config": config_to_dict(cfg),
                        "report": {**report, **{k: v for k, v in row.items() if k != "pass"}}})
        if report.get("notes"):  # e.g. the per-layer group size fallbacks of quant.int4/gptq, shown under the row
            row["notes"] = list(report["notes"])
        rows.append(row)
        if on_row:
            on_row(row)
    prov = copy.deepcopy(ck.provenance)
    prov.pop("files", None)
    prov["passes"] = [*prov.get("passes", []), *records]
    stage = {"stage": "compress", "source": str(Path(ckpt).resolve()), "passes": [r["name"] for r in records],
             "calibration": calib.meta if calib is not None else None,
             "summary": {"passes": " -> ".join(r["name"] for r in records),
                         "bytes": f"{rows[0]['bytes']:,} -> {rows[-1]['bytes']:,}"},
             "metrics": {k: rows[-1][k] for k in ("bits_per_byte", "decode_tok_s") if k in rows[-1]}}
    prov["stages"] = [*prov.get("stages", []), stage]
    save_checkpoint(model, out, tokenizer_from=tokenizer_dir, provenance=prov)
    return rows


def replay_passes(model: torch.nn.Module, passes: list[dict]) -> torch.nn.Module:
    """Give a freshly built (meta) model the module types and shapes recorded passes produced."""
    for rec in passes:
        p = get_pass(rec["name"])
        if p.restructure is not None:
            model = p.restructure(model, make_config(rec["name"], rec.get("config", {})), rec.get("report", {}))
    return model


__all__ = ["Calibration", "PassSpec", "compress", "decode_tokens_per_s", "load_plan", "parse_pass", "replay_passes"]
