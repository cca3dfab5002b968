"""Student initialisation: from scratch (a preset or config), from a checkpoint, or from the teacher itself
by keeping a subset of its layers (depth pruning, as in Minitron: Muralidharan et al., 2024, "Compact
Language Models via Pruning and Knowledge Distillation" — prune the teacher, then distill into the result)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, inherited_provenance, load_checkpoint
from ..model import CausalLM, resolve_model_config
from .kd_losses import KDError

TEACHER_SPEC = re.compile(r"^teacher:(?P<layers>[0-9,]+)$")
TEACHER_DROP_SPEC = re.compile(r"^teacher:drop=(?P<drop>[0-9]+)$")
BI_CALIBRATION = 16  # training windows the block influence is measured on (ShortGPT: a few thousand tokens do)


def least_influential_layers(teacher: CausalLM, ds, drop: int, *, seq_len: int) -> tuple[list[int], list[float]]:
    """The teacher's layers without the `drop` of lowest block influence on the dataset's training text
    (ShortGPT, Men et al., 2024; Minitron's depth axis), and the influence of every layer."""
    from ..compress.base import calibration_from_dataset
    from ..compress.structured import block_influence

    n = teacher.config.num_hidden_layers
    if not 0 < drop < n:
        raise KDError(f"teacher:drop={drop}: the teacher has {n} layers; drop between 1 and {n - 1}")
    bi = block_influence(teacher.eval(), calibration_from_dataset(ds, samples=BI_CALIBRATION,
                                                                   seq_len=min(seq_len, 256)))
    dropped = set(sorted(range(n), key=lambda i: (bi[i], i))[:drop])
    return [i for i in range(n) if i not in dropped], bi


def evenly_spaced_layers(n_teacher: int, keep: int) -> list[int]:
    """`keep` layer indices spread over the teacher's depth, always including the first and the last."""
    if not 1 <= keep <= n_teacher:
        raise KDError(f"cannot keep {keep} of the teacher's {n_teacher} layers")
    if keep == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (keep - 1)) for i in range(keep)})


def student_from_teacher_layers(teacher: CausalLM, layers: list[int]) -> CausalLM:
    """A copy of `teacher` with only `layers` (in order): embeddings, final norm and head are kept."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise KDError(f"teacher has {n} layers (0..{n - 1}); the student spec names {bad or 'none'}")
    config = teacher.config.replace(num_hidden_layers=len(layers))
    with torch.device("meta"):
        student = CausalLM(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = tensor.detach().clone()
        elif int(m.group(1)) in layers:
            state[f"model.layers.{layers.index(int(m.group(1)))}.{m.group(2)}"] = tensor.detach().clone()
    student.load_state_dict(state, strict=False, assign=True)
    student.tie_weights()
    student.model.rotary_emb.inv_freq = teacher.model.rotary_emb.inv_freq.detach().clone()
    return student


def layer_student_provenance(teacher: Checkpoint) -> dict:
    """What a student made of some of the teacher's layers inherits: the teacher's stages, and of its passes
    only a vocabulary trim (`prune.vocab`): the student shares the trimmed embedding and tokenizer, and the
    record of which ids were kept is what lets data in the original tokenizer be carried into its ids.
    Passes that replace layer modules are not inherited: the student's layers are plain copies."""
    passes = [r for r in teacher.provenance.get("passes", []) if r.get("name") == "prune.vocab"]
    return inherited_provenance({**teacher.provenance, "passes": passes})


def build_student(spec: str | Path, teacher: Checkpoint | None, ds, *, seq_len: int) -> tuple[CausalLM, dict, dict]:
    """Resolve `--student`: `teacher:N` (keep N evenly spaced teacher layers), `teacher:0,3,5` (those layers),
    `teacher:drop=N` (all but the N layers of lowest block influence on the training text), a checkpoint
    directory, or a preset / config file (fresh weights at the dataset's vocabulary).
    Returns the model, a record of how it was made, and the provenance it inherits (stages and compression
    passes of a checkpoint student, so a pruned or quantized student still loads after distillation)."""
    spec_str = str(spec)
    if m := TEACHER_DROP_SPEC.match(spec_str):
        layers, bi = least_influential_layers(teacher.model, ds, int(m.group("drop")), seq_len=seq_len)
        return (student_from_teacher_layers(teacher.model, layers),
                {"init": "teacher_layers", "layers": layers, "block_influence": [round(b, 6) for b in bi]},
                layer_student_provenance(teacher))
    m = TEACHER_SPEC.match(spec_str)
    if m:
        parts = [int(x) for x in m.group("layers").split(",") if x]
        n = teacher.config.num_hidden_layers
        layers = evenly_spaced_layers(n, parts[0]) if len(parts) == 1 else parts
        return (student_from_teacher_layers(teacher.model, layers), {"init": "teacher_layers", "layers": layers},
                layer_student_provenance(teacher))
    path = Path(spec_str)
    if path.is_dir() and (path / "model.safetensors").exists():
        ck = load_checkpoint(path)
        return ck.model, {"init": "checkpoint", "path": str(path.resolve())}, inherited_provenance(ck.provenance)
    config = resolve_model_config(spec, vocab_size=ds.vocab_size, bos_token_id=ds.bos_token_id,
                                  eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id,
                                  max_position_embeddings=max(2048, seq_len))
    return CausalLM(config), {"init": "scratch", "model": spec_str}, inherited_provenance({})
