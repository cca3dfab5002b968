"""Training state on disk (no pickle): optimizer tensors in safetensors, everything else in JSON.

`OUT/last/` holds the newest resumable state: the model (a full checkpoint), `optimizer.safetensors`
and `trainer_state.json` (step, total steps, RNG, config). It is written to a temporary directory and
swapped in by rename, so a crash mid-save leaves the previous state intact. Every file and the directory are
fsynced before the rename: a rename is ordered before the data it names reaches the disk only if the data
was flushed first, so after a power loss the state would otherwise be complete by name but hold zeros.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_state, save_checkpoint

STATE_DIR = "last"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_state(out: Path, model, opt, trainer_state: dict, *, tokenizer_from=None, provenance=None,
                     extra_modules: torch.nn.Module | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    final, tmp, old = out / STATE_DIR, out / f".{STATE_DIR}.tmp", out / f".{STATE_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, tokenizer_from=tokenizer_from, provenance=provenance)
    tensors, meta = optimizer_to_flat(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    if extra_modules is not None:  # trained alongside the model but not part of it (e.g. KD projections)
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_modules.state_dict().items()},
                  str(tmp / "extra.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer": meta}, indent=2))
    fsync_tree(tmp)
    # Swap: the previous state survives until the new one is complete.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)  # make the renames themselves durable
    shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames). Not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, then each directory's entries."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def find_train_state(out: Path) -> Path | None:
    out = Path(out)
    for name in (STATE_DIR, f".{STATE_DIR}.old"):  # .old exists only if a crash hit between the two renames
        d = out / name
        if (d / "trainer_state.json").exists():
            return d
    return None


def load_train_state(state_dir: Path, model, opt, extra_modules: torch.nn.Module | None = None) -> dict:
    from safetensors.torch import load_file

    try:
        trainer_state = json.loads((state_dir / "trainer_state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_dir / 'trainer_state.json'}: corrupted ({e.msg} at line {e.lineno})") from None
    weights = load_state(state_dir)
    target = model.module if hasattr(model, "module") else model
    target = getattr(target, "_orig_mod", target)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{state_dir}: model in the resume state does not match: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} — resume with the same --model")
    try:
        opt_tensors = load_file(str(state_dir / "optimizer.safetensors"))
        rng = load_file(str(state_dir / "rng.safetensors"))
    except Exception as e:  # noqa: BLE001 - any read failure means the state is unusable
        raise CheckpointError(f"{state_dir}: optimizer/RNG state unreadable ({e})") from None
    if extra_modules is not None:
        extra_file = state_dir / "extra.safetensors"
        if not extra_file.exists():
            raise CheckpointError(f"{extra_file}: missing; the run being resumed did not train the same extra "
                                  "modules (e.g. hidden-state projections) — resume with the same options")
        extra_modules.load_state_dict(load_file(str(extra_file)))
    optimizer_from_flat(opt, opt_tensors, trainer_state.pop("optimizer"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def resumable_total_steps(out: Path) -> int | None:
    """The planned total steps of the resumable run in `out`, or None when there is none. A resume honours
    the config's `steps` (a new total extends or shortens the run), so a command whose user did not give
    --steps passes this value, and leaving the flag out continues the run as planned."""
    state_dir = find_train_state(out)
    if state_dir is None:
        return None
    try:
        return int(json.loads((state_dir / "trainer_state.json").read_text())["total_steps"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{state_dir / 'trainer_state.json'}: corrupted (no readable total_steps)") from None
