"""Weight-only quantization on the CPU: decode speed and checkpoint bytes, fp32 vs int8 vs int4, one run.

Builds one random model from a preset (default `small`, vocabulary 8192) and three copies of it: fp32,
`quant.int8` and `quant.int4` (group_size 128; round-to-nearest — GPTQ produces the same modules, so the
same speed). For each:

- decode tokens/s at batch 1: greedy, KV cache, a 32-token prompt prefilled, then 128 single-token steps
  timed (median of `--repeats`, the variants taking turns inside each repeat), same thread count for all;
- a single Linear 1024 -> 4096 at batch 1 (median time per call);
- checkpoint bytes (`state_bytes`: what model.safetensors holds) in total and for the projections only —
  the tied embedding/lm_head stays fp32 unless quantized (`--untied` unties it and quantizes lm_head too).

    python benchmarks/quant_speed.py --preset small --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--untied", action="store_true", help="untie lm_head and quantize it too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {"tie_word_embeddings": False} if args.untied else {}
    config = resolve_model_config(args.preset, vocab_size=args.vocab_size, **overrides)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if args.untied:
        targets += ("lm_head",)
    variants = {"fp32": None, "int8": ("quant.int8", {}), "int4-g128": ("quant.int4", {"group_size": 128})}

    torch.manual_seed(0)
    lin = nn.Linear(1024, 4096, bias=False)
    linears = {"fp32": lin, "int8": Int8Linear.from_linear(lin), "int4-g128": Int4Linear.from_linear(lin, 128)}
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
            decode[label].append(decode_seconds(model, prompt, NEW_TOKENS))
            linear[label].append(linear_seconds(linears[label]))
    for r in rows:
        r["decode_tok_s"] = NEW_TOKENS / statistics.median(decode[r["variant"]])
        r["linear_us"] = statistics.median(linear[r["variant"]]) * 1e6

    base = rows[0]
    print(f"preset={args.preset} vocab={config.vocab_size} threads={args.threads} "
          f"tied_lm_head={config.tie_word_embeddings} targets={'+'.join(targets)} "
          f"prompt={PROMPT_TOKENS} new_tokens={NEW_TOKENS} repeats={args.repeats}")
    print(f"{'variant':<10} {'decode tok/s':>12} {'x fp32':>7} {'linear 1024->4096 us':>21} {'x fp32':>7} "
          f"{'ckpt MB':>8} {'/ fp32':>7} {'proj MB':>8} {'/ fp32':>7}")
    for r in rows:
        print(f"{r['variant']:<10} {r['decode_tok_s']:>12.1f} {r['decode_tok_s'] / base['decode_tok_s']:>6.2f}x "
              f"{r['linear_us']:>21.0f} {base['linear_us'] / r['linear_us']:>6.2f}x "
              f"{r['bytes'] / 1e6:>8.2f} {r['bytes'] / base['bytes']:>7.1%} "
              f"{r['proj_bytes'] / 1e6:>8.2f} {r['proj_bytes'] / base['proj_bytes']:>7.1%}")
    print("targets: decode int8 >= 1.5x, int4 >= 2x fp32; int4 checkpoint <= 20% of fp32")


if __name__ == "__main__":
    main()
