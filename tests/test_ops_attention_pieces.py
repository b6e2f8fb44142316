"""Sliding-window attention from SDPA pieces merged by log-sum-exp (``ops/attention/pieces.py``)
against the naive reference — whole sequences (forward) and TTT chunks over a full, frozen cache
(with the first-order backward) — and the ``pieces`` backend that uses them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _helpers import assert_close, tiny_model, tokens
from tttlm.ops.attention import attention_backend, naive_attention, window_mask
from tttlm.ops.attention.pieces import pieces_can_run, window_attention_pieces

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _qkv(B: int, T: int, H: int, d: int, dtype: torch.dtype, device: str,
         seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=g, dtype=torch.float64).to(device, dtype)
                 for _ in range(3))


# (B, T, H, d, window, block): whole blocks, a shorter last block, a block of one, a sequence
# one past the window, several sequences.
# Blocks as long as the window (two pieces, no M): whole ones, a shorter last one.
CASES = [(2, 37, 3, 8, 12, 4), (1, 64, 2, 16, 16, 8), (2, 50, 1, 8, 12, 3),
         (1, 25, 2, 8, 8, 4), (1, 13, 1, 8, 12, 6), (2, 48, 2, 8, 12, 12),
         (1, 41, 3, 8, 8, 8), (1, 9, 1, 8, 8, 8)]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_pieces_equal_naive_float64(case: tuple[int, ...]) -> None:
    B, T, H, d, window, block = case
    q, k, v = _qkv(B, T, H, d, torch.float64, "cpu", seed=T)
    pos = torch.arange(T)
    assert pieces_can_run(q, window, block)
    got = window_attention_pieces(q, k, v, window, block)
    assert_close(got, naive_attention(q, k, v, window_mask(pos, pos, window)), atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [16, 32])
def test_pieces_in_bf16_err_like_naive_bf16(device: str, block: int) -> None:
    """bf16 (what a GPU prefill runs, through cuDNN where it is): no further from fp32 naive
    than naive bf16 is, with a margin (the merge rounds the pieces' outputs once more); head
    width 80, as the 3b preset; blocks shorter than the window and as long as it."""
    q, k, v = _qkv(1, 96, 4, 80, torch.bfloat16, device, seed=5)
    pos = torch.arange(96, device=device)
    mask = window_mask(pos, pos, 32)
    ref = naive_attention(q.float(), k.float(), v.float(), mask)
    got = window_attention_pieces(q, k, v, 32, block)
    base = naive_attention(q, k, v, mask)
    err = float((got.float() - ref).norm() / ref.norm())
    assert got.dtype == torch.bfloat16
    assert err <= 2 * float((base.float() - ref).norm() / ref.norm()) + 1e-3


def test_when_the_pieces_apply() -> None:
    q = torch.zeros(1, 40, 2, 8)
    assert pieces_can_run(q, 16, 8)
    assert not pieces_can_run(q, None, 8)  # no window
    assert not pieces_can_run(q, 40, 8)  # the sequence fits the window
    assert pieces_can_run(q, 16, 16)  # a block as long as the window: two pieces
    assert not pieces_can_run(q, 16, 32)  # a block longer than the window
    assert not pieces_can_run(q, 16, 6)  # the window not a multiple of the block
    with torch.enable_grad():
        assert not pieces_can_run(q.requires_grad_(True), 16, 8)  # a gradient is wanted


@pytest.mark.parametrize("variant", ["swa", "e2e"])
def test_backend_prefills_like_auto_and_trains_like_auto(
        variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pieces``: a model's evaluation (prefix blocks over a sequence longer than their
    window, no gradient) equals ``auto``'s; with an outer gradient the backend is ``auto``'s
    path (flex or banded), so losses and gradients equal it."""
    from tttlm.ops.attention import pieces

    calls, chunk_calls = [], []
    run, run_chunk = pieces.window_attention_pieces, pieces.chunk_attention_pieces
    monkeypatch.setattr(pieces, "window_attention_pieces",
                        lambda *a: calls.append(a[0].shape) or run(*a))
    monkeypatch.setattr(pieces, "chunk_attention_pieces",
                        lambda *a: chunk_calls.append(a[0].shape) or run_chunk(*a))
    model = tiny_model(variant=variant)
    x, y = tokens(model, 2, 40)
    with torch.no_grad():
        with attention_backend("auto"):
            ref = model(x, y, return_logits=True)
        assert not calls
        with attention_backend("pieces"):
            got = model(x, y, return_logits=True)
    assert len(calls) == model.config.num_prefix_layers
    # e2e: every TTT chunk with a cache (window 12, chunks of 4: 9 of 10 chunks; the caches
    # of 4 and 8 keys leave none out, the rest are full), through the inner steps'
    # gradients too (the logits follow the fast weights)
    ttt = model.config.num_ttt_layers if variant == "e2e" else 0
    assert len(chunk_calls) == 9 * ttt
    assert_close(got.logits, ref.logits, atol=1e-10)
    calls.clear()
    chunk_calls.clear()
    losses = []
    for name in ("auto", "pieces"):
        model.zero_grad()
        with attention_backend(name):
            out = model(x, y)
        out.loss.backward()
        losses.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()
                                           if p.grad is not None]))
    assert not calls and not chunk_calls
    assert torch.equal(losses[0][0], losses[1][0])
    for a, e in zip(losses[1][1], losses[0][1], strict=True):
        assert torch.equal(a, e)


