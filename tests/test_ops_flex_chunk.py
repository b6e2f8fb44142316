"""The first-order chunk paths (backend ``first-order``) equal the naive chunk attention:
SDPA with a lower-right causal bias while no key has left the window (values and first-order
gradients, any device); ``flex_attention`` with a block mask once the cache is full (forward
on CPU: flex_attention has no CPU backward; forward and first-order backward on CUDA)."""

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


@pytest.mark.parametrize("c, past, window", [(4, 8, 12), (4, 8, 64), (5, 3, 8), (4, 8, None)])
def test_first_order_backend_takes_sdpa_while_no_key_has_left_the_window(
        c: int, past: int, window: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen chunk whose cache and chunk fit the window: lower-right causal SDPA, equal to
    the naive path in float64, values and the gradients the inner step takes (queries, the
    chunk's own keys and values)."""
    from tttlm.ops.attention import sdpa

    calls: list[int] = []
    original = sdpa.suffix_causal_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(k.shape[1])
        return original(q, k, v)

    monkeypatch.setattr(sdpa, "suffix_causal_attention", spy)
    q, k, v, q_pos, k_pos = case(2, c, past, 3, 8, torch.float64, "cpu")
    results = []
    for name in ("first-order", "naive"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with attention_backend(name):
            out = chunk_attention(*leaves, q_pos, k_pos, window, frozen_keys=past)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, grads[0], grads[1][:, past:], grads[2][:, past:]))
    assert calls == [past + c]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sdpa_path_is_not_taken_past_the_window_or_with_an_outer_gradient(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tttlm.ops.attention import sdpa

    monkeypatch.setattr(sdpa, "suffix_causal_attention", lambda *a: pytest.fail("SDPA path"))
    q, k, v, q_pos, k_pos = case(1, 4, 8, 2, 8, torch.float64, "cpu")
    with attention_backend("first-order"):
        chunk_attention(q, k, v, q_pos, k_pos, 11, frozen_keys=8)  # 12 keys > window 11
        chunk_attention(q, k, v, q_pos, k_pos, 12, frozen_keys=0)  # meta-training's chunks


def test_model_evaluation_with_the_first_order_backend_matches_naive() -> None:
    """The whole scoring forward (no outer gradient) of a tiny model across its window: chunks
    through SDPA while the cache fits, the rest as ``auto``; the same loss as the reference."""
    from _helpers import tiny_model, tokens

    model = tiny_model()
    x, y = tokens(model, 2, 30)  # window 12, chunk 4: caches of 4 and 8 keys, then full ones
    losses = []
    for name in ("first-order", "naive"):
        with attention_backend(name), torch.no_grad():
            losses.append(model(x, labels=y).token_nll)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's flash path needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float32, 2e-3)])
def test_first_order_sdpa_path_matches_naive_with_gradients_on_cuda(
        dtype: torch.dtype, tol: float) -> None:
    """The lower-right causal SDPA path on a GPU (flash for bf16, head dim 80 as the 3b
    preset's), values and the inner step's gradients, against the naive path in fp32."""
    q, k, v, q_pos, k_pos = case(2, 64, 192, 4, 80, torch.float32, "cuda")
    results = []
    for name, cast in (("first-order", dtype), ("naive", torch.float32)):
        leaves = [t.to(cast).requires_grad_(True) for t in (q, k, v)]
        with attention_backend(name):
            out = chunk_attention(*leaves, q_pos, k_pos, 256, frozen_keys=192)
        out.float().square().sum().backward()
        results.append([out.float(), leaves[0].grad.float(),
                        *(t.grad[:, -64:].float() for t in leaves[1:])])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
