"""The code base stays clean under the project's one linter (configured in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    # Ruff comes with the `test` extra, in the environment that runs the tests: run it through
    # this interpreter (`python -m ruff`), whether or not that environment's bin/ is on PATH.
    assert importlib.util.find_spec("ruff") is not None, (
        f"ruff is not installed for {sys.executable}; install the test extra: "
        "pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks",
                             "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
