"""The inner step's update ``W + coef·g`` of one fast-weight tensor in one Triton pass (GPU).

:func:`tttlm.ttt.inner.descend` is the reference: ``torch.addcmul(w, g, coef[:, None, ...])``
per tensor. With fp32 weights and a bf16 gradient (a prefill under autocast), ATen first
copies the gradient to fp32 (type promotion), then runs a kernel that cannot vectorise its
loads (the per-sequence factor is broadcast): a 3b prefill step at 128K × 1 spent about 450 ms
of an H100's 5 s there (``benchmarks/results/prefill_graphs_3b.md``, section 4). Here one
kernel reads the weights and the gradient once each, in their own dtypes, and writes the new
weights: 10 bytes a parameter instead of 18.

The arithmetic is one fused multiply-add (the gradient widened exactly to the weights' dtype,
times the factor, plus the weights, rounded once), which is how ATen's addcmul computes it on
a CPU: the same bits there (the tests, under the interpreter). On a GPU, ATen's own kernel may
round the product before the sum; the two agree within one rounding.

This module imports Triton at import time; reach it through :func:`tttlm.ttt.inner.descend`,
which checks availability first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _descend_kernel(W, G, COEF, OUT, n, BLOCK: tl.constexpr):
    """``OUT[b, i] = W[b, i] + COEF[b] · G[b, i]`` (one rounding) for ``n`` elements per
    sequence ``b`` (contiguous rows). Grid: (element blocks, sequences)."""
    b = tl.program_id(1).to(tl.int64)  # row offsets of large batches pass 2**31
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(W + b * n + offs, mask=valid)
    g = tl.load(G + b * n + offs, mask=valid).to(w.dtype)
    # (the factor broadcast by hand: older Triton's fma does not broadcast a scalar operand)
    c = tl.broadcast_to(tl.load(COEF + b), (BLOCK,))
    tl.store(OUT + b * n + offs, tl.fma(g, c, w), mask=valid)


def triton_descend_can_run(w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> bool:
    """Whether :func:`triton_descend` takes these: ``w [B, ...]`` fp32, ``g`` of its shape in
    fp32/bf16/fp16, both contiguous on one device, ``coef [B]``, nothing that needs a
    gradient (the update without an outer gradient)."""
    return (w.dtype == torch.float32 and g.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and w.dim() >= 1 and g.shape == w.shape and coef.shape == w.shape[:1]
            and w.is_contiguous() and g.is_contiguous() and w.numel() > 0
            and w.device == g.device == coef.device
            and not (torch.is_grad_enabled()
                     and (w.requires_grad or g.requires_grad or coef.requires_grad)))


def triton_descend(w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``w + coef[b]·g`` per sequence ``b`` (new tensor), as ``torch.addcmul(w, g,
    coef.view(-1, 1, ...))``; see :func:`triton_descend_can_run`."""
    out = torch.empty_like(w)
    n = w[0].numel()
    factor = coef.detach().to(w.dtype).contiguous()
    _descend_kernel[(triton.cdiv(n, BLOCK), w.shape[0])](w, g, factor, out, n, BLOCK=BLOCK,
                                                          num_warps=8)
    return out
