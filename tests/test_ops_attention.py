"""Whole-sequence attention paths against the naive reference.

CPU: the banded SDPA path (windowed) and causal SDPA. GPU only: the ``flex_attention`` path
with its cached block mask, forward and gradients, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close
from tttlm.ops.attention import attention_backend, sequence_attention

# (B, T, H, d, window, block): window inside, equal to and beyond the sequence; partial blocks;
# d = 80 as the 3b preset.
CASES = {
    "B2-T63-H2-d16-w16-b8": (2, 63, 2, 16, 16, 8),
    "B1-T200-H3-d80-w64-b32": (1, 200, 3, 80, 64, 32),
    "B1-T40-H1-d8-w40-b16": (1, 40, 1, 8, 40, 16),
    "B1-T33-H2-d16-nowin": (1, 33, 2, 16, None, 16),
}


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, block: int,
         backend: str) -> list[torch.Tensor]:
    with attention_backend(backend):
        out = sequence_attention(q, k, v, window, block)
    g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) / out.numel() ** 0.5)
    return [out, *g]


def _inputs(B: int, T: int, H: int, d: int, device: str,
            dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, T, H, d, generator=g).to(device, dtype).requires_grad_(True)
            for _ in range(3)]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_cpu_paths_match_naive(case: tuple) -> None:
    B, T, H, d, window, block = case
    q, k, v = _inputs(B, T, H, d, "cpu", torch.float64)
    for name, a, e in zip(("out", "dq", "dk", "dv"), _run(q, k, v, window, block, "auto"),
                          _run(q, k, v, window, block, "naive")):
        assert_close(a, e, atol=1e-12, name=name)  # fp64: summation order only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_gpu_paths_match_naive(case: tuple, dtype: torch.dtype) -> None:
    B, T, H, d, window, block = case
    q, k, v = _inputs(B, T, H, d, "cuda", dtype)
    ref = _run(*(t.detach().double().requires_grad_(True) for t in (q, k, v)), window, block,
               "naive")
    # fp32: flash/flex kernels use tf32-free fp32 math but another summation order; bf16:
    # operand rounding (1e-3..1e-2).
    tol = 1e-4 if dtype is torch.float32 else 2e-2
    for name, a, e in zip(("out", "dq", "dk", "dv"), _run(q, k, v, window, block, "auto"), ref):
        assert_close(a, e, rel_l2=tol, name=name)
