"""What capturing the steady-state TTT chunk's CUDA graph costs a prefill (CUDA only).

A 3b e2e prefill of one sequence at 128K captures :class:`tttlm.model.cuda_graph.ChunkGraph`
once per run (per forward call) and replays it for every later chunk; the 128K profile of
``benchmarks/results/prefill_targets_3b_h100.md`` (section 6) had the GPU busy 91% of the
step's wall time, and 32K x 4 with forced graphs (two captures a step) ran 12% slower than
without (``prefill_graphs_3b.md``). This measures the capture per case (``tokens:batch``,
3b e2e, compiled blocks, bf16 autocast, the scoring forward as ``tttlm bench prefill`` runs
it, graphs forced on):

* the step's wall time as it runs (median of ``--repeats``);
* one more step with the capture timed, synchronised on entry and exit: the first chunk's
  step that serves as the warm-up, and the capture itself (``torch.cuda.graph`` empties the
  allocator's cache, records the chunk's launches and instantiates the graph);
* the step with graphs off, for the chunk's launched time.

    PYTHONPATH=src python benchmarks/graph_capture.py 131072:1 32768:4 --out OUT/graph_capture_3b
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

from tttlm.bench.prefill import probe_main, scoring_case
from tttlm.model import model as model_module


def _timed_capture(record: list[dict[str, float]]) -> Any:
    """:func:`tttlm.model.cuda_graph.capture`, timing its warm-up and its capture."""
    capture = model_module.capture

    def timed(run: Any, warm: Any, device: torch.device) -> Any:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        marks: dict[str, float] = {}

        def timed_warm() -> None:
            warm()
            torch.cuda.synchronize(device)
            marks["warm"] = time.perf_counter()

        replay = capture(run, timed_warm, device)
        torch.cuda.synchronize(device)
        end = time.perf_counter()
        record.append({"warm_s": marks["warm"] - t0, "capture_s": end - marks["warm"]})
        return replay

    return timed


def run_case(case: str, repeats: int) -> dict[str, Any]:
    tokens, batch = (int(x) for x in case.split(":"))
    model, step = scoring_case("3b", tokens, batch, torch.device("cuda"))
    result: dict[str, Any] = {"case": case,
                              "chunks_per_sequence": tokens // model.config.chunk_size}
    for graphs in (True, False):
        model.graph_chunks = graphs
        for _ in range(2):
            step()
        result[f"wall_s_graphs_{'on' if graphs else 'off'}"] = statistics.median(
            step() for _ in range(repeats))
    model.graph_chunks = True
    record: list[dict[str, float]] = []
    original = model_module.capture
    model_module.capture = _timed_capture(record)  # type: ignore[assignment]
    try:
        result["wall_s_timed_capture"] = step()
    finally:
        model_module.capture = original  # type: ignore[assignment]
    result["captures"] = record
    result["capture_s_per_step"] = sum(r["capture_s"] for r in record)
    result["capture_share_of_step"] = result["capture_s_per_step"] / result["wall_s_graphs_on"]
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return probe_main(argv, __doc__, "graph_capture.py", run_case)


if __name__ == "__main__":
    sys.exit(main())
