"""Rotary position embedding in the interleaved-pair layout of the official code.

Pairs ``(x[2i], x[2i+1])`` rotate as complex numbers by ``pos * theta^(-2i/d)``. Angles are
computed as ``float32(pos) * float32(freq)`` (fp64 when the model runs in fp64) so that the
rounding matches the official tables.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[T, head_dim/2]`` for integer ``positions [T]``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=compute)[: head_dim // 2]
    freqs = 1.0 / (theta ** (exponent / head_dim))  # [d/2]
    angles = positions.to(compute)[:, None] * freqs[None, :]  # [T, d/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, H, d]`` by tables ``[T, d/2]``; fp32 math, result in x's dtype.

    One complex multiplication (``(re + i·im)(cos + i·sin)``, the same products and sums as
    the real form): a single contiguous kernel instead of six strided ones on the GPU, and it
    stays differentiable any number of times.
    """
    dtype = x.dtype
    compute = cos.dtype
    pairs = x.to(compute).contiguous().unflatten(-1, (-1, 2))  # [..., T, H, d/2, 2]
    if torch.compiler.is_compiling():
        # Inductor has no complex kernels; it fuses the real form into one kernel anyway.
        re, im = pairs.unbind(-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(dtype)
    rotation = torch.complex(cos, sin)[:, None, :]  # [T, 1, d/2]
    out = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
    return out.flatten(-2).to(dtype)
