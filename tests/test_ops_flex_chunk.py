"""The first-order chunk path (``flex_attention`` with a block mask, backend ``first-order``)
equals the naive chunk attention: forward on CPU (flex_attention has no CPU backward), forward
and first-order backward on CUDA."""

from __future__ import annotations

import pytest
import torch

from tttlm.ops.attention import attention_backend, chunk_attention
from tttlm.ops.attention.flex import flex_chunk_allowed, flex_chunk_attention
from tttlm.ops.attention.naive import naive_chunk_attention


def case(B: int, c: int, past: int, H: int, d: int, dtype: torch.dtype, device: str,
         seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, c, H, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, past + c, H, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, past + c, H, d, generator=g, dtype=dtype).to(device)
    start = 3 * past + 5  # any absolute start: only relative positions matter
    q_pos = torch.arange(start, start + c, device=device)
    k_pos = torch.arange(start - past, start + c, device=device)
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("c, past, window", [(4, 8, 8), (8, 16, 16), (5, 7, 7), (4, 8, 12)])
def test_flex_chunk_forward_matches_naive_on_cpu(c: int, past: int, window: int) -> None:
    q, k, v, q_pos, k_pos = case(2, c, past, 2, 16, torch.float64, "cpu")
    got = flex_chunk_attention(q, k, v, window)
    want = naive_chunk_attention(q, k, v, q_pos, k_pos, window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_only_full_caches_take_the_flex_path() -> None:
    q, k, _, _, _ = case(1, 4, 8, 2, 16, torch.float32, "cpu")
    assert flex_chunk_allowed(q, k, 8)
    assert not flex_chunk_allowed(q, k, 16)  # cache shorter than the window: early chunks
    assert not flex_chunk_allowed(q, k, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward is CUDA-only")
def test_first_order_backend_matches_naive_with_gradients_on_cuda() -> None:
    q, k, v, q_pos, k_pos = case(2, 64, 128, 4, 64, torch.float32, "cuda")
    grads = []
    for name in ("first-order", "naive"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with attention_backend(name):
            out = chunk_attention(*leaves, q_pos, k_pos, 128, frozen_keys=128)
        out.square().sum().backward()
        grads.append((out.detach(), *(t.grad[:, -64:] if i else t.grad
                                      for i, t in enumerate(leaves))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
