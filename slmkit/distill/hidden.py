"""Hidden-state distillation: make chosen student layers' outputs predict chosen teacher layers' outputs.

Follows FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets") and TinyBERT (Jiao et al. 2020):
a learned linear map W (student width -> teacher width) per matched layer pair, trained jointly with the
student, and an MSE between W·h_student and h_teacher. The maps exist only for training; they are not part
of the student checkpoint. A trainer must therefore hand `HiddenStateLoss.parameters()` to the optimizer
alongside the student's.

Hidden-state convention (from the decoder's `forward(..., return_hidden_states=True)`, which returns
`(logits, hidden)`): for a model with L layers, `hidden` has L+1 entries; `hidden[j]` for j in 0..L−1 is
the *input* to layer j (`hidden[0]` = the token embeddings) and `hidden[L]` is the final normalised output.
So the output of layer i is `hidden[i + 1]`, and the last layer's output is seen after the final norm.
Layer maps here name layers (0-based), never list positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slmkit.distill.kd_losses import KDError

__all__ = ["default_layer_map", "parse_layer_map", "HiddenStateLoss"]


def _check_counts(n_student: int, n_teacher: int) -> None:
    if n_student < 1 or n_teacher < 1:
        raise KDError(f"layer counts must be >= 1, got student={n_student}, teacher={n_teacher}")


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Uniform map: student layer i <-> teacher layer round((i+1)·n_t/n_s) − 1, so the last student layer
    meets the last teacher layer and the rest spread evenly. Rounds half up, in exact integer arithmetic
    (Python's round() rounds half to even, which would skew the spacing); clamped at 0 for a student deeper
    than twice the teacher."""
    _check_counts(n_student, n_teacher)
    return [(i, max(0, (2 * (i + 1) * n_teacher + n_student) // (2 * n_student) - 1)) for i in range(n_student)]


def parse_layer_map(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Parse "0:1,1:3,2:5" (student:teacher layer pairs, 0-based) and check every index is in range."""
    _check_counts(n_student, n_teacher)
    pairs: list[tuple[int, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            s, t = int(parts[0]), int(parts[1])
        except ValueError:
            raise KDError(f"layer map item {item!r} in {spec!r} is not 'student:teacher' (e.g. '0:1,1:3,2:5')") \
                from None
        for who, n, idx in (("student", n_student, s), ("teacher", n_teacher, t)):
            if not 0 <= idx < n:
                raise KDError(f"{who} has {n} layers (0..{n - 1}); map names {idx} (in {item!r} of {spec!r})")
        pairs.append((s, t))
    if not pairs:
        raise KDError(f"layer map {spec!r} names no layer pairs; write e.g. '0:1,1:3,2:5'")
    return pairs


class HiddenStateLoss(nn.Module):
    """Mean over mapped layer pairs of a width-independent MSE between projected student and teacher states.

    One `nn.Linear(student_width, teacher_width, bias=False)` per pair when the widths differ (identity when
    they are equal). Teacher states are detached: the teacher is frozen."""

    def __init__(self, student_width: int, teacher_width: int, layer_map: list[tuple[int, int]]):
        super().__init__()
        if not layer_map:
            raise KDError("HiddenStateLoss needs at least one (student, teacher) layer pair")
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.student_width, self.teacher_width = student_width, teacher_width
        self.proj = None
        if student_width != teacher_width:
            self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in self.layer_map)

    def forward(self, student_hidden: list[Tensor], teacher_hidden: list[Tensor]) -> Tensor:
        """student_hidden / teacher_hidden: the `hidden` lists of the two models (see module docstring);
        each entry (B, T, d_s) / (B, T, d_t). Returns a scalar."""
        max_s = max(s for s, _ in self.layer_map)
        max_t = max(t for _, t in self.layer_map)
        for who, hidden, idx in (("student", student_hidden, max_s), ("teacher", teacher_hidden, max_t)):
            if len(hidden) < idx + 2:
                raise KDError(f"the layer map uses {who} layer {idx}, whose output is hidden[{idx + 1}], but "
                              f"the {who} returned {len(hidden)} hidden states; pass the model's "
                              f"forward(..., return_hidden_states=True) list")
        losses = []
        for k, (s, t) in enumerate(self.layer_map):
            h_s = student_hidden[s + 1]  # (B, T, d_s)
            h_t = teacher_hidden[t + 1].detach().float()  # (B, T, d_t)
            if h_s.shape[:-1] != h_t.shape[:-1]:
                raise KDError(f"student layer {s} output {tuple(h_s.shape)} and teacher layer {t} output "
                              f"{tuple(h_t.shape)} cover different positions; feed both models the same batch")
            pred = (self.proj[k](h_s) if self.proj is not None else h_s).float()  # (B, T, d_t)
            # Divide by the teacher state's mean square: a raw MSE grows with the teacher's width and its
            # activation scale (which also differs layer to layer), so the normalised loss is ~1 for a
            # prediction of 0 whatever the model, and one weight fits all pairs and sizes.
            scale = h_t.pow(2).mean().clamp(min=1e-8)
            losses.append((pred - h_t).pow(2).mean() / scale)
        return torch.stack(losses).mean()
