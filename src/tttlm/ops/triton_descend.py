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

:func:`triton_descend_` is the same update written in place where it is finite, for the
buffers of a CUDA graph (:class:`tttlm.model.cuda_graph.ChunkGraph`): a sequence whose update
is not finite is neither read nor written, and a narrower copy of the new weights (the leaves
the next chunk differentiates) is written by the same pass. Its reference is
:func:`tttlm.ttt.inner.descend_` on a CPU.

This module imports Triton at import time; reach it through :mod:`tttlm.ttt.inner`, which
checks availability first.
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


@triton.jit
def _descend_in_place_kernel(W, G, COEF, OK, LOW, n, BLOCK: tl.constexpr,
                             HAS_LOW: tl.constexpr, LOW_BF16: tl.constexpr):
    """``W[b, i] += COEF[b] · G[b, i]`` (one rounding) where ``OK[b]``, and ``LOW[b, i]`` the
    result in LOW's dtype (round to nearest even, as a cast); other sequences untouched."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # (a dropped sequence has no elements: its flag, 0 or 1, scales the bound)
    take = offs < n * tl.load(OK + b).to(tl.int64)
    w = tl.load(W + b * n + offs, mask=take)
    g = tl.load(G + b * n + offs, mask=take).to(w.dtype)
    c = tl.broadcast_to(tl.load(COEF + b), (BLOCK,))
    new = tl.fma(g, c, w)
    tl.store(W + b * n + offs, new, mask=take)
    if LOW_BF16:
        # Round to nearest even by hand, as ATen's cast does (NaN to its quiet NaN): the
        # interpreter's fp32 -> bf16 cast truncates whatever rounding is asked for.
        bits = new.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(new != new, 0x7FC0, bits).to(tl.uint16)
        tl.store(LOW + b * n + offs, bits.to(tl.bfloat16, bitcast=True), mask=take)
    elif HAS_LOW:
        tl.store(LOW + b * n + offs, new.to(LOW.dtype.element_ty), mask=take)


def _factor(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The per-sequence factor as the kernels read it: contiguous, in the weights' dtype."""
    return coef.detach().to(w.dtype).contiguous()


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
    factor = _factor(coef, w)
    _descend_kernel[(triton.cdiv(n, BLOCK), w.shape[0])](w, g, factor, out, n, BLOCK=BLOCK,
                                                          num_warps=8)
    return out


def triton_descend_in_place_can_run(w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor,
                                    low: torch.Tensor | None) -> bool:
    """Whether :func:`triton_descend_` takes these: as :func:`triton_descend_can_run`, and
    ``low`` (if given) of ``w``'s shape, contiguous, on its device, in bf16/fp16/fp32."""
    return (triton_descend_can_run(w, g, coef)
            and (low is None or (low.shape == w.shape and low.is_contiguous()
                                 and low.device == w.device
                                 and low.dtype in (torch.bfloat16, torch.float16,
                                                   torch.float32))))


def triton_descend_(w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, ok: torch.Tensor,
                    low: torch.Tensor | None = None) -> None:
    """``w[b] += coef[b]·g[b]`` in place for the sequences where ``ok [B]`` (bool), and
    ``low[b]`` set to the result in its dtype; see :func:`triton_descend_in_place_can_run`."""
    n = w[0].numel()
    factor = _factor(coef, w)
    flags = ok.to(torch.uint8).contiguous()
    _descend_in_place_kernel[(triton.cdiv(n, BLOCK), w.shape[0])](
        w, g, factor, flags, w if low is None else low, n, BLOCK=BLOCK,
        HAS_LOW=low is not None, LOW_BF16=low is not None and low.dtype == torch.bfloat16,
        num_warps=8)
