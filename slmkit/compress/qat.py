"""Quantization-aware training matched to the format that ships (`--qat` on `slm train` / `slm distill`).

A QAT plan names the weight-only quantization pass that will be applied after training — `q4_0`, `q4_1` and
`q8_0` are shorthands for the GGUF-shaped ones, or any `quant.int4:...` / `quant.int8:...` spec — and, while
training, every module that pass will quantize computes its output with the weight that pass would store:

    ŵ = dequantize(quantize(w))          (the pass's own functions: `int4_params`/`quantize_int4`, `int8_scales`)
    y = x · (w + (ŵ − w).detach())ᵀ      (straight-through estimator: the forward sees ŵ, the gradient goes to w)

The scales and zero points follow the pass's rule from the current weights (they are not learned): that is what
makes the trained numbers the shipped numbers. After training the checkpoint holds float weights, and applying
the named pass to it writes exactly the codes the last forward used (`slm compress OUT --pass <plan.pass_text>`;
`tests/compress/test_qat.py` checks equality with the pass's dequantized weights, bit for bit). With
`embeddings=true` the embedding table (and the tied output head that reads it) is trained against its
quantized form as well.

Targets, per-layer fallbacks (a width the group does not divide) and refusals are the pass's own
(`find_quant_targets`, `layer_fallbacks`), so QAT and the pass can never disagree about which module holds
which format. Pruned (`SparseLinear`) and already-quantized modules are refused: QAT trains dense float weights.
GPTQ chooses codes that round-to-nearest of the final weights would not, so `quant.gptq` is not a QAT target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PassError, make_config, set_module
from .qlinear import int4_params, int8_scales, quantize_int4, quantize_int8
from .quantize import embedding_plan, find_quant_targets, layer_fallbacks, layer_format
from .run import PassSpec, parse_pass

__all__ = ["QAT_SHORTHANDS", "QATPlan", "QATLinear", "QATEmbedding", "parse_qat", "fake_quantize", "apply_qat",
           "remove_qat", "qat_modules"]

# GGUF block types -> the slmkit pass that stores exactly those numbers (`slm export gguf` writes them as is).
QAT_SHORTHANDS = {
    "q4_0": "quant.int4:format=q4_0,group_size=32",
    "q4_1": "quant.int4:format=q4_1,group_size=32",
    "q8_0": "quant.int8",
}
QAT_PASSES = ("quant.int4", "quant.int8")


@dataclass(frozen=True)
class QATPlan:
    """The pass QAT trains against: its name, its options as given and its validated config."""

    name: str
    options: dict[str, Any]
    cfg: Any

    @property
    def pass_text(self) -> str:
        """The `--pass` argument of `slm compress` that writes the trained codes."""
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name

    def to_dict(self) -> dict:
        return {"pass": self.name, "options": dict(self.options), "compress": self.pass_text}


def parse_qat(text: str) -> QATPlan:
    """`q4_0` | `q4_1` | `q8_0` | a `quant.int4:...` / `quant.int8:...` pass spec -> QATPlan (validated)."""
    text = (text or "").strip()
    if not text:
        raise PassError("--qat: empty; use one of " + ", ".join(QAT_SHORTHANDS) + " or a quant.int4/quant.int8 spec")
    spec: PassSpec = parse_pass(QAT_SHORTHANDS.get(text, text))
    if spec.name not in QAT_PASSES:
        hint = (" (GPTQ picks codes that round-to-nearest of the trained weights would not: train with --qat "
                "quant.int4:... and ship that pass)" if spec.name == "quant.gptq" else "")
        raise PassError(f"--qat {text!r}: must be one of {list(QAT_SHORTHANDS)} or a pass in {list(QAT_PASSES)} "
                        f"with options, e.g. quant.int4:format=q4_0,group_size=64{hint}")
    return QATPlan(spec.name, dict(spec.options), make_config(spec.name, dict(spec.options)))


# -- the fake quantizer ----------------------------------------------------------------------------------------

def _dequantized(weight: torch.Tensor, bits: int, group: int | None, fmt: str) -> torch.Tensor:
    """dequantize(quantize(weight)) exactly as the pass's modules compute it (same functions, same op order)."""
    w = weight.detach()
    if bits == 8:
        s = int8_scales(w)
        return quantize_int8(w, s).to(w.dtype) * s.to(w.dtype)[:, None]
    s, z = int4_params(w, group, format=fmt)
    q = quantize_int4(w, s, z)
    out_f, in_f = w.shape
    deq = (q.to(w.dtype).view(out_f, -1, group) - z.to(w.dtype)[:, :, None]) * s.to(w.dtype)[:, :, None]
    return deq.reshape(out_f, in_f)


