"""``benchmarks/prefill_memory.py`` on the tiny preset: one fresh process per setting, the
scoring forward and ``Engine.prefill`` side by side (the numbers mean nothing at this size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prefill_memory.py"


def test_both_paths_and_groups_in_fresh_processes(tmp_path: Path) -> None:
    out = tmp_path / "pm"
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--batch", "2",
                    "--length", "64", "--groups", "all", "1", "--paths", "model", "engine",
                    "--vocab", "256", "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert [(r["path"], r["ttt_group"]) for r in rows] == [
        ("model", "all"), ("model", "1"), ("engine", "all"), ("engine", "1")]
    model_all, model_one, engine_all, engine_one = rows
    # groups give the same loss (float32: to rounding, a matmul may block rows by batch)
    assert model_all["loss"] == pytest.approx(model_one["loss"], rel=1e-6)
    assert engine_all["loss"] == pytest.approx(engine_one["loss"], rel=1e-6)
    assert model_all["state_mib"] == 0 < engine_all["state_mib"] == engine_one["state_mib"]
    assert "--paths model engine" in report["command"]
    assert "| engine | 1 |" in out.with_suffix(".md").read_text()
