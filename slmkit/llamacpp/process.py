"""Finding node-llama-cpp and running the node process that holds libllama.

`unavailable()` says why llama.cpp cannot run here (no node, node too old, the npm package not installed), or None.
`LlamaCppProcess` is one node process running `llama_cpp.mjs`, started on its first request and answering one JSON
line per request; `shared_process()` is the one that every `LlamaCpp` without a process of its own uses.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

VERSION = "3.21.1"  # newer releases may not install from the registry here
ENV = "SLMKIT_NODE_LLAMA_CPP"  # names another npm prefix that holds the package
DEFAULT_PREFIX = Path.home() / ".cache" / "slmkit" / "node-llama-cpp"
SCRIPT = Path(__file__).with_name("llama_cpp.mjs")
INSTALL = (f"npm i --prefix {DEFAULT_PREFIX} -E node-llama-cpp@{VERSION} @node-llama-cpp/linux-x64@{VERSION} "
           "--omit=optional")
MIN_NODE = 20


class LlamaCppUnavailable(RuntimeError):
    """node or node-llama-cpp is missing; the message says which and how to install it."""


class LlamaCppError(RuntimeError):
    """llama.cpp (through node-llama-cpp) refused a request or its process ended."""


def prefix() -> Path:
    """The npm prefix that holds node-llama-cpp: $SLMKIT_NODE_LLAMA_CPP, else ~/.cache/slmkit/node-llama-cpp."""
    return Path(os.environ.get(ENV) or DEFAULT_PREFIX)


def entry() -> Path:
    return prefix() / "node_modules" / "node-llama-cpp" / "dist" / "index.js"


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    node = shutil.which("node")
    if node is None:
        return f"node is not installed; running llama.cpp needs node >= {MIN_NODE} and `{INSTALL}`"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False,
                                 timeout=30).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return f"{node} --version did not answer with a version; llama.cpp needs node >= {MIN_NODE}"
    if major < MIN_NODE:
        return f"node {version} is too old for node-llama-cpp {VERSION} (needs >= {MIN_NODE})"
    if not entry().is_file():
        where = f"${ENV}={os.environ[ENV]}" if os.environ.get(ENV) else str(prefix())
        return (f"node-llama-cpp is not installed at {where} (no {entry()}): `{INSTALL}`, "
                f"or set {ENV} to the npm prefix that holds it")
    return None


class LlamaCppProcess:
    """One node process holding libllama. Starting one costs a second or more (node, libllama, its CPU-variant
    probe); it keeps the last model file loaded, so a process per model avoids reloading when several alternate.
    Started on the first request and restarted if it died; `close()` (or leaving a `with` block) ends it."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self.release: str | None = None  # llama.cpp's release tag, once started

    def __enter__(self) -> "LlamaCppProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def _start(self) -> None:
        reason = unavailable()
        if reason:
            raise LlamaCppUnavailable(reason)
        self._stderr.clear()
        self._proc = subprocess.Popen([shutil.which("node"), str(SCRIPT), str(entry())], text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # stderr is drained as it comes, so a chatty libllama cannot fill the pipe and stall the process
        threading.Thread(target=self._drain, args=(self._proc.stderr,), daemon=True).start()
        atexit.register(self._proc.kill)
        self.release = self._reply("starting node-llama-cpp")["release"]

    def _drain(self, stream) -> None:
        for line in stream:
            self._stderr.append(line)

    def call(self, request: dict):
        """Send one request (see llama_cpp.mjs for the operations) and return its result."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._reply(request["model"]["path"])["result"]

    def _reply(self, where: str) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=60)
            raise LlamaCppError(f"llama.cpp (node-llama-cpp) exited with status {self._proc.returncode} on {where}: "
                                f"{''.join(self._stderr)[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise LlamaCppError(f"llama.cpp (node-llama-cpp) on {where}: {reply['error']}")
        return reply


_shared: LlamaCppProcess | None = None


def shared_process() -> LlamaCppProcess:
    """The process every `LlamaCpp` without its own uses (one per Python process)."""
    global _shared
    if _shared is None:
        _shared = LlamaCppProcess()
    return _shared
