"""Next-token cross-entropy in fp32 with the official masking rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[..., T]`` from logits ``[..., T, V]`` in fp32."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = F.log_softmax(logits.to(compute), dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(v * m) / max(sum(m), 1e-10)`` over the last axis, as the official loss."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1e-10)
