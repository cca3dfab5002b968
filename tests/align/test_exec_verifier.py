"""python-exec: completions are run in a sandbox process and judged by doctest examples or by the standard
library's own implementation; nothing a completion does reaches the caller."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from align_helpers import tiny_ckpt  # noqa: F401 - fixture

from slmkit.align.exec_verifier import find_reference, prepare_references, reference_of
from slmkit.align.verifiers import VERIFIERS, VerifierError, build_verifier

AREA = ('def area(w, h):\n    """Area of a w x h rectangle.\n\n    >>> area(2, 3)\n    6\n    >>> area(0, 5)\n'
        '    0\n    """')
MARKER = Path("/tmp/slmkit-exec-verifier-test-marker")

BAD = {  # completion -> a part of the reason it fails with
    "return x": ("\n    return w\n", "area(2, 3): expected 6, got 2"),
    "pass": ("\n    pass\n", "expected 6, got nothing"),
    "wrong answer": ("\n    return w + h\n", "expected 6, got 5"),
    "syntax error": ("\n    return (w * h\n", "does not parse: SyntaxError"),
    "infinite loop": ("\n    while True:\n        pass\n", "ran out of time"),
    "timeout swallowed": (("\n    while True:\n        try:\n            while True:\n                pass\n"
                           "        except BaseException:\n            pass\n"), "time"),
    "exception": ("\n    raise ValueError('no area')\n", "raised ValueError: no area"),
    "huge memory": ("\n    block = bytearray(1 << 40)\n    return w * h\n", "MemoryError"),
    "os._exit": ("\n    import os; os._exit(3)\n", "exited with code 3"),
    "fork bomb": ("\n    import os\n    while True:\n        os.fork()\n", "os.fork is not allowed"),
    "os.system": (f"\n    import os\n    os.system('touch {MARKER}')\n    return w * h\n", "os.system is not allowed"),
    "write outside": (f"\n    open('{MARKER}', 'w').write('x')\n    return w * h\n", "outside the sandbox directory"),
    "kill the caller": ("\n    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n", "os.kill is not allowed"),
    "network": ("\n    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", "network access"),
    "output spam": (("\n    import os\n    for _ in range(100000):\n        print('x' * 1000)\n"
                     "        os.write(1, b'y' * 1000)\n        os.write(2, b'z' * 1000)\n    return w * h\n"),
                    "File too large"),
    "sys.exit": ("\n    import sys; sys.exit(0)\n", "SystemExit"),
}


def test_registered_with_options():
    assert "python-exec" in VERIFIERS
    v = build_verifier("python-exec:timeout=0.5,memory_mb=256,reference=false")
    assert (v.timeout, v.memory_mb, v.reference) == (0.5, 256, False)
    with pytest.raises(VerifierError, match="timeout"):
        build_verifier("python-exec:timeout=0")


def test_doctest_examples_judge_and_nothing_reaches_the_caller():
    """Every bad completion fails with its reason in one batch; the good ones around them pass, including
    the one after the completion that ended the sandbox process; the caller's files are untouched."""
    MARKER.unlink(missing_ok=True)
    completions = ["\n    return w * h\n", *(c for c, _ in BAD.values()), "\n    return h * w\n"]
    verdicts = build_verifier("python-exec").score_batch([AREA] * len(completions), completions)
    assert verdicts[0].passed and verdicts[0].reason == "2 of 2 examples pass" and verdicts[0].score == 1.0
    assert verdicts[-1].passed
    for (name, (_, reason)), v in zip(BAD.items(), verdicts[1:-1]):
        assert not v.passed and reason in v.reason, (name, v.reason)
    assert verdicts[1].score == 0.5  # `return w` passes area(0, 5)
    assert not MARKER.exists() and os.getpid() > 0


def test_stuck_in_c_code_is_killed_by_the_watchdog():
    v = build_verifier("python-exec:grace=1,timeout=0.5")
    r = v(AREA, "\n    return sum(range(10 ** 14))\n")
    assert not r.passed and "no progress" in r.reason


def test_doctest_sees_the_whole_prompt_and_a_prompt_without_examples_says_so():
    prompt = 'import math\n\n\ndef hyp(a, b):\n    """Hypotenuse.\n\n    >>> hyp(3, 4)\n    5.0\n    """'
    assert build_verifier("python-exec")(prompt, "\n    return math.hypot(a, b)\n").passed
    r = build_verifier("python-exec")('def double(x):\n    """Twice x."""', "\n    return 2 * x\n")
    assert not r.passed and "no >>> examples" in r.reason and "not a standard-library function" in r.reason


def _stdlib_task(doc_id: str, qualname: str):
    from slmkit.align.exec_verifier import _file_tasks

    return next(t for t in _file_tasks(doc_id) if t.name == qualname)


SET_ENCODING = ("stdlib/xml/sax/xmlreader.py", "InputSource.setEncoding")


@pytest.mark.parametrize("body, passed, reason", [
    (None, True, "behaves like the reference on"),
    ("\n    pass\n", False, "left self as"),
    ("\n    return encoding\n", False, "returned"),
    ("\n    self.encoding = encoding\n", False, "left self as"),  # a public attribute, not the private one
    ("\n    self.setEncoding(encoding)\n", False, "RecursionError"),  # recursion reaches the completion
    ("\n    super().setEncoding(encoding)\n", False, "AttributeError"),  # super() resolves past the real class
])
def test_a_standard_library_method_is_judged_by_its_real_implementation(body, passed, reason):
    task = _stdlib_task(*SET_ENCODING)
    ref, why = find_reference(task.prompt)
    assert ref is not None and ref.task_id == task.id, why
    r = build_verifier("python-exec")(task.prompt, task.body if body is None else body)
    assert r.passed is passed and reason in r.reason, r.reason


def test_references_that_cannot_judge_are_refused_with_the_reason():
    constant = reference_of(_stdlib_task("stdlib/xml/sax/xmlreader.py", "Locator.getSystemId"))  # return None
    works = reference_of(_stdlib_task(*SET_ENCODING))
    verdicts = prepare_references([constant, works], timeout=1.0, memory_mb=1024)
    assert not verdicts[0]["decidable"] and "trivial body `pass`" in verdicts[0]["reason"]
    assert verdicts[1]["decidable"] and verdicts[1]["cases"] >= 3
    r = build_verifier("python-exec")(constant.prompt, constant.body)
    assert not r.passed and "cannot judge" in r.reason
    ref, why = find_reference("def getregentry():")  # every codec module has one, with its own name
    assert ref is None and "differ" in why


def test_pairs_prefer_the_completion_that_behaves(tiny_ckpt, tmp_path):  # noqa: F811 - the fixture
    """A pair from python-exec verdicts, and `slm pairs --verifier python-exec` end to end on default prompts."""
    import subprocess
    import sys

    from slmkit.align.pairs import select_pair

    task = _stdlib_task(*SET_ENCODING)
    texts = ["\n    return encoding\n", task.body, "\n    pass\n"]
    verdicts = build_verifier("python-exec").score_batch([task.prompt] * 3, texts)
    assert select_pair(verdicts, texts, graded=False, margin=0.0) == (1, 0)
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "pairs", str(tiny_ckpt), "--prompts", "default",
                        "--verifier", "python-exec", "-k", "2", "-n", "4", "--limit", "2", "--out",
                        str(tmp_path / "p.jsonl")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, check=False)
    assert r.returncode == 0, r.stderr
    assert "from 2 prompts x 2 samples" in r.stdout
