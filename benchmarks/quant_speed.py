"""Quantization on the CPU: decode speed and checkpoint bytes, fp32 vs int8 (each kernel) vs int4, one run.

Builds one random model from a preset (default `small`, vocabulary 8192) and copies of it: fp32,
`quant.int8` with `kernel=weight_only` (float activations, `_weight_int8pack_mm`) and `kernel=dynamic`
(per-token 7-bit activations, fbgemm integer GEMM), and `quant.int4` (group_size 128); round-to-nearest —
GPTQ produces the same modules, so the same speed. `--embeddings` adds int8/int4 variants whose tied
embedding/lm_head table is quantized too (`embeddings=true`). For each:

- decode tokens/s at batch 1: greedy, KV cache, a 32-token prompt prefilled, then 128 single-token steps
  timed (median of `--repeats`, the variants taking turns inside each repeat), same thread count for all;
- a single Linear 1024 -> 4096 at batch 1 (median time per call);
- checkpoint bytes (`state_bytes`: what model.safetensors holds) in total and for the projections only —
  the tied embedding/lm_head stays fp32 unless quantized (`--untied` unties it and quantizes lm_head too).

`--kernels` instead times each candidate int8 kernel alone on the `medium` preset's shapes at batch 1 and 8
(median µs per call): fp32 `F.linear`; `_weight_int8pack_mm` with fp32 and with bf16 activations; fbgemm's
and oneDNN's `quantized::linear_dynamic` (per-tensor activations, what `torch.ao` `quantize_dynamic` runs);
`Int8Linear(kernel="dynamic")` (fbgemm plus its per-row mapping); `torch._int_mm` after quantizing x by hand.

    python benchmarks/quant_speed.py --preset medium --threads 1 --embeddings
    python benchmarks/quant_speed.py --kernels --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.checkpoint import state_dict_for_save
from slmkit.compress.base import get_pass, make_config, state_bytes
from slmkit.compress.qlinear import Int4Linear, Int8Linear
from slmkit.model import CausalLM, resolve_model_config

PROMPT_TOKENS = 32
NEW_TOKENS = 128


@torch.inference_mode()
def decode_seconds(model: CausalLM, prompt: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy single-token steps after prefilling `prompt` (prefill not counted)."""
    cache = model.new_cache(1, prompt.shape[1] + steps)
    logits = model(prompt, cache=cache, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def projection_bytes(model: nn.Module, names: set[str]) -> int:
    return sum(t.numel() * t.element_size() for k, t in state_dict_for_save(model).items()
               if k.rsplit(".", 1)[0] in names)


@torch.inference_mode()
def linear_seconds(module: nn.Module, calls: int = 200) -> float:
    """Mean seconds per call of `module` on one row, over `calls` calls after a few warm-up calls."""
    x = torch.randn(1, module.in_features)
    for _ in range(5):
        module(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - t0) / calls


def _median_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


@torch.inference_mode()
def kernel_table(shapes: list[tuple[int, int]], batches: tuple[int, ...] = (1, 8)) -> None:
    """Median µs per call of each int8 kernel against fp32 F.linear, one table (see the module docstring)."""
    engine = torch.backends.quantized.engine
    engines = [e for e in ("x86", "onednn") if e in torch.backends.quantized.supported_engines]
    rows = []
    for in_f, out_f in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False)
        q8 = Int8Linear.from_linear(lin, "dynamic")
        w, codes, s = q8.dequantize(), q8.weight_int8, q8.scales
        packed = {}
        for e in engines:
            torch.backends.quantized.engine = e
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(codes, s.double(), torch.zeros(out_f, dtype=torch.long), 0)
            packed[e] = torch.ops.quantized.linear_prepack(qw, None)
        codes_t = codes.t().contiguous()
        for b in batches:
            x = torch.randn(b, in_f)
            calls = max(5, int(2e8 // (in_f * out_f * b * 8)))
            fp32 = _median_us(lambda: F.linear(x, w), calls)
            times = {"int8pack fp32-act": _median_us(lambda: torch.ops.aten._weight_int8pack_mm(x, codes, s),
                                                      max(3, calls // 8)),
                     "int8pack bf16-act": _median_us(
                         lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), codes, s.bfloat16()).float(), calls)}
            for e, pk in packed.items():
                torch.backends.quantized.engine = e
                times[f"dynamic {e}"] = _median_us(lambda: torch.ops.quantized.linear_dynamic(x, pk, True), calls)
            torch.backends.quantized.engine = engine
            times["Int8Linear dynamic"] = _median_us(lambda: q8(x), calls)

            def int_mm():
                sx = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # (b, 1) per-row symmetric
                xq = torch.round(x / sx).to(torch.int8)
                return torch._int_mm(xq, codes_t).float() * sx * s
            try:
                times["_int_mm"] = _median_us(int_mm, max(3, calls // 8))
            except RuntimeError:  # shapes this build's CPU _int_mm refuses
                times["_int_mm"] = float("nan")
            rows.append((f"{in_f}->{out_f}", b, fp32, times))
    torch.backends.quantized.engine = engine
    names = list(rows[0][3])
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}; "
          "median µs per call (x = speedup over fp32)")
    print(f"{'shape':<10} {'B':>2} {'fp32':>8} " + " ".join(f"{n:>22}" for n in names))
    for shape, b, fp32, times in rows:
        cells = " ".join(f"{t:>13.0f} ({fp32 / t:>4.2f}x)" for t in times.values())
        print(f"{shape:<10} {b:>2} {fp32:>8.0f} {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="timed decode steps per repeat")
    ap.add_argument("--untied", action="store_true", help="untie lm_head and quantize it too")
    ap.add_argument("--embeddings", action="store_true", help="also variants with embeddings=true (tied table)")
    ap.add_argument("--kernels", action="store_true", help="time the int8 kernels alone on the preset's shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        c = resolve_model_config("medium" if args.preset == "small" else args.preset, vocab_size=args.vocab_size)
        d, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
        kernel_table([(d, d), (d, kv), (d, c.intermediate_size), (c.intermediate_size, d), (d, c.vocab_size)])
        return

    overrides = {"tie_word_embeddings": False} if args.untied else {}
    config = resolve_model_config(args.preset, vocab_size=args.vocab_size, **overrides)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if args.untied:
        targets += ("lm_head",)
    variants = {"fp32": None, "int8-wo": ("quant.int8", {"kernel": "weight_only"}),
                "int8-dyn": ("quant.int8", {"kernel": "dynamic"}), "int4-g128": ("quant.int4", {"group_size": 128})}
    if args.embeddings:
        variants.update({f"{k}+emb": (n, {**o, "embeddings": True}) for k, (n, o) in list(variants.items())[1:]})

    torch.manual_seed(0)
    lin = nn.Linear(1024, 4096, bias=False)
    linears = {"fp32": lin, "int8-wo": Int8Linear.from_linear(lin, "weight_only"),
               "int8-dyn": Int8Linear.from_linear(lin, "dynamic"), "int4-g128": Int4Linear.from_linear(lin, 128)}
    linears.update({f"{k}+emb": m for k, m in list(linears.items())[1:]})
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))

    models, rows = {}, []
    for label, spec in variants.items():
        torch.manual_seed(0)
        model = CausalLM(config).eval()
        proj_names = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
        if spec is not None:
            name, options = spec
            model, _ = get_pass(name).apply(model, make_config(name, {**options, "targets": targets}))
        models[label] = model
        rows.append({"variant": label, "bytes": state_bytes(model), "proj_bytes": projection_bytes(model, proj_names)})
    # Round-robin over the variants inside each repeat, so drift in a shared machine's load hits all alike.
    decode = {label: [] for label in models}
    linear = {label: [] for label in models}
    for label in models:  # warm-up (also builds the int4 kernel layout)
        decode_seconds(models[label], prompt, 8)
    for _ in range(args.repeats):
        for label, model in models.items():
            decode[label].append(decode_seconds(model, prompt, args.new_tokens))
            linear[label].append(linear_seconds(linears[label]))
    for r in rows:
        r["decode_tok_s"] = args.new_tokens / statistics.median(decode[r["variant"]])
        r["linear_us"] = statistics.median(linear[r["variant"]]) * 1e6

    base = rows[0]
    print(f"preset={args.preset} vocab={config.vocab_size} threads={args.threads} "
          f"tied_lm_head={config.tie_word_embeddings} targets={'+'.join(targets)} "
          f"prompt={PROMPT_TOKENS} new_tokens={args.new_tokens} repeats={args.repeats}")
    print(f"{'variant':<14} {'decode tok/s':>12} {'x fp32':>7} {'linear 1024->4096 us':>21} {'x fp32':>7} "
          f"{'ckpt MB':>8} {'/ fp32':>7} {'proj MB':>8} {'/ fp32':>7}")
    for r in rows:
        print(f"{r['variant']:<14} {r['decode_tok_s']:>12.1f} {r['decode_tok_s'] / base['decode_tok_s']:>6.2f}x "
              f"{r['linear_us']:>21.0f} {base['linear_us'] / r['linear_us']:>6.2f}x "
              f"{r['bytes'] / 1e6:>8.2f} {r['bytes'] / base['bytes']:>7.1%} "
              f"{r['proj_bytes'] / 1e6:>8.2f} {r['proj_bytes'] / base['proj_bytes']:>7.1%}")
    print("targets: decode int8 >= 1.5x, int4 >= 2x fp32; int4 checkpoint <= 20% of fp32. int8-dyn quantizes "
          "activations per token (7 bits): its quality cost is in README.md, not measured here (random weights)")


if __name__ == "__main__":
    main()
