"""Suffix chunk attention: naive (materialised scores, autograd) vs the Triton kernel.

The TTT blocks' attention of ``chunk`` queries over ``window + chunk`` keys, timed as the outer
training step uses it: forward, backward with ``create_graph`` (the inner gradient), and the
backward of that backward (the outer gradient through the inner step).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from tttlm.bench.common import median, peak_memory_gib, reset_peak_memory, time_call
from tttlm.ops.attention import naive_attention, window_mask

PHASES = ("fwd", "fwd+bwd", "fwd+bwd+dbl")
# "triton-all-tiles": the Triton kernels running every tile, as before they skipped the tiles
# the window and causal masks cover wholly (the same results bit for bit).
BACKENDS = ("naive", "triton", "triton-all-tiles")


def _attention_fns(q_pos: torch.Tensor, k_pos: torch.Tensor,
                   window: int) -> dict[str, Callable[..., torch.Tensor]]:
    from tttlm.ops.triton_chunk_attention import triton_chunk_attention

    mask = window_mask(q_pos, k_pos, window)
    triton = functools.partial(triton_chunk_attention, q_pos=q_pos, k_pos=k_pos, window=window)
    return {"naive": lambda q, k, v: naive_attention(q, k, v, mask),
            "triton": triton, "triton-all-tiles": triton}


def _tiles(backend: str) -> contextlib.AbstractContextManager[None]:
    """Whether the Triton kernels skip wholly masked tiles while ``backend`` runs (for the
    whole phase: its backward launches happen after the forward call returns)."""
    if not backend.startswith("triton"):
        return contextlib.nullcontext()
    from tttlm.ops.triton_chunk_attention import skip_masked_tiles

    return skip_masked_tiles(backend != "triton-all-tiles")


def _step(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], do: torch.Tensor,
          w: list[torch.Tensor], phase: str) -> list[torch.Tensor]:
    """One phase of work; returns the output and whatever gradients it produced."""
    q, k, v = inputs
    out = fn(q, k, v)
    if phase == "fwd":
        return [out]
    grads = torch.autograd.grad(out, inputs, do, create_graph=phase != "fwd+bwd")
    if phase == "fwd+bwd":
        return [out, *grads]
    second = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, w)), [*inputs, do])
    return [out, *grads, *second]


def bench_chunk_kernel(device: torch.device, window: int = 8192, chunk: int = 1024,
                       heads: int = 12, head_dim: int = 64, batch: int = 1,
                       dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                       backends: tuple[str, ...] = BACKENDS) -> list[dict[str, Any]]:
    """Time every phase of both paths with a full cache (the steady state of long sequences)
    and report their relative-L2 errors against the naive path in fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    keys = window + chunk
    start = window  # the chunk sits after a full cache: every query sees `window` keys
    q_pos = torch.arange(start, start + chunk, device=device)
    k_pos = torch.arange(start - window, start + chunk, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    base = [rand(batch, chunk, heads, head_dim), rand(batch, keys, heads, head_dim),
            rand(batch, keys, heads, head_dim)]
    do32, w32 = rand(batch, chunk, heads, head_dim), [torch.randn_like(t) for t in base]
    fns = _attention_fns(q_pos, k_pos, window)

    def prepared(dt: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        inputs = [t.to(dt).requires_grad_(True) for t in base]
        return inputs, do32.to(dt).requires_grad_(True), [t.to(dt) for t in w32]

    reference = [t.float() for t in _step(fns["naive"], *prepared(torch.float32), PHASES[-1])]
    names = ["out", "dq", "dk", "dv", "q2", "k2", "v2", "do2"]
    rows: list[dict[str, Any]] = []
    shape = dict(batch=batch, heads=heads, head_dim=head_dim, window=window, chunk=chunk,
                 dtype=str(dtype).removeprefix("torch."))
    for backend in backends:
        inputs, do, w = prepared(dtype)
        for phase in PHASES:
            reset_peak_memory(device)
            try:
                with _tiles(backend):
                    times = time_call(functools.partial(_step, fns[backend], inputs, do, w,
                                                        phase), device, repeats, warmup=2)
            except torch.OutOfMemoryError:
                rows.append({**shape, "backend": backend, "phase": phase, "error": "OOM"})
                continue
            rows.append({**shape, "backend": backend, "phase": phase,
                         "ms_median": 1e3 * median(times), "peak_gib": peak_memory_gib(device)})
        with _tiles(backend):
            result = [t.detach() for t in _step(fns[backend], inputs, do, w, PHASES[-1])]
        rows[-1]["rel_l2_vs_fp32_naive"] = {
            n: float((a.float() - e).norm() / e.norm()) for n, a, e in zip(names, result,
                                                                           reference)}
    by = {(r["backend"], r["phase"]): r.get("ms_median") for r in rows}
    for r in rows:
        naive_ms = by.get(("naive", r["phase"]))
        if r["backend"] != "naive" and naive_ms and r.get("ms_median"):
            r["speedup_vs_naive"] = naive_ms / r["ms_median"]
    return rows
