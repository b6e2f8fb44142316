"""``tttlm bench`` runs end to end on a CPU with tiny shapes and writes its reports (the GPU
numbers in benchmarks/results come from the same code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tttlm.cli import main


@pytest.mark.parametrize("args", [
    ["decode", "--presets", "tiny", "--contexts", "128", "512", "--modes", "eager",
     "--steps", "2", "--warmup", "1", "--dtype", "float32"],
    ["prefill", "--preset", "tiny", "--lengths", "128"],
], ids=["decode", "prefill"])
def test_bench_writes_reports(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["bench", *args, "--device", "cpu", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    text = json.dumps(report)
    assert "e2e" in text and "full" in text
    assert "torch" in text and out.with_suffix(".md").read_text().count("|") > 10


def test_graph_mode_needs_a_gpu(tmp_path: Path) -> None:
    assert main(["bench", "decode", "--device", "cpu", "--presets", "tiny", "--modes", "graph",
                 "--out", str(tmp_path / "r")]) == 2
