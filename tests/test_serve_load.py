"""The serve load test (benchmarks/serve_load.py) runs end to end at a small size and finds
nothing lost: every reply complete, every session's token count right before and after a
restart, with evictions to disk in between."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def test_load_test_runs_and_loses_nothing(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--sessions", "3", "--tokens", "5",
                           "--rounds", "2", "--in-memory", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "serve_load.json").read_text())
    assert report["sessions_lost_or_wrong"] == [] and not report["errors_in_log"]
    assert [r["generated_tokens"] for r in report["rounds"]] == [15, 15]
    assert all(r["latency_p99_s"] >= r["latency_p50_s"] > 0 for r in report["rounds"])
    assert "| 1 | 3 |" in (tmp_path / "serve_load.md").read_text()
