"""The GPU-only benchmark scripts without a GPU: one line naming the need, exit 2, nothing
written (CI has no GPU; on a GPU the scripts run, and this test is skipped)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("name, args", [
    ("graph_capture", ["131072:1"]),
    ("host_gap", ["131072:1"]),
    ("window_sequence", []),
    ("head_nll", []),
    ("kv_descriptors", []),
])
def test_refuses_without_a_gpu(name: str, args: list[str], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    if name in ("window_sequence", "head_nll"):
        pytest.importorskip("triton")  # (it imports the Triton kernel at its top)
    out = tmp_path / "report"
    assert load_benchmark(name).main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{name}.py: error: needs a CUDA GPU; run it on one"
    assert not list(tmp_path.iterdir())
