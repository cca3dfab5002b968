"""llama.cpp itself for the parity tests, without compiling it: node-llama-cpp ships llama.cpp's libllama
prebuilt for CPUs (per-microarchitecture ggml-cpu variants, chosen at load), and `llama_cpp_node.mjs` drives
it from a subprocess — tokenize with a file's vocabulary, next-token probabilities, greedy decoding.

Install once, outside the repository (Linux x64: ~11 s, 83 MB on disk, ~66 MB downloaded):

    npm i --prefix ~/.cache/slmkit/node-llama-cpp -E node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1 \\
        --omit=optional

(`--omit=optional` skips the CUDA/Vulkan/ARM builds, ~650 MB; on another platform drop both the explicit
binary package and the flag.) SLMKIT_NODE_LLAMA_CPP names another npm prefix that holds the package. Without
node or the package, tests that use `llama_cpp()` skip and say which is missing, or fail when
SLMKIT_REQUIRE_LLAMA_CPP=1. It runs offline: the prebuilt binaries are used as they are (`build: "never"`,
`skipDownload`). One node process serves the whole session."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

VERSION = "3.21.1"  # newer releases may not install from the registry here
DEFAULT_PREFIX = Path.home() / ".cache" / "slmkit" / "node-llama-cpp"
SCRIPT = Path(__file__).with_name("llama_cpp_node.mjs")
INSTALL = (f"npm i --prefix {DEFAULT_PREFIX} -E node-llama-cpp@{VERSION} @node-llama-cpp/linux-x64@{VERSION} "
           "--omit=optional")


def _entry() -> Path:
    prefix = Path(os.environ.get("SLMKIT_NODE_LLAMA_CPP") or DEFAULT_PREFIX)
    return prefix / "node_modules" / "node-llama-cpp" / "dist" / "index.js"


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    node = shutil.which("node")
    if node is None:
        return f"node is not installed; llama.cpp parity needs node >= 20 and `{INSTALL}`"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 20:
        return f"node {version} is too old for node-llama-cpp {VERSION} (needs >= 20)"
    if not _entry().is_file():
        return f"node-llama-cpp is not installed at {_entry().parents[3]}: `{INSTALL}` (or set SLMKIT_NODE_LLAMA_CPP)"
    return None


class _Node:
    """The node process that holds libllama, shared by every `LlamaCpp` of the test session (starting one costs
    a second or more: node, libllama, its CPU-variant probe); restarted if it died."""

    proc: subprocess.Popen | None = None

    @classmethod
    def call(cls, request: dict):
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen(["node", str(SCRIPT), str(_entry())], text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            atexit.register(cls.proc.kill)
            cls._reply(request)  # the ready line
        cls.proc.stdin.write(json.dumps(request) + "\n")
        cls.proc.stdin.flush()
        return cls._reply(request)["result"]

    @classmethod
    def _reply(cls, request: dict) -> dict:
        where = request["model"]["path"]
        line = cls.proc.stdout.readline()
        if not line:
            cls.proc.wait(timeout=60)
            raise RuntimeError(f"llama.cpp (node-llama-cpp) exited on {where}: {cls.proc.stderr.read()[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp (node-llama-cpp) on {where}: {reply['error']}")
        return reply


class LlamaCpp:
    """One GGUF file in llama.cpp: loaded on the first request and kept while requests name it; every evaluation
    runs on an empty, F32 KV cache."""

    def __init__(self, model: str | Path, *, vocab_only: bool = False, threads: int = 1, context: int = 512):
        path = Path(model).resolve()
        stat = path.stat()
        self.options = {"path": str(path), "vocab_only": vocab_only, "threads": threads, "context": context,
                        "stamp": [stat.st_mtime_ns, stat.st_size]}  # a rewritten file is loaded again

    def _call(self, **task):
        return _Node.call({"model": self.options, **task})

    def tokenize(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        """Token ids of each text, without bos; `special` parses control-token text as those tokens."""
        return self._call(op="tokenize", texts=texts, special=special)

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """`steps` argmax tokens after each prompt (no penalties; end-of-generation tokens do not stop it)."""
        return [self._call(op="greedy", prompt=p, steps=steps) for p in prompts]

    def log_probs(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) log-softmax of llama.cpp's logits after each prefix of `ids` (-inf where float32
        probability underflows)."""
        rows = self._call(op="probs", tokens=ids)
        out = np.full((len(rows), len(rows[0][0])), -np.inf)
        for r, (tokens, probs) in enumerate(rows):
            with np.errstate(divide="ignore"):
                out[r, tokens] = np.log(np.asarray(probs, dtype=np.float64))
        return out


def llama_cpp(model: str | Path, **kwargs) -> LlamaCpp:
    """`LlamaCpp(model)`, or skip the test with the reason llama.cpp is not available (fail instead when
    SLMKIT_REQUIRE_LLAMA_CPP=1, as CI sets it, so that these checks cannot silently stop running)."""
    reason = unavailable()
    if reason and os.environ.get("SLMKIT_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    return LlamaCpp(model, **kwargs)
