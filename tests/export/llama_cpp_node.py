"""llama.cpp for the parity tests: the runner is `slmkit.llamacpp` (node-llama-cpp's prebuilt libllama driven from
a node subprocess; its docstring says how to install it). This module keeps the tests' names for it and adds the
tests' policy: without node or the package, tests that use `llama_cpp()` skip and say which is missing, or fail
when SLMKIT_REQUIRE_LLAMA_CPP=1 (as CI sets it, so that these checks cannot silently stop running). One node
process serves the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slmkit.llamacpp import DEFAULT_PREFIX, INSTALL, SCRIPT, VERSION, LlamaCpp, unavailable  # noqa: F401


def llama_cpp(model: str | Path, **kwargs) -> LlamaCpp:
    """`LlamaCpp(model)`, or skip the test with the reason llama.cpp is not available (fail instead when
    SLMKIT_REQUIRE_LLAMA_CPP=1)."""
    reason = unavailable()
    if reason and os.environ.get("SLMKIT_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    return LlamaCpp(model, **kwargs)
