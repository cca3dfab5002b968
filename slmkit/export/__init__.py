"""Hugging Face format in and out (GGUF out to follow)."""

from .hf import HFExportError, export_hf, import_hf

__all__ = ["HFExportError", "export_hf", "import_hf"]
