"""The reference attention: the score matrix materialised, every shape of attention.

Every fast path is tested against these; they are also the CPU paths where nothing faster
exists. Scores and softmax in fp32 (fp64 for fp64 inputs); masked logits are filled with
``-0.7 * finfo.max`` as in the official XLA path. Differentiable any number of times.
"""

from __future__ import annotations

import math

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[Tq, Tk]`` bool: key j visible to query i iff ``0 <= i - j < window`` and ``j >= 0``."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = (diff >= 0) & (k_pos[None, :] >= 0)
    if window is not None:
        allowed &= diff < window
    return allowed


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Reference attention: ``q [B,Tq,H,d]``, ``k, v [B,Tk,H,d]``, ``mask [Tq,Tk]`` bool.

    Scores and softmax in fp32 (fp64 for fp64 inputs); masked logits are filled with
    ``-0.7 * finfo.max`` as in the official XLA path. Differentiable any number of times.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Tq, Tk]
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(compute) * scale
    scores = scores.masked_fill(~mask, -0.7 * torch.finfo(compute).max)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def naive_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: int | None) -> torch.Tensor:
    """Causal (``window`` keys at most) attention over a whole sequence ``[B, T, H, d]``."""
    pos = torch.arange(q.shape[1], device=q.device)
    return naive_attention(q, k, v, window_mask(pos, pos, window))


def naive_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_pos: torch.Tensor, k_pos: torch.Tensor,
                          window: int | None) -> torch.Tensor:
    """A chunk's queries over cached keys plus its own, masked by absolute positions."""
    return naive_attention(q, k, v, window_mask(q_pos, k_pos, window))


def naive_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """``q [B, H, n, d]`` over ``k, v [B, H, C, d]`` with a bool ``mask [B, 1, n, C]``.

    Two batched matmuls: for one query (decoding) they read the cache once with the whole GPU,
    where fused kernels parallelise over queries and leave it idle for n = 1, so the fast
    backends use this path too for single queries.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.mT).to(compute) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, n, C]
    scores = scores.masked_fill(~mask, -0.7 * torch.finfo(compute).max)
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v
