"""Timing, environment records and report writing shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tttlm.devices import describe_device
from tttlm.files import atomic_write_text
from tttlm.ops.triton_runtime import triton_version

# Dense bf16 tensor-core peak of the cards we report on (datasheet, without sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def environment(device: torch.device) -> dict[str, Any]:
    """Card, software versions and the command line: what makes a number reproducible; and
    the host and the card's clocks, power and temperature when this is called (after a
    bench's runs: under load; before them: idle), which tell two machines of one kind apart
    (a TTT step's many short kernels feel both)."""
    cuda = device.type == "cuda"
    env = {"device": describe_device(device),
           "torch": torch.__version__, "triton": triton_version(),
           "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "host": host_info(), "settings": switches()}
    if cuda:
        env["gpu_state"] = gpu_state(device)
    return env


# Environment variables that change what a run computes or how fast: the project's own
# (``TTTLM_CACHE_SWAP``, ...) and PyTorch's and Inductor's (a tuning switch, the allocator).
SWITCH_PREFIXES = ("TTTLM_", "TORCHINDUCTOR_", "PYTORCH_", "TORCH_", "CUDA_LAUNCH_BLOCKING")


def switches() -> dict[str, str]:
    """The ``SWITCH_PREFIXES`` variables set in this process, by name."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SWITCH_PREFIXES)}


def host_info() -> dict[str, Any]:
    """The CPU model (from ``/proc/cpuinfo`` where there is one) and its logical cores."""
    model = platform.processor() or None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count()}


# What nvidia-smi reports of a card's state: SM clock now and at most, power now and its cap,
# temperature (fields every driver since 2015 knows: an unknown one fails the whole query).
GPU_STATE_FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit",
                    "temperature.gpu", "driver_version")


def gpu_state(device: torch.device) -> dict[str, str] | None:
    """``GPU_STATE_FIELDS`` of ``device``'s card from ``nvidia-smi``, or ``None`` where it is
    missing, fails or the card cannot be told among several: a record, never a failure."""
    try:
        props = torch.cuda.get_device_properties(device)
        got = subprocess.run(
            ["nvidia-smi", f"--query-gpu=pci.bus_id,{','.join(GPU_STATE_FIELDS)}",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError):
        return None
    return pick_gpu_row(got, getattr(props, "pci_bus_id", None))


def _pci_bus(bus_id: str) -> int | None:
    """The bus of ``"00000000:18:00.0"`` (domain, bus, device.function, in hex), or ``None``."""
    parts = bus_id.split(":")
    try:
        return int(parts[1], 16) if len(parts) == 3 else None
    except ValueError:
        return None


def pick_gpu_row(text: str, bus: int | None) -> dict[str, str] | None:
    """The row of ``nvidia-smi --query-gpu=pci.bus_id,GPU_STATE_FIELDS`` output for the card
    on PCI bus ``bus`` (the only row where there is one and no bus is known), as a dict."""
    rows = [[v.strip() for v in line.split(",")] for line in text.strip().splitlines()]
    rows = [r for r in rows if len(r) == len(GPU_STATE_FIELDS) + 1]
    if bus is not None:
        rows = [r for r in rows if _pci_bus(r[0]) == bus]
    if len(rows) != 1:
        return None
    return dict(zip(GPU_STATE_FIELDS, rows[0][1:], strict=True))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int,
              warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def cuda_event_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median GPU seconds of ``repeats`` calls of ``fn`` after ``warmup``, from CUDA events
    around each call (kernel time and the gaps between its launches, without the host's
    time before the first one)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(out: Path, title: str, env: dict[str, Any], rows: list[dict[str, Any]],
                 columns: Sequence[str], notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``<out>.json`` (everything) and ``<out>.md`` (a table of ``columns``), each
    through a temporary file, so that an interrupted run never leaves a half-written report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    atomic_write_text(json_path, json.dumps({"title": title, "env": env, "rows": rows,
                                             "notes": list(notes)}, indent=2) + "\n")
    lines = [f"# {title}", "", *(f"- {k}: `{v}`" for k, v in env.items()), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    for note in notes:
        lines += ["", note]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
