"""The README opens with exactly two commands; the first runs as written, CI runs the second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _opening_commands() -> list[str]:
    intro = (ROOT / "README.md").read_text().split("\n## ", 1)[0]  # before the first section
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", intro, re.S)]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    demo, tests = _opening_commands()
    assert "moemesh demo" in demo
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_command_runs_as_written():
    demo, _ = _opening_commands()
    result = subprocess.run(["bash", "-c", demo], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The demo exits non-zero when the mesh differs from the single-process reference.
    assert "max |mesh - single-process dense reference|" in result.stdout