def fake_quantize(weight: torch.Tensor, bits: int, group: int | None, fmt: str = "minmax") -> torch.Tensor:
    """The quantized weight in the forward, the identity in the backward (straight-through estimator)."""
    return weight + (_dequantized(weight, bits, group, fmt) - weight).detach()


class QATLinear(nn.Linear):
    """An nn.Linear that multiplies by its weight's quantized form (same parameters, same state dict keys)."""

    def __init__(self, linear: nn.Linear, fmt: tuple[int, int | None, str], quant_format: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: optimizers, ties and hooks see no change
        self.register_parameter("bias", linear.bias)
        self.bits, self.group_size, _ = fmt
        self.quant_format = quant_format

    def effective_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.bits, self.group_size, self.quant_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{super().extra_repr()}, qat=int{self.bits}{group}, format={self.quant_format}"


class QATEmbedding(nn.Embedding):
    """An nn.Embedding whose rows are read from its table's quantized form (groups along hidden_size)."""

    def __init__(self, emb: nn.Embedding, fmt: tuple[int, int | None, str], quant_format: str):
        nn.Module.__init__(self)
        for key in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse"):
            setattr(self, key, getattr(emb, key))
        self.weight = emb.weight
        self.bits, self.group_size, _ = fmt
        self.quant_format = quant_format

    def effective_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.bits, self.group_size, self.quant_format)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Only the rows read need their quantized form: quantization is per row (int8) or per row group (int4).
        rows = self.weight[ids.reshape(-1)]
        deq = fake_quantize(rows, self.bits, self.group_size, self.quant_format)
        return deq.reshape(*ids.shape, self.embedding_dim)


def qat_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QATLinear, QATEmbedding))}


def apply_qat(model: nn.Module, plan: QATPlan) -> dict:
    """Swap the modules `plan`'s pass will quantize for their QAT forms, in place. Returns a summary for the
    checkpoint's provenance. Raises PassError (nothing changed) when the pass could not quantize the model."""
    if qat_modules(model):
        raise PassError("--qat: the model already trains with quantization-aware modules")
    cfg = plan.cfg
    targets, skipped = find_quant_targets(model, cfg)  # validates, raising the pass's own errors
    for name, module in targets.items():
        if type(module) is not nn.Linear:
            raise PassError(f"--qat: {name} is a {type(module).__name__}; quantization-aware training needs dense "
                            "float weights (apply pruning passes after training, or drop the module from targets)")
    widths = {n: m.in_features for n, m in targets.items()}
    plan_emb = embedding_plan(model, cfg)
    if plan_emb == "tied":
        widths["model.embed_tokens"] = model.model.embed_tokens.embedding_dim
    fallbacks = layer_fallbacks(widths, cfg)  # the same per-layer formats as the pass (`_apply_rtn`)
    fmt_name = cfg.int4_format if cfg.bits == 4 else "minmax"
    if plan_emb == "tied":  # the table is quantized once, in groups along hidden_size; the tied head reads it
        emb = model.model.embed_tokens
        if type(emb) is not nn.Embedding:
            raise PassError(f"--qat: model.embed_tokens is a {type(emb).__name__}, not a float nn.Embedding")
        fmt = layer_format(cfg, fallbacks.get("model.embed_tokens"))
        set_module(model, "model.embed_tokens", QATEmbedding(emb, fmt, fmt_name))
        head = model.lm_head
        if type(head) is nn.Linear and head.weight is emb.weight:
            set_module(model, "lm_head", QATLinear(head, fmt, fmt_name))
    for name, module in targets.items():
        set_module(model, name, QATLinear(module, layer_format(cfg, fallbacks.get(name)), fmt_name))
    return {**plan.to_dict(), "modules": len(qat_modules(model)), "skipped": skipped,
            "fallbacks": sorted(fallbacks)}


def remove_qat(model: nn.Module) -> nn.Module:
    """Back to plain nn.Linear / nn.Embedding modules over the same parameters (what a checkpoint stores)."""
    for name, m in qat_modules(model).items():
        if isinstance(m, QATLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
        else:
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, device="meta")
            plain.weight = m.weight
        set_module(model, name, plain)
    return model
