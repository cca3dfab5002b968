"""The quantized-kernel tests again, in subprocesses, under every lower kernel level this CPU supports.

PyTorch picks its CPU kernels once per process, by `ATEN_CPU_CAPABILITY` (`default`, `avx2`, `avx512`) or else
the best the CPU has. The main suite proves the CPU's own level; this file re-runs the kernel tests under each
level below it, so an AVX2 machine also proves the generic kernels and an AVX-512 machine proves all three (a
kernel fault in one level — torch 2.13's AVX-512 int8 kernel segfaults on some shapes — cannot hide on a
machine of another kind). A level above the CPU's own is never requested: torch would run instructions the CPU
lacks (SIGILL)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LEVELS = ("default", "avx2", "avx512")  # ascending; x86 only
ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ["tests/compress/test_kernel_matrix.py", "tests/compress/test_quantize.py",
                "tests/compress/test_quantize_embeddings.py", "tests/compress/test_int8_kernels.py",
                "tests/compress/test_kernel_choice.py"]


def _native_level() -> str:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().lower()


NATIVE = _native_level()
LOWER = list(LEVELS[:LEVELS.index(NATIVE)]) if NATIVE in LEVELS else []


@pytest.mark.skipif(not LOWER, reason=f"kernel level {NATIVE!r} has no lower x86 level to test")
@pytest.mark.parametrize("level", LOWER or ["none"])
def test_kernel_tests_pass_under_capability(level):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode != -11, f"segmentation fault under ATEN_CPU_CAPABILITY={level}:\n{tail}"
    assert run.returncode == 0, f"kernel tests failed under ATEN_CPU_CAPABILITY={level}:\n{tail}"
    assert " passed" in run.stdout
