"""A TTT chunk over its frozen cache through FlashAttention's own sliding window (CUDA).

PyTorch's FlashAttention op takes a local window (``window_size_left``) and aligns a causal
mask at the bottom right when there are fewer queries than keys: exactly a chunk's mask as
:class:`~tttlm.model.cache.ChunkKV` lays its keys out (consecutive positions, the chunk's own
keys last), whether or not a cached key has left the window. One launch forward, one
backward (first order), no mask in memory and no layout change: the op reads ``[B, T, H, d]``
as the blocks produce it. Measured on one H200 at 3b's heads (32 × 80, window 8192, chunks of
1024; ``benchmarks/attention_window.py``): forward and backward of one chunk 1.52 ms against
flex_attention's 2.11 (full cache, one sequence) and 0.91 against SDPA's lower-right causal
bias 1.16 (half-full cache). Not for whole sequences: there the window ran slower than
flex_attention (48 against 40 ms for 128K tokens), and ``auto`` runs them as two cuDNN pieces
(:mod:`tttlm.ops.attention.pieces`).
"""

from __future__ import annotations

import functools

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _has_window() -> bool:
    """Whether this torch's FlashAttention op takes a window (torch 2.6 and later)."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


def flash_window_can_run(q: torch.Tensor) -> bool:
    """CUDA tensors in fp16/bf16 with a head width FlashAttention takes, on a card it runs
    on (compute capability 8.0 or later), a torch whose op has the window, and SDPA's flash
    switch on (``sdpa_kernel`` / ``enable_flash_sdp`` turn this path off too)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in FLASH_DTYPES and d % 8 == 0 and d <= 256
            and _has_window() and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def flash_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          window: int | None) -> torch.Tensor:
    """``q [B, c, H, d]``, the last ``c`` of the ``n`` consecutive positions of ``k, v
    [B, n, H, d]``: query ``i`` sees keys ``j`` with ``0 <= n - c + i - j < window`` (all
    earlier ones for ``None``). One dtype in (the caller casts); first-order differentiable."""
    left = -1 if window is None or window >= k.shape[1] else window - 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
        window_size_left=left, window_size_right=0)[0]
