"""`slm data`: sources -> cleaned documents, a byte-level BPE tokenizer and token shards."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import out_console

app = typer.Typer()


@app.command()
def data(
    sources: List[str] = typer.Argument(None, help="Files, directories, globs or .jsonl files. "
                                                   "None: the default domain (Python stdlib + pydoc topics)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to write."),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL records."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (including special tokens)."),
    val_fraction: float = typer.Option(0.01, help="Fraction of documents held out (by a hash of their id)."),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Mask e-mails, phones, IPs, card numbers, API keys."),
    tokenizer: Optional[Path] = typer.Option(None, help="Reuse this tokenizer.json (or a directory with one)."),
    max_bytes: Optional[int] = typer.Option(None, help="Stop after this many bytes of documents (quick runs)."),
    max_file_bytes: int = typer.Option(64 * 2**20, help="Skip files larger than this (JSONL: records), counted "
                                                        "as 'too large'. Default 64 MiB."),
    include_hidden: bool = typer.Option(False, "--include-hidden",
                                        help="Read hidden files (.env, .npmrc...) found in directories; skipped by "
                                             "default. Hidden directories are never walked; name one to read it."),
):
    """Build a dataset directory: cleaned documents, a byte-level BPE tokenizer and token shards.

    Examples:

        slm data --out runs/ds                          # the default domain
        slm data docs/ src/ 'notes/**/*.md' --out runs/ds --scrub-pii
        slm data tickets.jsonl --text-field body --out runs/ds --tokenizer teacher/
        slm data repo/ repo/.github --out runs/ds --include-hidden --max-file-bytes 200000000
    """
    from ..data import build_dataset

    meta = build_dataset(list(sources or []), out, text_field=text_field, vocab_size=vocab_size,
                         val_fraction=val_fraction, scrub_pii=scrub_pii, tokenizer=tokenizer, max_bytes=max_bytes,
                         max_file_bytes=max_file_bytes, include_hidden=include_hidden)
    table = Table(title=f"dataset {out}")
    table.add_column("split")
    for c in ("documents", "bytes", "tokens"):
        table.add_column(c, justify="right")
    for name, s in meta["splits"].items():
        table.add_row(name, f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}")
    out_console.print(table)
    extra = [f"vocabulary {meta['vocab_size']:,}", f"duplicates removed {meta.get('dedup_removed', 0):,}"]
    if meta.get("skipped_counts"):
        extra.append("skipped " + ", ".join(f"{k}: {v}" for k, v in meta["skipped_counts"].items()))
    if meta.get("pii"):
        extra.append("PII masked " + ", ".join(f"{k}: {v}" for k, v in meta["pii"].items()))
    out_console.print("; ".join(extra))
