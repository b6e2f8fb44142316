"""A TTT chunk's attention forward over cache ⊕ chunk in one Triton pass
(tttlm.ops.triton_window_fwd) against its dense reference (output and log-sum-exp), in fp32
and fp64 under Triton's interpreter on a CPU; on CUDA in bf16/fp16, and against
FlashAttention's window forward, which it can replace."""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import assert_within, chunk_operands, kernel_dtypes, triton_or_skip

triton = triton_or_skip()

from tttlm.ops.attention import frozen, naive  # noqa: E402
from tttlm.ops.triton_kv import descriptors_apply  # noqa: E402
from tttlm.ops.triton_window_fwd import window_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 tile products are wrong on a CPU (see test_ops_frozen_dq).
DTYPES = kernel_dtypes(DEVICE)
# fp64 on the interpreter: the scale reaches the kernel as an fp32 argument.
TOL = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_within(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, P, window, d", [
    (16, 48, 40, 80),     # the window cuts the cache
    (32, 64, None, 64),   # no window
    (10, 30, 35, 96),     # a chunk shorter than a tile, a cache not a multiple of one
    (32, 32, 64, 16),     # the cache and chunk inside the window
    (40, 100, 64, 80),    # tiles of 16: edge, whole and diagonal key tiles all met
    (48, 0, 32, 80),      # no cache: causal over the chunk, the window inside it
    (40, 60, 5, 80),      # a window shorter than a tile: rows that see no key of a tile
])
@pytest.mark.parametrize("descriptors", [False, True])
def test_kernel_equals_reference(c: int, P: int, window: int | None, d: int,
                                 dtype: torch.dtype, descriptors: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Output and log-sum-exp as the dense reference's, with the default tiles and with tiles
    of 16 (several key tiles of each kind, and the window's edge inside the diagonal's), keys
    and values read through pointers and through tensor descriptors (rows past the keys
    read as zeros there instead of masked)."""
    q, k, v = chunk_operands(2, c, P, 3, d, dtype, DEVICE)
    ref_out, ref_lse = frozen.window_forward_reference(
        *(x.to(torch.float64) for x in (q, k, v)), window)
    for config in (None, "16,16,4,1"):
        if config:
            monkeypatch.setenv("TTTLM_WINDOW_FWD", config)
        out, lse = window_forward(q, k, v, window, 1.0 / math.sqrt(d), descriptors=descriptors)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert lse.shape == (2, 3, c) and torch.isfinite(lse).all()
        _close(out, ref_out, dtype)
        # log-sum-exp to fp32's precision (the backward reads it in fp32)
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-5 * ref_lse.abs().max().item()


def test_equals_naive_chunk_attention_and_reads_strides() -> None:
    """Views of fused projections (a row stride wider than the heads) give the naive chunk
    attention's output; a head width the kernel cannot split and a non-contiguous last axis
    are refused."""
    dtype = DTYPES[0]
    B, c, P, H, d, window = 2, 24, 40, 2, 80, 30
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, c, 3, H, d, generator=gen).to(DEVICE, dtype)[:, :, 1]
    kv = torch.randn(B, P + c, 2, H, d, generator=gen).to(DEVICE, dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out, _ = window_forward(q, k, v, window, 1.0 / math.sqrt(d))
    ref = naive.naive_chunk_attention(q.double(), k.double(), v.double(),
                                      torch.arange(P, P + c, device=DEVICE),
                                      torch.arange(P + c, device=DEVICE), window)
    _close(out, ref, dtype)
    # the same through descriptors: the second sequence's keys start a row stride further
    desc, _ = window_forward(q, k, v, window, 1.0 / math.sqrt(d), descriptors=True)
    _close(desc, ref, dtype)
    with pytest.raises(ValueError, match="contiguous"):
        window_forward(q, k[..., ::2], v[..., ::2], window, 1.0)
    # heads not side by side in a row: no descriptor reads them
    apart = torch.randn(B, P + c, H, 2, d).to(DEVICE, dtype)[:, :, :, 0]
    assert not descriptors_apply(apart)
    with pytest.raises(ValueError, match="descriptors"):
        window_forward(q, apart, apart, window, 1.0, descriptors=True)
    with pytest.raises(ValueError, match="powers of two"):
        window_forward(q[..., :72], k[..., :72], v[..., :72], window, 1.0)


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashAttention's window: CUDA")
@pytest.mark.parametrize("P, c", [(8192, 1024), (3072, 1024), (96, 64)])
def test_cuda_matches_the_flash_window(P: int, c: int) -> None:
    """At 3b's heads in bf16: the output within bf16 rounding of FlashAttention's window
    forward, the log-sum-exp within fp32 rounding of its."""
    from tttlm.ops.attention.flash import flash_chunk_attention

    q, k, v = chunk_operands(1, c, P, 32, 80, torch.bfloat16, DEVICE)
    window = 8192
    out, lse = window_forward(q, k, v, window, 1.0 / math.sqrt(80))
    ref = flash_chunk_attention(q, k, v, window)
    left = -1 if window >= k.shape[1] else window - 1
    ref_lse = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, c, P + c, 0.0, True, False, window_size_left=left,
        window_size_right=0)[1]
    assert (out.float() - ref.float()).abs().max().item() <= 1e-2
    assert (lse - ref_lse).abs().max().item() <= 1e-4


def _growing(step: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One head whose every query's scaled score of key ``j`` is ``step · (j // 16)`` (log2
    units) plus a little noise: each tile of 16 keys raises every row's maximum by ``step``."""
    c, P, d = 32, 112, 32
    gen = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    level = step * (torch.arange(P + c, dtype=torch.float64) // 16) / math.log2(math.e)
    k = (level + 0.1 * torch.randn(P + c, generator=gen, dtype=torch.float64))[:, None] * u
    q = math.sqrt(d) * u.expand(c, d)  # (the scale 1/√d undone)
    v = torch.randn(P + c, d, generator=gen, dtype=torch.float64)
    return tuple(x[None, :, None].to(DEVICE, dtype) for x in (q, k, v))


# (the interpreter's numpy says so where the settled shift overflows, before the start-over)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("step", [2.0, 25.0])
@pytest.mark.parametrize("window", [None, 120])
def test_settled_shift_equals_the_reference(step: float, window: int | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shift settled 8 (log2) above the rows' maxima after the first whole key tile
    (no running maximum after it), the output and log-sum-exp are the reference's: maxima
    growing by 2 a tile (the settled shift holds: other bits than the running maximum's) and
    by 25 (the seventh whole tile, 150 above the first, pushes the sums past 2**64: the query
    tile starts over with the running maximum, which alone keeps them in range). With a
    window, the edge's tiles come first, and again on the start over."""
    dtype = DTYPES[0]
    q, k, v = _growing(step, dtype)
    ref_out, ref_lse = frozen.window_forward_reference(
        *(x.to(torch.float64) for x in (q, k, v)), window)
    monkeypatch.setenv("TTTLM_WINDOW_FWD", "16,16,4,1")
    got = {}
    for settle in ("0", "8"):
        monkeypatch.setenv("TTTLM_WINDOW_SETTLE", settle)
        out, lse = window_forward(q, k, v, window, 1.0 / math.sqrt(q.shape[-1]))
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        _close(out, ref_out, dtype)
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-5 * ref_lse.abs().max().item()
        got[settle] = out
    if step == 2.0:  # the settled shift ran: the same values by other roundings
        assert not torch.equal(got["0"], got["8"])


def test_settle_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from tttlm.ops.triton_window_fwd import SETTLE_SHIFT, settle_shift

    monkeypatch.delenv("TTTLM_WINDOW_SETTLE", raising=False)
    assert settle_shift() == SETTLE_SHIFT
    monkeypatch.setenv("TTTLM_WINDOW_SETTLE", "48")
    assert settle_shift() == 48
    assert settle_shift(torch.float32) == 48
    # fp16 keeps the running maximum: terms of 2**-48 vanish in its products (on a GPU,
    # test_kernel_equals_reference's fp16 cases failed with the shift: errors of 0.5)
    assert settle_shift(torch.float16) == 0
    for bad in ("-1", "65", "x"):
        monkeypatch.setenv("TTTLM_WINDOW_SETTLE", bad)
        with pytest.raises(ValueError, match="TTTLM_WINDOW_SETTLE"):
            settle_shift()
