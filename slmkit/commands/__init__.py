"""The `slm` commands, one module per area; `slmkit.cli` merges their Typer apps into one.

    data       slm data
    train      slm train, distill, teacher-cache
    align      slm sft, pairs, dpo, merge-lora
    compress   slm compress
    serve      slm generate, serve
    evaluate   slm eval, info, bench, select
    pipeline   slm run, quickstart
    interop    slm export hf|gguf, import hf

Each module imports only typer, rich and `common` at the top; the library behind a command (torch
included) is imported inside its body, so `slm --help` stays fast.
"""
