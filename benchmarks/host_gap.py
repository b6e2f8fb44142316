"""Where a prefill step's wall time goes beyond its GPU time: the host's side, chunk by chunk.

    PYTHONPATH=src python benchmarks/host_gap.py 131072:1 8192:4 --out results/host_gap_3b

For each case (``tokens:batch``, 3b e2e, compiled blocks, bf16 autocast, the scoring forward
as ``tttlm bench prefill`` runs it) after two warm-up steps, one step is timed with:

* each TTT chunk's host time (from entering ``ttt_chunk`` to leaving it) and its GPU time
  (CUDA events recorded at the same two points);
* the time the host spent waiting in the test-time finiteness check (``FiniteGuard.settle``,
  which reads the previous update's flag once the next chunk's first block is queued);

then the same step again with the check read at the end of the forward only (``no_wait_*``
in the report: the flag is still copied per chunk; only the wait moves), so the cost of the
per-chunk wait is measured, not guessed.

``timeline`` follows one more step phase by phase: the eager chunks (``ttt_chunk``: the chunks
while the caches fill), the chunk graph's making (its first chunk, warm-up and capture) and its
replays (``ChunkGraph.step``), each with its host time, its GPU span and the GPU's idle time
before it (from the end of the span before, or from the step's start), and the idle time after
the last one: where the GPU waits for the host, per phase.

``allocator`` counts, over the timeline's step, the caching allocator's device allocations,
frees and retries (a retry frees the cache: the device synchronises). ``blocking_calls``
profiles one more step (``torch.profiler``, CPU and CUDA, with Python
stacks) and lists the CUDA runtime and driver calls on the host that took longest (a
synchronisation, a free, a copy to the host): where the host waits for the GPU instead of
queueing work, with the ``tttlm`` frames that made each call. CUDA only.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch

from tttlm.bench.prefill import probe_main, scoring_case
from tttlm.model import cuda_graph
from tttlm.model.model import TTTForCausalLM
from tttlm.ttt import finite


class Probe:
    """Host and GPU timestamps around every ``ttt_chunk`` call, and the host's waits."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, float, Any, Any]] = []
        self.wait_s = 0.0

    def install(self, model: TTTForCausalLM) -> None:
        inner = model.ttt_chunk
        settle = finite.FiniteGuard.settle
        probe = self

        def ttt_chunk(*args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_current_stream_capturing():  # (a chunk graph's capture: no events)
                return inner(*args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            out = inner(*args, **kwargs)
            end.record()
            probe.chunks.append((t0, time.perf_counter(), start, end))
            return out

        def timed_settle(guard: finite.FiniteGuard) -> Any:
            t0 = time.perf_counter()
            try:
                return settle(guard)
            finally:
                probe.wait_s += time.perf_counter() - t0

        model.ttt_chunk = ttt_chunk  # type: ignore[method-assign]
        finite.FiniteGuard.settle = timed_settle  # type: ignore[method-assign]
        self._restore = (model, settle)

    def remove(self) -> None:
        model, settle = self._restore
        del model.ttt_chunk
        finite.FiniteGuard.settle = settle  # type: ignore[method-assign]


class Timeline:
    """Host times and CUDA events around the phases of a step: eager chunks, the chunk
    graph's making, its replays."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float, Any, Any]] = []
        self._depth = [0]
        self._restore: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)
        spans, depth = self.spans, self._depth

        def timed(*args: Any, **kwargs: Any) -> Any:
            # Only the outermost phase (a graph's making runs a chunk inside), never inside a
            # capture (events recorded there cannot be timed).
            if depth[0] or torch.cuda.is_current_stream_capturing():
                return inner(*args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            depth[0] += 1
            try:
                t0 = time.perf_counter()
                start.record()
                out = inner(*args, **kwargs)
                end.record()
            finally:
                depth[0] -= 1
            spans.append((label, t0, time.perf_counter(), start, end))
            return out

        self._restore.append((owner, name, inner))
        setattr(owner, name, timed)

    def install(self, model: TTTForCausalLM) -> None:
        self._wrap(model, "ttt_chunk", "eager chunk")
        self._wrap(cuda_graph.ChunkGraph, "__init__", "graph made")
        self._wrap(cuda_graph.ChunkGraph, "step", "graph step")

    def remove(self) -> None:
        for owner, name, inner in reversed(self._restore):
            if isinstance(owner, type):
                setattr(owner, name, inner)
            else:
                delattr(owner, name)  # (the instance attribute hid the method)

    def report(self, begin: Any, finish: Any) -> dict[str, Any]:
        """Per phase: count, host and GPU seconds, GPU idle before; the first spans in order."""
        phases: dict[str, dict[str, float]] = {}
        order = []
        last = begin
        for label, t0, t1, start, end in self.spans:
            idle = last.elapsed_time(start) / 1e3
            gpu = start.elapsed_time(end) / 1e3
            phase = phases.setdefault(label, {"count": 0, "host_s": 0.0, "gpu_s": 0.0,
                                              "idle_before_s": 0.0})
            phase["count"] += 1
            phase["host_s"] += t1 - t0
            phase["gpu_s"] += gpu
            phase["idle_before_s"] += idle
            if len(order) < 16:
                order.append({"phase": label, "host_ms": (t1 - t0) * 1e3, "gpu_ms": gpu * 1e3,
                              "idle_before_ms": idle * 1e3})
            last = end
        return {"phases": phases, "first_spans": order,
                "before_first_s": begin.elapsed_time(self.spans[0][3]) / 1e3 if self.spans
                else None,
                "after_last_s": last.elapsed_time(finish) / 1e3}


def timeline_step(model: TTTForCausalLM, step: Any) -> dict[str, Any]:
    """One step under :class:`Timeline`, its wall time beside."""
    timeline = Timeline()
    timeline.install(model)
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        begin.record()
        wall = step()
        finish.record()
        finish.synchronize()
    finally:
        timeline.remove()
    return {"wall_s": wall, **timeline.report(begin, finish)}


def blocking_calls(step: Any, min_ms: float = 2.0, top: int = 20,
                   runtime: Any = None) -> list[dict[str, Any]]:
    """The ``top`` longest host calls of one ``step`` that ``runtime(name)`` says are CUDA
    runtime or driver calls (default: names starting with ``cuda`` or ``cu``), each at least
    ``min_ms`` long: name, milliseconds, start (ms from the first event), and the innermost
    ``tttlm`` frames of its Python stack."""
    from torch.profiler import ProfilerActivity, profile

    def is_runtime(name: str) -> bool:
        return name.startswith("cu")

    runtime = runtime or is_runtime
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, with_stack=True) as prof:
        step()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    if not events:
        return []
    origin = min(e.time_range.start for e in events)
    # (the Python tracer's function events, e.g. "tttlm/model/model.py(700): run_ttt_chunks")
    python = [e for e in events if "tttlm" in e.name and ".py(" in e.name]
    calls = sorted((e for e in events if runtime(e.name)
                    and (e.time_range.end - e.time_range.start) / 1e3 >= min_ms),
                   key=lambda e: e.time_range.start - e.time_range.end)[:top]
    found = []
    for e in calls:
        start, end = e.time_range.start, e.time_range.end
        around = [f for f in python if f.time_range.start <= start and end <= f.time_range.end]
        around.sort(key=lambda f: -f.time_range.start)  # innermost first
        found.append({"name": e.name, "ms": (end - start) / 1e3,
                      "start_ms": (start - origin) / 1e3,
                      "frames": [f.name for f in around[:8]]})
    return found


def allocator_counts() -> dict[str, int]:
    """The caching allocator's counters that tell a step's device allocations apart from its
    reuse of cached blocks: ``num_alloc_retries`` (an allocation that failed, freed the cache
    and retried: a device-wide synchronisation), ``num_device_alloc`` / ``num_device_free``
    (cudaMalloc / cudaFree calls; a free synchronises too)."""
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc",
                                              "num_device_free", "num_ooms")}


def run_case(case: str, repeats: int) -> dict[str, Any]:
    tokens, batch = (int(x) for x in case.split(":"))
    model, step = scoring_case("3b", tokens, batch, torch.device("cuda"))
    for _ in range(2):
        step()
    result: dict[str, Any] = {"case": case}
    result["wall_s"] = statistics.median(step() for _ in range(repeats))
    probe = Probe()
    probe.install(model)
    try:
        result["probed_wall_s"] = step()
    finally:
        probe.remove()
    host = [t1 - t0 for t0, t1, _, _ in probe.chunks]
    gpu = [s.elapsed_time(e) / 1e3 for _, _, s, e in probe.chunks]
    result.update(chunks=len(host), chunk_host_s=sum(host), chunk_gpu_span_s=sum(gpu),
                  settle_wait_s=probe.wait_s,
                  chunk_host_median_ms=statistics.median(host) * 1e3,
                  chunk_gpu_span_median_ms=statistics.median(gpu) * 1e3)
    # The same steps with the finiteness flag read only at the end (no per-chunk wait).
    settle = finite.FiniteGuard.settle
    pending: list[finite.FiniteGuard] = []

    def later(guard: finite.FiniteGuard) -> Any:
        pending.append(guard)
        return None

    finite.FiniteGuard.settle = later  # type: ignore[method-assign]
    original_watch = finite.FiniteGuard.watch

    def watch(guard: finite.FiniteGuard, *args: Any) -> Any:
        guard._pending = None  # noqa: SLF001 - the experiment drops the per-chunk read
        return original_watch(guard, *args)

    finite.FiniteGuard.watch = watch  # type: ignore[method-assign]
    try:
        step()
        result["no_wait_wall_s"] = statistics.median(step() for _ in range(repeats))
    finally:
        finite.FiniteGuard.settle = settle  # type: ignore[method-assign]
        finite.FiniteGuard.watch = original_watch  # type: ignore[method-assign]
    before = allocator_counts()
    result["timeline"] = timeline_step(model, step)
    result["allocator"] = {k: v - before.get(k, 0) for k, v in allocator_counts().items()}
    result["allocator"]["reserved_gib_peak"] = (
        torch.cuda.memory_stats().get("reserved_bytes.all.peak", 0) / 2**30)
    result["blocking_calls"] = blocking_calls(step)
    result["s_per_1k"] = result["wall_s"] / (tokens * batch / 1024)
    result["no_wait_s_per_1k"] = result["no_wait_wall_s"] / (tokens * batch / 1024)
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return probe_main(argv, __doc__, "host_gap.py", run_case, env_key="environment")


if __name__ == "__main__":
    raise SystemExit(main())