def _fp64_operands(B: int, c: int, H: int, d: int, past: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.randn(B, n, H, d, generator=g, dtype=torch.float64).requires_grad_(True)

    return rand(c), rand(past + c), rand(past + c)


def _assert_pieces_equal_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               window: int | None, start: int) -> None:
    """The chunk at ``start .. start+c-1`` over a frozen cache of ``P`` keys: output, dq and
    the chunk's dk, dv as naive's in fp64; the cache's gradients zero."""
    from tttlm.ops.attention.pieces import chunk_attention_pieces

    c = q.shape[1]
    past = k.shape[1] - c
    q_pos = torch.arange(start, start + c)
    k_pos = torch.arange(start - past, start + c)
    ref = naive_attention(q, k, v, window_mask(q_pos, k_pos, window))
    got = chunk_attention_pieces(q, k, v, window)
    assert_close(got, ref, atol=1e-12, name="output")
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    want = torch.autograd.grad(ref, (q, k, v), do)
    have = torch.autograd.grad(got, (q, k, v), do)
    assert_close(have[0], want[0], atol=1e-12, name="dq")
    for name, a, e in zip("kv", have[1:], want[1:]):
        assert_close(a[:, past:], e[:, past:], atol=1e-12, name=f"d{name} of the chunk")
        assert not a[:, :past].any(), f"d{name} of the frozen cache must be zero"


# (B, c, H, d, window, start): chunks after a full cache, one whose M piece is empty (window
# = c + 1), a chunk of one query.
CHUNK_CASES = [(2, 4, 3, 8, 12, 40), (1, 5, 2, 16, 6, 30), (1, 1, 2, 8, 5, 9),
               (2, 8, 1, 8, 24, 24)]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[str(c) for c in CHUNK_CASES])
def test_chunk_pieces_equal_naive_with_gradients_float64(case: tuple[int, ...]) -> None:
    from tttlm.ops.attention.pieces import chunk_pieces_can_run

    B, c, H, d, window, start = case
    q, k, v = _fp64_operands(B, c, H, d, window, seed=c + window)
    assert chunk_pieces_can_run(q, k, window, frozen_keys=window)
    assert not chunk_pieces_can_run(q, k, window, frozen_keys=0)  # keys not frozen
    assert not chunk_pieces_can_run(q, k[:, 1:], window, frozen_keys=window)  # not full
    _assert_pieces_equal_naive(q, k, v, window, start)


# (B, c, H, d, window or None, past): caches that leave no key out of the window (two
# pieces: the cache unmasked, the chunk causal), and ones that do not qualify.
FILLING_CASES = [(2, 4, 3, 8, 12, 4), (1, 5, 2, 16, 20, 15), (2, 3, 1, 8, None, 7),
                 (1, 1, 2, 8, 5, 4)]


@pytest.mark.parametrize("case", FILLING_CASES, ids=[str(c) for c in FILLING_CASES])
def test_chunk_pieces_over_a_filling_cache_equal_naive_float64(case: tuple[Any, ...]) -> None:
    from tttlm.ops.attention.pieces import chunk_pieces_can_run

    B, c, H, d, window, past = case
    q, k, v = _fp64_operands(B, c, H, d, past, seed=c + past)
    assert chunk_pieces_can_run(q, k, window, frozen_keys=past)
    assert not chunk_pieces_can_run(q, k, window, frozen_keys=past - 1)  # not all frozen
    if window is not None and c > 1:  # the window's edge cuts a cache that is not full
        cut = torch.zeros(B, window - 1 + c, H, d, dtype=torch.float64)
        assert not chunk_pieces_can_run(q, cut, window, frozen_keys=window - 1)
    _assert_pieces_equal_naive(q, k, v, window, past)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_pieces_in_bf16_err_like_naive_bf16(device: str) -> None:
    from tttlm.ops.attention.pieces import chunk_attention_pieces

    c, window, start = 32, 64, 200
    q, _, _ = _qkv(1, c, 4, 80, torch.bfloat16, device, seed=7)
    k, v, _ = _qkv(1, window + c, 4, 80, torch.bfloat16, device, seed=8)
    q_pos = torch.arange(start, start + c, device=device)
    k_pos = torch.arange(start - window, start + c, device=device)
    mask = window_mask(q_pos, k_pos, window)
    ref = naive_attention(q.float(), k.float(), v.float(), mask)
    got = chunk_attention_pieces(q, k, v, window)
    base = naive_attention(q, k, v, mask)
    err = float((got.float() - ref).norm() / ref.norm())
    assert err <= 2 * float((base.float() - ref).norm() / ref.norm()) + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's kernels need CUDA")
