"""``benchmarks/recall_latency.py`` on a CPU with the tiny preset: the rows and columns the GPU
report is read by (the timings mean nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_latency.py"
SRC = SCRIPT.parents[1] / "src"


def test_e2e_with_and_without_memory_beside_full_attention(tmp_path: Path) -> None:
    out = tmp_path / "rl"
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--variants", "e2e",
                    "full", "--contexts", "256", "--new-tokens", "6", "--requests", "1",
                    "--device", "cpu", "--profile", "--out", str(out)], check=True,
                   capture_output=True,
                   env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": ""})
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["rag"]) for r in rows] == [
        ("tiny e2e", "off"), ("tiny e2e", "end"), ("tiny full", "off")]
    off, end, full = rows
    assert end["read_tokens"] > off["read_tokens"] == full["read_tokens"] == 96
    assert all(r["new_tokens"] == 6 for r in rows)  # no stop token ends a request early
    for r in rows:
        assert 0 < r["first_token_s"] < r["request_s_median"] and r["decode_ms_per_token"] > 0
    assert full["index_mib"] is None and off["index_mib"] > 0
    # --profile: one more request's first token per row, its operators in OUT_profile.txt
    for r in rows:
        assert r["profile"]["wall_s"] > 0 and r["profile"]["kernel_launches"] == 0  # CPU
    text = Path(f"{out}_profile.txt").read_text()
    assert text.count("## tiny ") == 3 and "-- by self host time" in text
    assert "aten::" in text
    assert end["ratio_vs_off"] == round(end["request_s_median"] / off["request_s_median"], 3)
    assert off["ratio_vs_full"] == round(off["request_s_median"] / full["request_s_median"], 3)
    assert end["decode_vs_full"] == round(end["decode_ms_per_token"]
                                          / full["decode_ms_per_token"], 3)
