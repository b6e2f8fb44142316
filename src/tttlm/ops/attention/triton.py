"""Chunk attention through the Triton kernel of :mod:`tttlm.ops.triton_chunk_attention`
(forward, backward, double backward), imported on first use: Triton is optional."""

from __future__ import annotations

import torch

from tttlm.ops.attention._common import common_dtype

# Tile-product dtypes the kernel compiles for on a GPU (fp64 runs only under the interpreter).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                 frozen_keys: int = 0) -> torch.Tensor:
    """:func:`~tttlm.ops.triton_chunk_attention.triton_chunk_attention` on operands cast to one
    dtype (autocast's, else the promoted one), as the other paths cast them."""
    from tttlm.ops.triton_chunk_attention import triton_chunk_attention

    return triton_chunk_attention(*common_dtype(q, k, v), q_pos, k_pos, window, frozen_keys)
