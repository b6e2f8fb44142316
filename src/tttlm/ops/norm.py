"""RMSNorm in fp32, as the official code computes it."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x²) + eps)`` computed in fp32 (or fp64), cast back to x's dtype."""
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(compute) * y).to(dtype)
