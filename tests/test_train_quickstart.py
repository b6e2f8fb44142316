"""`tttlm quickstart --size tiny` runs the whole pipeline (train three models, evaluate by
position, write the report) in seconds, on a small prepared corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tttlm.cli import main
from tttlm.data import prepare
from tttlm.eval import bucket_means


def test_quickstart_tiny_end_to_end(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "text"
    src.mkdir()
    for i in range(5):
        (src / f"book{i}.txt").write_text(f"Book {i}. " + "Call me Ishmael. Some years ago. " * 40)
    data = tmp_path / "data"
    prepare([src], data, "bytes", val_docs=2, progress=False)
    out = tmp_path / "qs"

    assert main(["quickstart", "--out", str(out), "--size", "tiny", "--data", str(data),
                 "--threads", "1", "--no-progress"]) == 0

    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    summary = [line for line in printed.splitlines() if "held-out loss" in line]
    assert len(summary) == 3  # the three-line summary: e2e, swa, full
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"e2e", "swa", "full"}
    seq_len = report["settings"]["seq_len"]
    for name, m in report["models"].items():
        curve = np.asarray(m["nll_by_position"])
        assert curve.shape == (seq_len,) and np.isfinite(curve).all(), name
        assert m["eval_loss"] == pytest.approx(curve.mean())
        assert 0 < m["final_train_loss"] < 2 * np.log(258)
        assert (Path(m["run_dir"]) / "final" / "model.safetensors").is_file()
    # Same parameter budget within a few percent (the MLP widths are chosen for it).
    params = [m["params"] for m in report["models"].values()]
    assert max(params) / min(params) < 1.1
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "loss_by_position.png").stat().st_size > 1000
    # The memory panel: a passage read twice, with and without retrieval.
    repeat = report["repeat"]
    assert set(repeat["results"]) == {"e2e", "swa", "full", "e2e + retrieval",
                                      "swa + retrieval"}
    assert repeat["settings"]["distances"] == [16, 32, 64, 128, 256, 512]  # window 32
    for rows in repeat["results"].values():
        assert all(np.isfinite([r["first"], r["second"]]).all() for r in rows.values())
    text = (out / "report.md").read_text()
    assert "## Memory: a passage read twice" in text and "How to read it" in text
    assert (out / "repeat.png").stat().st_size > 1000

    # A rerun repeats the experiment in the same folder: its own runs are replaced (training
    # refuses a folder holding a run unless told to; the quickstart tells it to).
    assert main(["quickstart", "--out", str(out), "--size", "tiny", "--data", str(data),
                 "--threads", "1", "--no-progress", "--steps", "1"]) == 0
    for mode in ("e2e", "swa", "full"):
        lines = (out / "runs" / mode / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1]
    assert json.loads((out / "report.json").read_text())["settings"]["steps"] == 1


def test_bucket_means() -> None:
    assert bucket_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5.0]
