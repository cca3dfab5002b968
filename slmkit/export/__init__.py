"""Hugging Face format in and out; GGUF (llama.cpp) in and out."""

from .gguf import GGUFExport, GGUFExportError, export_gguf
from .gguf_import import GGUFImportError, import_gguf, smollm2_gguf_path
from .hf import HFExportError, export_hf, import_hf

__all__ = ["GGUFExport", "GGUFExportError", "GGUFImportError", "HFExportError", "export_gguf", "export_hf",
           "import_gguf", "import_hf", "smollm2_gguf_path"]