@pytest.mark.parametrize("kernels", ["cudnn", "flash"])
@pytest.mark.parametrize("past", [192, 128])  # a full cache (the window), one it does not cut
def test_chunk_pieces_gradients_on_cuda_bf16(kernels: str, past: int) -> None:
    """The CUDA forward and backward ops the pieces call (cuDNN's where SDPA's cuDNN switch
    is on, FlashAttention's under ``sdpa_kernel(FLASH_ATTENTION)``), in bf16 with a head width
    of 80 (3b's), against fp32 naive: output and gradients near it as naive bf16's are."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tttlm.ops.attention.pieces import chunk_attention_pieces, cudnn_chunk_pieces_can_run

    c, window, start = 64, 192, 500
    q, _, _ = _qkv(2, c, 4, 80, torch.bfloat16, "cuda", seed=9)
    k, v, do = _qkv(2, past + c, 4, 80, torch.bfloat16, "cuda", seed=10)
    do = do[:, :c]
    q_pos = torch.arange(start, start + c, device="cuda")
    k_pos = torch.arange(start - past, start + c, device="cuda")
    mask = window_mask(q_pos, k_pos, window)
    backend = SDPBackend.CUDNN_ATTENTION if kernels == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        cudnn = cudnn_chunk_pieces_can_run(q, k, window, past)
        if kernels == "cudnn" and not cudnn:
            pytest.skip("this torch or card has no cuDNN attention")
        assert cudnn == (kernels == "cudnn")
    results = {}
    for name, dtype in (("ref", torch.float32), ("base", torch.bfloat16),
                        ("pieces", torch.bfloat16)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        with sdpa_kernel(backend):
            out = (chunk_attention_pieces(qq, kk, vv, window) if name == "pieces"
                   else naive_attention(qq, kk, vv, mask))
            grads = torch.autograd.grad(out, (qq, kk, vv), do.to(dtype))
        results[name] = [out.float(), grads[0].float(), grads[1][:, past:].float(),
                         grads[2][:, past:].float()]
    def err(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x - ref).norm() / ref.norm())

    for i, name in enumerate(("output", "dq", "dk", "dv")):
        ref = results["ref"][i]
        assert err(results["pieces"][i], ref) <= 2 * err(results["base"][i], ref) + 2e-3, name


def test_auto_takes_the_cudnn_pieces_only_on_a_gpu_without_gradient() -> None:
    """``auto``'s two-piece path for windowed whole sequences: CUDA, no gradient wanted, the
    window shorter than the sequence; elsewhere it keeps flex / banded SDPA."""
    from tttlm.ops.attention.pieces import cudnn_pieces_can_run

    q = torch.zeros(1, 40, 2, 8, dtype=torch.bfloat16)
    assert pieces_can_run(q, 16, 16)  # the CPU kernels would run them (tests)
    assert not cudnn_pieces_can_run(q, 16)  # but auto does not on a CPU
    assert not cudnn_pieces_can_run(q, None)
    if torch.cuda.is_available():
        g = q.cuda()
        assert not cudnn_pieces_can_run(g, 40)  # the window covers the sequence
        with torch.enable_grad():
            assert not cudnn_pieces_can_run(g.requires_grad_(True), 16)


def test_cudnn_chunk_pieces_only_on_a_gpu() -> None:
    """The chunk pieces run on a CPU (its kernels, tests), but their cuDNN form only on CUDA."""
    from tttlm.ops.attention.pieces import chunk_pieces_can_run, cudnn_chunk_pieces_can_run

    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 16, 2, 8)
    assert chunk_pieces_can_run(q, k, 12, 12)
    assert not cudnn_chunk_pieces_can_run(q, k, 12, 12)
