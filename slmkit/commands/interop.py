"""`slm export hf|gguf` and `slm import hf`: checkpoints to and from Hugging Face and llama.cpp formats."""

from __future__ import annotations

from pathlib import Path

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
                    type: str = typer.Option("f16", "--type", "-t",
                                             help="Matrix storage: f32 | f16 | q8_0 | q4_0 (norms stay f32).")):
    """Write one GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python, ollama) loads.

    Llama, Mistral, Phi-3 and Mixtral export as llama.cpp's `llama` architecture, Qwen2 as `qwen2`; the
    tokenizer and chat template go into the file. Linformer, Transformer-XL memory and slmkit-compressed
    (low-rank, int8/int4) checkpoints are refused: export the model from before compression and let
    `--type` quantize it for llama.cpp.

    Examples:

        slm export gguf runs/small runs/small.gguf

        slm export gguf runs/small runs/small-q8_0.gguf --type q8_0

        llama-cli -m runs/small-q8_0.gguf -p "def fib(n):"
    """
    from ..export import export_gguf

    result = export_gguf(ckpt, out, type=type)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    out_console.print(f"wrote {result.path} ({result.architecture}, {result.file_type}, "
                      f"{len(result.tensor_types)} tensors, {result.bytes:,} bytes)")


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
