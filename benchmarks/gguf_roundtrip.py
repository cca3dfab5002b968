"""GGUF export: file size, quality after llama.cpp's quantization, measured both in slmkit and in llama.cpp itself,
and llama.cpp's decode speed, for f32 / f16 / q8_0 / q4_0 against the slmkit checkpoint in the same run.

For each type the checkpoint is exported with `export_gguf`, read back with gguf's reader, dequantized and
loaded into a copy of the slmkit model (Q/K rows un-permuted), then scored on the held-out split:
bits per byte and top-1 agreement with the original's next-token argmax. Without `--ckpt` a `--preset` model is
built with random weights on a default-domain dataset (quality columns then only measure quantization noise).
When llama.cpp runs here (`slmkit.llamacpp`: node-llama-cpp's prebuilt libllama), each file is also scored by
llama.cpp on the same windows (`llama.cpp bits/byte`: the same definition, F32 KV cache; the f32 row must equal
slmkit's) and decoded greedily at batch 1 with llama.cpp's defaults (F16 KV cache), timed inside its process,
next to slmkit's own decode of the checkpoint (same threads, median of `--repeats`).

    python benchmarks/gguf_roundtrip.py --ckpt runs/quickstart/model --data runs/quickstart/data
    python benchmarks/gguf_roundtrip.py --preset small --threads 1
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gguf
from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data import build_dataset, open_dataset, token_byte_lengths
from slmkit.evaluate.lm import evaluate_lm
from slmkit.export import export_gguf
from slmkit.export.gguf import unpermute_qk
from slmkit.llamacpp import LlamaCpp, LlamaCppProcess, unavailable
from slmkit.llamacpp import evaluate_lm as llama_cpp_evaluate_lm
from slmkit.model import CausalLM, resolve_model_config

TYPES = ("f32", "f16", "q8_0", "q4_0")
ATTN = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
FFN = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def slmkit_state(path: Path, model: CausalLM, arch: str) -> dict[str, torch.Tensor]:
    """The GGUF's tensors, dequantized, under slmkit's names and in its rotate-half layout."""
    c, state = model.config, {}
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name in top:
            state[top[t.name]] = w
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m is None:  # rope_freqs: recomputed by slmkit from the config
            continue
        i, kind, suffix = m.groups()
        layer = f"model.layers.{i}."
        if kind in ATTN:
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = unpermute_qk(w, c.num_attention_heads if kind == "attn_q" else c.num_key_value_heads)
            state[f"{layer}self_attn.{ATTN[kind]}.{suffix}"] = w
        elif kind in ("attn_norm", "ffn_norm"):
            state[layer + ("input_layernorm" if kind == "attn_norm" else "post_attention_layernorm") + ".weight"] = w
        elif kind == "ffn_gate_inp":
            state[layer + "mlp.gate.weight"] = w
        elif kind.endswith("_exps"):  # (E, rows, cols)
            for e, we in enumerate(w):
                state[f"{layer}mlp.experts.{e}.{FFN[kind.removesuffix('_exps')]}.weight"] = we
        else:
            state[f"{layer}mlp.{FFN[kind]}.{suffix}"] = w
    return state


@torch.inference_mode()
def slmkit_decode_seconds(model: CausalLM, prompt: list[int], steps: int) -> float:
    cache = model.new_cache(1, len(prompt) + steps)
    token = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def llama_cpp_decode_seconds(path: Path, process: LlamaCppProcess, threads: int, prompt: list[int],
                             steps: int) -> float:
    """Like `slmkit_decode_seconds`: the prompt and the first token are not timed, then `steps` greedy tokens."""
    llm = LlamaCpp(path, threads=threads, kv_type="f16", flash_attention="auto", process=process)
    return steps / llm.timed_decode(prompt, steps + 1).decode_tokens_per_s


def default_checkpoint(work: Path, preset: str) -> tuple[Path, Path]:
    data = work / "data"
    build_dataset([], data, vocab_size=8192, max_bytes=2_000_000, val_fraction=0.05, progress=False)
    torch.manual_seed(0)
    model = CausalLM(resolve_model_config(preset, vocab_size=8192)).eval()
    return save_checkpoint(model, work / "ckpt", tokenizer_from=data), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--data", type=Path, help="dataset directory for the held-out split (default: built)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    no_llama_cpp = unavailable()

    with tempfile.TemporaryDirectory() as tmp, LlamaCppProcess() as process:
        work = Path(tmp)
        ckpt, data = (args.ckpt, args.data) if args.ckpt else default_checkpoint(work, args.preset)
        base = load_checkpoint(ckpt).model
        ds = open_dataset(data)
        val, lengths = ds.split("val"), token_byte_lengths(ds.tokenizer())
        window = torch.from_numpy(np.asarray(val.window(0, min(len(val), 513)), dtype=np.int64))[None]
        with torch.inference_mode():
            base_top1 = base(window[:, :-1]).argmax(-1)
        safetensors_bytes = (Path(ckpt) / "model.safetensors").stat().st_size
        scoring = dict(seq_len=256, max_tokens=args.eval_tokens)
        rows = [("slmkit safetensors", safetensors_bytes, evaluate_lm(base, val, lengths, **scoring), 1.0, None,
                 None)]
        prompt = window[0, :32].tolist()
        ours = statistics.median(slmkit_decode_seconds(base, prompt, 128) for _ in range(args.repeats))
        for t in TYPES:
            result = export_gguf(ckpt, work / f"model-{t}.gguf", type=t)
            model = load_checkpoint(ckpt).model
            model.load_state_dict(slmkit_state(result.path, model, result.architecture), strict=False)
            model.tie_weights()
            with torch.inference_mode():
                agree = (model(window[:, :-1]).argmax(-1) == base_top1).float().mean().item()
            theirs = speed = None
            if no_llama_cpp is None:
                llm = LlamaCpp(result.path, threads=args.threads, process=process)
                theirs = llama_cpp_evaluate_lm(llm, val, lengths, **scoring)["bits_per_byte"]
                speed = statistics.median(llama_cpp_decode_seconds(result.path, process, args.threads, prompt, 128)
                                          for _ in range(args.repeats))
            rows.append((f"gguf {t}", result.path.stat().st_size, evaluate_lm(model, val, lengths, **scoring), agree,
                         theirs, speed))

    print(f"checkpoint {ckpt}, {base.num_parameters():,} parameters, {args.threads} threads")
    print(f"{'file':<20}{'bytes':>14}{'vs safetensors':>16}{'bits/byte':>11}{'llama.cpp b/B':>15}{'top-1 agree':>13}"
          f"{'llama.cpp tok/s':>17}")
    for name, size, metrics, agree, theirs, seconds in rows:
        missing = "-" if name.startswith("slmkit") else "n/a"
        speed = f"{128 / seconds:,.1f}" if seconds else missing
        scored = f"{theirs:.4f}" if theirs is not None else missing
        print(f"{name:<20}{size:>14,}{size / safetensors_bytes:>15.3f}x{metrics['bits_per_byte']:>11.4f}{scored:>15}"
              f"{agree:>13.4f}{speed:>17}")
    print(f"slmkit decode (same model, fp32, batch 1): {128 / ours:,.1f} tok/s"
          + (f"; llama.cpp columns need it installed: {no_llama_cpp}" if no_llama_cpp else ""))


if __name__ == "__main__":
    main()
