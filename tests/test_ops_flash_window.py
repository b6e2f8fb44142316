"""The FlashAttention window path of frozen TTT chunks (``ops/attention/flash.py``) equals the
naive chunk attention: values and first-order gradients, caches that fit the window and full
ones, in bf16 at the 3b preset's head width (CUDA only: FlashAttention has no CPU kernel);
elsewhere the first-order paths before it are taken."""

from __future__ import annotations

import pytest
import torch

from tttlm.ops.attention import attention_backend, chunk_attention, flash
from tttlm.ops.attention.naive import naive_chunk_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs a GPU")


def case(B: int, c: int, past: int, H: int, d: int, device: str
         ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, d, generator=g).to(device)
               for n in (c, past + c, past + c))
    start = 2 * past + 3  # only relative positions matter
    return (q, k, v, torch.arange(start, start + c, device=device),
            torch.arange(start - past, start + c, device=device))


def test_flash_window_is_not_taken_off_cuda_or_in_fp32() -> None:
    q = torch.zeros(1, 4, 2, 80)
    assert not flash.flash_window_can_run(q)
    assert not flash.flash_window_can_run(q.bfloat16())


@cuda
@pytest.mark.parametrize("past, window", [(192, 256), (256, 256), (256, 160), (64, None)])
def test_flash_window_matches_naive_with_gradients(past: int, window: int | None) -> None:
    """bf16 through ``auto`` (which takes the flash window for frozen chunks) against naive in
    fp32: the output and the gradients the inner step takes (queries, the chunk's keys and
    values); the cache full (past == window), partly out of the window, and fitting it."""
    c = 64
    q, k, v, q_pos, k_pos = case(2, c, past, 4, 80, "cuda")
    assert flash.flash_window_can_run(q.bfloat16())
    results = []
    for name, dtype in (("auto", torch.bfloat16), ("naive", torch.float32)):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with attention_backend(name):
            out = chunk_attention(*leaves, q_pos, k_pos, window, frozen_keys=past)
        out.float().square().sum().backward()
        results.append([out.float(), leaves[0].grad.float(),
                        *(t.grad[:, -c:].float() for t in leaves[1:])])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@cuda
def test_frozen_bf16_chunks_take_the_flash_window(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int | None] = []
    original = flash.flash_chunk_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            window: int | None) -> torch.Tensor:
        calls.append(window)
        return original(q, k, v, window)

    monkeypatch.setattr(flash, "flash_chunk_attention", spy)
    q, k, v, q_pos, k_pos = (t.bfloat16() if t.is_floating_point() else t
                             for t in case(1, 32, 64, 2, 64, "cuda"))
    with attention_backend("auto"):
        chunk_attention(q, k, v, q_pos, k_pos, 64, frozen_keys=64)
        chunk_attention(q, k, v, q_pos, k_pos, 64, frozen_keys=0)  # meta-training: Triton
    assert calls == [64]
    want = naive_chunk_attention(q.float(), k.float(), v.float(), q_pos, k_pos, 64)
    torch.testing.assert_close(original(q, k, v, 64).float(), want, rtol=3e-2, atol=3e-2)
