"""`slm`: the command-line face of slmkit. Thin: parse arguments, call the library, print results.

The commands live in `slmkit.commands`, one module per area; this file merges them into one Typer app,
maps user errors to exit code 2 and is the `slm` entry point (`slm = slmkit.cli:main`).
"""

from __future__ import annotations

import sys

import typer

from .commands import align, compress, data, evaluate, interop, pipeline, serve, train
from .commands.common import err_console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="slmkit: small language models for one domain, trained, measured and served on your machine.")
for _area in (data, train, align, compress, serve, evaluate, pipeline, interop):  # the order of `slm --help`
    app.add_typer(_area.app)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is meant for the user: `main` prints it without a traceback and exits
    with code 2 (as it does any ValueError). A module with its own error type that is no ValueError adds it here."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .model import ConfigError
    from .compress.base import PassError
    from .train import TrainConfigError

    errors: list[type[BaseException]] = [CheckpointError, DataError, ConfigError, TrainConfigError, PassError,
                                         FileNotFoundError]
    try:
        from .export import GGUFExportError, HFExportError

        errors += [HFExportError, GGUFExportError]
    except ImportError:
        pass
    try:
        from .align.lora import LoRAError
        from .align.preference_losses import PreferenceLossError
        from .align.reference_cache import ReferenceCacheError

        errors += [LoRAError, PreferenceLossError, ReferenceCacheError]
    except ImportError:
        pass
    try:
        from .align.chat import ChatTemplateError
        from .align.json_schema import SchemaError
        from .align.verifiers import VerifierError

        errors += [ChatTemplateError, SchemaError, VerifierError]
    except ImportError:
        pass
    from .evaluate.pareto import BudgetError
    from .evaluate.tasks import TaskError
    from .pipeline.recipe import RecipeError

    errors += [TaskError, BudgetError, RecipeError]
    return tuple(errors)


def main() -> None:
    import os

    debug = bool(os.environ.get("SLM_DEBUG"))  # full tracebacks for bug reports
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # the user-error types are looked up only now: importing them imports torch
        if debug or not isinstance(e, (*_user_errors(), ValueError)):
            raise
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
