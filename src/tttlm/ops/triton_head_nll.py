"""The inner step's head: from the logits, the NLL and its gradient ``p − Y`` in one Triton
kernel (GPU).

:func:`tttlm.ops.linear_nll.nll_and_dlogits` is the reference: the logits widened to fp32,
their log-sum-exp, the NLL, then ``softmax − one-hot`` in the logits' dtype. Compiled by
Inductor, that work took 0.53 ms for a 3b chunk's 1024 × 128256 bf16 logits on an H100 (67 ms
of a 128K step, ``benchmarks/results/prefill_tiles_groups_3b_h100.md``): a maximum pass, a sum
pass and the gradient's pass, three reads of the logits and one write, at about 60% of the
card's bandwidth. Here one program per row keeps a running maximum and sum per lane (the
online softmax), so the logits are read twice (statistics, then the gradient) and the
gradient written once: 3 × 2 bytes a logit instead of 4 × 2.

The statistics are fp32 over the whole row, summed in another order than ATen's
``logsumexp`` (per lane, then across lanes): the NLL agrees within a few fp32 roundings and the
gradient within one rounding of its dtype (the tests, under the interpreter, and on a GPU).

This module imports Triton at import time; reach it through :mod:`tttlm.ops.linear_nll`, which
checks availability first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits a program reads at once (16 bytes a thread at 8 warps, bf16), and its warps.
BLOCK = 2048
WARPS = 8


@triton.jit
def _nll_dlogits_kernel(Z, LABELS, NLL, DZ, V, sz, sd, BLOCK: tl.constexpr):
    """Row ``r`` of ``Z [n, V]``: ``NLL[r] = lse − Z[r, y]`` and ``DZ[r] = exp(Z[r] − lse) −
    onehot(y)`` (in DZ's dtype). Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)  # (offsets of large blocks pass 2**31)
    z_at = Z + row * sz
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        c = start + cols
        z = tl.load(z_at + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # A lane that has seen no logit yet (a row shorter than BLOCK) keeps -inf; shifting
        # by 0 there makes its terms 0 instead of exp(-inf + inf) = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_use) + tl.exp(z - m_use)
        m = m_new
    big = tl.max(m, 0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), 0))
    label = tl.load(LABELS + row)
    tl.store(NLL + row, lse - tl.load(z_at + label).to(tl.float32))
    d_at = DZ + row * sd
    for start in range(0, V, BLOCK):
        c = start + cols
        z = tl.load(z_at + c, mask=c < V, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        p = tl.where(c == label, p - 1.0, p)
        tl.store(d_at + c, p.to(DZ.dtype.element_ty), mask=c < V)


def nll_dlogits_can_run(z: torch.Tensor, labels: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether :func:`nll_dlogits` takes these: ``z [n, V]`` bf16/fp16/fp32 with contiguous
    rows, ``labels [n]`` on its device, fp32 statistics, nothing that needs a gradient (the
    inner step's head computes its own)."""
    return (z.dim() == 2 and z.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and acc == torch.float32 and z.stride(-1) == 1 and z.shape[0] > 0
            and z.shape[1] > 0 and labels.shape == z.shape[:1] and labels.device == z.device
            and not (torch.is_grad_enabled() and z.requires_grad))


def nll_dlogits(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The NLL ``[n]`` (fp32) and ``∂nll/∂z = softmax(z) − onehot(labels)`` in ``z``'s dtype,
    as :func:`tttlm.ops.linear_nll.nll_and_dlogits`; see :func:`nll_dlogits_can_run`. Labels
    must lie in ``[0, V)``, as ``gather`` requires of the reference."""
    n, V = z.shape
    nll = torch.empty(n, device=z.device, dtype=torch.float32)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format)
    _nll_dlogits_kernel[(n,)](z, labels, nll, dz, V, z.stride(0), dz.stride(0), BLOCK=BLOCK,
                              num_warps=WARPS)
    return nll, dz
