"""Registered benchmarks: Triton chunk-attention kernel, prefill, decode, meta-training step.

Each benchmark is a library function returning rows (plain dicts); :func:`write_report` stores
them as JSON + Markdown with the card, torch/Triton/CUDA versions and the command. The
``tttlm bench`` command (:mod:`tttlm.bench.cli`) and ``benchmarks/run.py`` call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.bench.common import environment, write_report
    from tttlm.bench.decode import bench_decode
    from tttlm.bench.kernel import bench_chunk_kernel
    from tttlm.bench.prefill import bench_prefill
    from tttlm.bench.train import bench_train_step

__all__ = ["bench_chunk_kernel", "bench_decode", "bench_prefill", "bench_train_step", "environment",
           "write_report"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "environment": "tttlm.bench.common",
    "write_report": "tttlm.bench.common",
    "bench_decode": "tttlm.bench.decode",
    "bench_chunk_kernel": "tttlm.bench.kernel",
    "bench_prefill": "tttlm.bench.prefill",
    "bench_train_step": "tttlm.bench.train",
})
