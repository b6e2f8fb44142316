"""Attention through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU, a fused CPU kernel elsewhere): causal, banded sliding-window, and decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over a whole sequence ``[B, T, H, d]`` (flash on GPU)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def suffix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``q [B, c, H, d]``, the last ``c`` of ``n`` consecutive positions, over all ``k, v
    [B, n, H, d]``: query ``i`` sees keys ``j <= n - c + i`` (causal aligned at the bottom
    right, through SDPA's lower-right causal bias: flash or memory-efficient kernels on a GPU,
    no mask in memory). A TTT chunk over its cache while no key has left the window."""
    from torch.nn.attention.bias import causal_lower_right  # on first use only

    mask = causal_lower_right(q.shape[1], k.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int, block: int) -> torch.Tensor:
    """Sliding-window attention as query blocks of ``block`` rows, each over the
    ``window - 1 + block`` keys that can reach it, through SDPA with a small mask."""
    B, T, H, d = q.shape
    n = -(-T // block)
    pad = n * block - T
    left = window - 1
    span = left + block
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, n, block, H, d)
    # Keys padded with `left` rows in front so block j's keys start at padded row j*block.
    kp = F.pad(k, (0, 0, 0, 0, left, pad))
    vp = F.pad(v, (0, 0, 0, 0, left, pad))
    kb = kp.unfold(1, span, block).permute(0, 1, 4, 2, 3)  # [B, n, span, H, d]
    vb = vp.unfold(1, span, block).permute(0, 1, 4, 2, 3)
    a = torch.arange(block, device=q.device)
    c = torch.arange(span, device=q.device)
    j = torch.arange(n, device=q.device)
    band = (c[None, :] >= a[:, None]) & (c[None, :] <= a[:, None] + left)  # [block, span]
    nonneg = (j[:, None] * block - left + c[None, :]) >= 0  # [n, span]
    mask = band[None] & nonneg[:, None, :]  # [n, block, span]
    mask = mask[None, :, None].expand(B, n, 1, block, span).reshape(B * n, 1, block, span)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B * n, x.shape[2], H, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(qb), heads_first(kb), heads_first(vb),
                                         attn_mask=mask)  # [B*n, H, block, d]
    out = out.transpose(1, 2).reshape(B, n * block, H, d)
    return out[:, :T]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """``q [B, H, n, d]`` over ``k, v [B, H, C, d]`` with a bool ``mask [B, 1, n, C]``; never
    materialises ``[n, C]`` scores (several queries: prefill, the engine's inner step)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
