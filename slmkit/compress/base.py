"""Compression passes: the contract every technique follows.

A pass is three things, registered under a name such as `prune.wanda` or `quant.gptq`:

- a frozen config dataclass (validated in `__post_init__`, raising `PassError` that names the pass and field);
- `apply(model, cfg, calib) -> (model, report)`: changes the model in place (or returns a new one) using
  calibration batches where it needs them. The report is a JSON-able dict; the driver adds params, nonzero
  params, bytes and seconds;
- `restructure(model, cfg, record) -> model`: makes a freshly built (meta-device) model take the *shapes and
  module types* the pass produced, from the record saved in `slmkit.json` — no data, no calibration — so
  `load_checkpoint` can replay passes and then load the stored tensors with `assign=True`.

Modules a pass swaps in serialise themselves through their state dict (packed integers, scales, sparse
values and masks), so checkpoints stay plain safetensors.

A pass's long loops (calibration forwards, layer-by-layer solves) report how far they are with
`pass_progress(description, total)`; the driver decides where that goes (`reporting_progress`), so `apply`
keeps the one signature every pass has.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn


class PassError(ValueError):
    """A pass that cannot run as configured; raised before any weight changes."""


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    config_cls: type
    apply: Callable[..., tuple[nn.Module, dict]]
    restructure: Callable[[nn.Module, Any, dict], nn.Module] | None
    needs_calibration: bool
    summary: str


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, config_cls: type, *, needs_calibration: bool = False,
                  restructure: Callable | None = None, summary: str = ""):
    """Decorator for a pass's `apply` function."""

    def wrap(apply_fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = RegisteredPass(name, config_cls, apply_fn, restructure, needs_calibration,
                                      summary or (apply_fn.__doc__ or "").strip().split("\n")[0])
        return apply_fn

    return wrap


def get_pass(name: str) -> RegisteredPass:
    _load_builtin_passes()
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def make_config(name: str, options: dict[str, Any]) -> Any:
    """Build a pass's config from loose options (strings from the CLI are converted by field type)."""
    p = get_pass(name)
    fields = {f.name: f for f in dataclasses.fields(p.config_cls)}
    unknown = set(options) - set(fields)
    if unknown:
        raise PassError(f"{name}: unknown option(s) {sorted(unknown)}; options: {sorted(fields)}")
    kwargs = {}
    for key, value in options.items():
        kwargs[key] = _convert(name, key, value, fields[key].type)
    try:
        return p.config_cls(**kwargs)
    except TypeError as e:
        raise PassError(f"{name}: {e}") from None


def _convert(pass_name: str, key: str, value: Any, annotation: Any) -> Any:
    if isinstance(value, list):  # tuples come back from JSON as lists
        return tuple(value)
    if not isinstance(value, str):
        return value
    kind = str(annotation)
    try:
        if "bool" in kind:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if "int" in kind and "float" not in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except ValueError:
        raise PassError(f"{pass_name}: option {key}={value!r} is not a valid {kind}") from None
    if "tuple" in kind:
        return tuple(v.strip() for v in value.split("+") if v.strip())
    return value


def config_to_dict(cfg: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _load_builtin_passes() -> None:
    """Import the modules that register the built-in passes (each registers on import)."""
    import importlib

    for mod in ("prune", "quantize", "gptq", "lowrank", "structured", "vocab"):
        try:
            importlib.import_module(f"slmkit.compress.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"slmkit.compress.{mod}":
                raise


# -- progress ---------------------------------------------------------------------------------------------

# The progress hook (`slmkit.evaluate.suite.ProgressHook`: (description, total) -> advance(n)) of the pass
# being applied; None draws nothing.
_PROGRESS: ContextVar[Callable | None] = ContextVar("slmkit_pass_progress", default=None)


@contextmanager
def reporting_progress(hook: Callable | None, prefix: str = ""):
    """Within the block, `pass_progress` bars go to `hook`, their descriptions after `prefix`."""
    token = _PROGRESS.set(labelled_progress(hook, prefix))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def labelled_progress(hook: Callable | None, prefix: str) -> Callable | None:
    """`hook` with `prefix` before every description (which model or pass a bar belongs to)."""
    if hook is None or not prefix:
        return hook
    return lambda description, total: hook(f"{prefix}{description}", total)


def pass_progress(description: str, total: int | None) -> Callable[[int], None]:
    """A bar of `total` units on the current progress hook; returns the function to call with units done
    (a no-op when no hook is set)."""
    hook = _PROGRESS.get()
    advance = hook(description, total) if hook is not None else None
    return advance if advance is not None else _ignore


def _ignore(n: int) -> None:
    pass


# -- finding the projections ---------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_linears(model: nn.Module, targets: Iterable[str] = PROJECTIONS,
                   include_lm_head: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """(qualified name, module) for every plain `nn.Linear` whose last name part is in `targets`, in model
    order. The embedding-tied `lm_head` is left alone unless asked for."""
    wanted = set(targets) | ({"lm_head"} if include_lm_head else set())
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in wanted:
            yield name, module


def set_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


# -- calibration ------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """N token sequences from a dataset, fed through the model to collect activation statistics."""

    input_ids: torch.Tensor  # (N, T)
    tokenizer_sha256: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def batches(self, batch_size: int = 8) -> Iterator[torch.Tensor]:
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i:i + batch_size]


def calibration_from_dataset(data, *, samples: int = 64, seq_len: int = 256, seed: int = 0,
                             split: str = "train") -> Calibration:
    """`samples` random windows of `seq_len` tokens from a dataset directory (or an open Dataset)."""
    import numpy as np

    from ..data import open_dataset

    ds = open_dataset(data) if not hasattr(data, "split") else data
    stream = ds.split(split)
    if len(stream) < seq_len + 1:
        raise PassError(f"calibration: the {split} split has {len(stream)} tokens, fewer than seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_len, size=samples)
    ids = torch.from_numpy(np.stack([stream.window(int(s), seq_len) for s in starts]).astype(np.int64))
    return Calibration(ids, ds.meta.get("tokenizer_sha256"), str(ds.path),
                       {"samples": samples, "seq_len": seq_len, "seed": seed, "split": split})


def collect_inputs(model: nn.Module, modules: dict[str, nn.Module], calib: Calibration,
                   fn: Callable[[str, torch.Tensor], None], *, batch_size: int = 8) -> None:
    """Run the calibration set through `model`, calling `fn(name, x)` with the input `x` (..., in_features)
    of every module in `modules` (forward pre-hooks; removed afterwards)."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0].detach()))
               for n, m in modules.items()]
    device = next(model.parameters()).device
    advance = pass_progress("calibration forward (sequences)", calib.input_ids.shape[0])
    try:
        with torch.inference_mode():
            for ids in calib.batches(batch_size):
                model(ids.to(device))
                advance(ids.shape[0])
    finally:
        for h in handles:
            h.remove()


# -- size accounting ------------------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the checkpoint would store (tied weights once; modules' own serialised form)."""
    from ..checkpoint import state_dict_for_save

    return sum(tensor_bytes(t) for t in state_dict_for_save(model).values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over unique parameters and the weights compressed modules hold as buffers."""
    seen, total, nonzero = set(), 0, 0
    for module in model.modules():
        counter = getattr(module, "logical_parameters", None)
        if callable(counter):
            t, nz = counter()
            total, nonzero = total + t, nonzero + nz
            for p in module.parameters(recurse=False):
                seen.add(id(p))
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            nonzero += int(torch.count_nonzero(p)) if p.device.type != "meta" else p.numel()
    return total, nonzero
