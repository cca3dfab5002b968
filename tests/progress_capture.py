"""What progress a command or library call shows: `run_slm` runs `slm` in this process with its two consoles
captured (stderr a terminal or a pipe); `record_bars` is a progress hook that keeps each bar's total and units."""

import io
import sys

import pytest
from rich.console import Console


def run_slm(monkeypatch, *args, terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of `slm ARGS`; `terminal` makes stderr a terminal (progress bars drawn) or not."""
    from slmkit.cli import main

    out = Console(file=io.StringIO(), width=160)
    err = Console(file=io.StringIO(), width=160, force_terminal=terminal, force_interactive=terminal)
    for name, module in list(sys.modules.items()):
        if name == "slmkit.cli" or name.startswith("slmkit.commands."):
            for attr, console in (("out_console", out), ("err_console", err)):
                if hasattr(module, attr):
                    monkeypatch.setattr(module, attr, console)
    monkeypatch.setattr(sys, "argv", ["slm", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    assert not e.value.code, err.file.getvalue()
    return out.file.getvalue(), err.file.getvalue()


def record_bars() -> tuple[dict[str, list[int]], object]:
    """({description: [total, units done]}, hook): a progress hook (`slmkit.evaluate.suite.ProgressHook`) that
    records every bar it is asked for; a description asked for twice fails."""
    bars: dict[str, list[int]] = {}

    def hook(description, total):
        assert description not in bars, description
        bars[description] = [total, 0]

        def advance(n):
            bars[description][1] += n
        return advance
    return bars, hook
