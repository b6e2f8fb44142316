"""A whole sequence's sliding-window attention, forward only, through the Triton window pass.

The prefix blocks of an e2e prefill (and every block of one without an outer gradient) attend
over whole sequences with no gradient wanted. Where FlashAttention and cuDNN pad the head width
(80 to 96 at 3b), :func:`tttlm.ops.triton_window_fwd.window_forward` with no cache splits it
(64 + 16) and masks only the window's edge tiles and the diagonal. On one H100 at 3b's shapes
(``benchmarks/results/prefill_targets_3b_h100.md``, ``benchmarks/window_sequence.py``), a
block's attention: 16 x 8K 14.4 -> 13.8 ms (cuDNN causal), 4 x 32K 27.8 -> 24.0 and
1 x 128K 29.7 -> 27.7 (the cuDNN pieces merged by log-sum-exp), in one launch instead of
three plus a reversal and a merge. Its reference is
:func:`tttlm.ops.attention.frozen.window_forward_reference` (dense).
"""

from __future__ import annotations

import math

import torch

from tttlm.ops.attention import frozen
from tttlm.ops.attention._common import common_dtype, common_dtype_of
from tttlm.ops.triton_runtime import triton_available, triton_can_run, triton_interpreting

# Tile-product dtypes the kernel compiles for on a GPU (fp64 runs only under the interpreter).
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def window_sequence_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            window: int | None) -> bool:
    """Whether :func:`window_sequence_attention` takes ``q, k, v [B, T, H, d]``: a sliding
    window (full attention keeps SDPA's kernels: they are the baseline), no autograd graph
    wanted (the pass has no backward), a head width the kernels pad and the Triton pass
    splits (:func:`~tttlm.ops.attention.frozen.flash_pads_head`), rows a 32-bit offset
    reaches, and a CUDA tensor in fp16 or bf16 (after autocast) on a card of compute capability
    8.0 or later, or CPU tensors under Triton's interpreter (tests)."""
    if window is None or not triton_available() or not triton_can_run(q):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False
    if not frozen.flash_pads_head(q.shape[-1]):
        return False
    # The kernel's row offsets inside one sequence and head are 32-bit (row × row stride):
    # at 3b's 2560 a row, sequences past ~800K tokens take the other paths.
    if any(x.shape[1] * x.stride(1) >= 2**31 for x in (q, k, v)):
        return False
    if q.is_cuda:  # (compute capability 8.0 or later, as the chunk kernels: bf16 tile products)
        return (common_dtype_of(q, k, v) in KERNEL_DTYPES
                and torch.cuda.get_device_capability(q.device) >= (8, 0))
    return triton_interpreting()


def window_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              window: int) -> torch.Tensor:
    """``q, k, v [B, T, H, d]``, query ``t`` seeing keys ``(t - window, t]``: the output, in
    the operands' common dtype (autocast's inside an autocast region). Forward only."""
    from tttlm.ops.triton_window_fwd import window_forward

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in common_dtype(q, k, v))
    # a window as long as the sequence is causal attention: no edge tiles to mask
    edge = window if window < q.shape[1] else None
    return window_forward(q, k, v, edge, 1.0 / math.sqrt(q.shape[-1]), sequence=True)[0]
