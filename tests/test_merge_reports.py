"""benchmarks/merge_reports.py rebuilds the committed variant reports from their per-variant
JSONs byte for byte (their numbers and readings come from the data, not from hand edits), and
refuses inputs of different settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = ROOT / "benchmarks" / "merge_reports.py"
PREFILL = ["e2e", "swa", "full", "hybrid", "ttt_kvb", "gated_deltanet", "mamba2"]
SMALL = ["e2e", "swa", "full", "hybrid", "ttt_kvb"]
NOTE = ("fla 0.6 refuses the gated chunk backward on Hopper under Triton < 3.7.1 (wrong results, "
        "fla issue 640); the device had Triton 3.6.0, so gated_deltanet and mamba2 could not "
        "train there (their prefill and decode ran, forward only)")


def merge(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_reports_are_rebuilt_from_their_inputs(tmp_path: Path) -> None:
    done = merge("prefill", *(str(RESULTS / f"prefill_3b_{v}.json") for v in PREFILL),
                 "--out", str(tmp_path / "prefill_variants_3b"))
    assert done.returncode == 0, done.stderr
    decode = tmp_path / "decode_variants_760m.json"
    shutil.copy(RESULTS / "decode_variants_760m.json", decode)
    done = merge("decode", str(decode), "--out", str(tmp_path / "decode_variants_760m"))
    assert done.returncode == 0, done.stderr
    done = merge("small", *(str(RESULTS / f"variants_small_h200_{v}.json") for v in SMALL),
                 "--missing-note", NOTE, "--out", str(tmp_path / "variants_small_h200"))
    assert done.returncode == 0, done.stderr
    for name in ("prefill_variants_3b.md", "decode_variants_760m.md", "variants_small_h200.md"):
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name


def test_small_refuses_different_settings(tmp_path: Path) -> None:
    report = json.loads((RESULTS / "variants_small_h200_swa.json").read_text())
    report["settings"]["steps"] = 61
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(report))
    done = merge("small", str(RESULTS / "variants_small_h200_e2e.json"), str(odd),
                 "--out", str(tmp_path / "x"))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "steps" in done.stderr
