"""Hugging Face format in and out; GGUF (llama.cpp) out."""

from .gguf import GGUFExport, GGUFExportError, export_gguf
from .hf import HFExportError, export_hf, import_hf

__all__ = ["GGUFExport", "GGUFExportError", "HFExportError", "export_gguf", "export_hf", "import_hf"]
