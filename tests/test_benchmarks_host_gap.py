"""benchmarks/host_gap.py's census of blocking host calls, on a CPU: the calls a predicate
names, longest first, each with the tttlm frames around it (the script itself runs on a GPU,
where the predicate is CUDA's runtime calls)."""

from __future__ import annotations

import torch

from _helpers import load_benchmark
from tttlm.ops.norm import rms_norm


def test_blocking_calls_names_the_frames_around_each_call() -> None:
    host_gap = load_benchmark("host_gap")
    x = torch.randn(512, 512)

    def step() -> float:
        y = x @ x  # outside tttlm: no frame
        rms_norm(y, torch.ones(512), 1e-6)
        return 0.0

    found = host_gap.blocking_calls(step, min_ms=0.0, runtime=lambda name: name in (
        "aten::mm", "aten::rsqrt"))
    assert {f["name"] for f in found} == {"aten::mm", "aten::rsqrt"}
    assert [f["ms"] for f in found] == sorted((f["ms"] for f in found), reverse=True)
    frames = {f["name"]: f["frames"] for f in found}
    assert frames["aten::mm"] == []
    assert frames["aten::rsqrt"] and "tttlm/ops/norm.py(" in frames["aten::rsqrt"][0]
    assert host_gap.blocking_calls(step, min_ms=1e9) == []
