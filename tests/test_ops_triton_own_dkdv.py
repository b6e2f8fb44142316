"""A frozen chunk's own keys' dk and dv in one Triton pass (tttlm.ops.triton_own_dkdv), and the
own keys' share of dq folded into the cache's dq kernel (``frozen_dq(own=True)``): against
the dense reference and against autograd through the naive chunk attention, in fp32 and fp64
under Triton's interpreter on a CPU; on CUDA in bf16 against FlashAttention's backward."""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import assert_within, chunk_operands, kernel_dtypes, triton_or_skip

triton = triton_or_skip()

from tttlm.ops.attention import frozen, naive  # noqa: E402
from tttlm.ops.triton_frozen_dq import frozen_dq  # noqa: E402
from tttlm.ops.triton_own_dkdv import own_dkdv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 tile products are wrong on a CPU (see test_ops_frozen_dq).
DTYPES = kernel_dtypes(DEVICE)
# fp64 on the interpreter: the scale reaches the kernel as an fp32 argument.
TOL = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_within(got, ref, TOL[dtype])


def _naive_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                 window: int | None) -> tuple[torch.Tensor, ...]:
    """dq and the own keys' dk, dv by autograd through the naive chunk attention, in fp64."""
    c, n = q.shape[1], k.shape[1]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = naive.naive_chunk_attention(q64, k64, v64, torch.arange(n - c, n, device=DEVICE),
                                      torch.arange(n, device=DEVICE), window)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return dq, dk[:, n - c:], dv[:, n - c:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, P, window, d", [
    (16, 48, 40, 80),     # the window cuts the cache
    (32, 64, None, 64),   # no window
    (10, 30, 35, 96),     # a chunk shorter than a tile
    (40, 100, 64, 80),    # tiles of 16: diagonal, whole and partial query tiles all met
    (48, 0, 64, 16),      # no cache
])
def test_kernels_equal_autograd(c: int, P: int, window: int | None, d: int,
                                dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """dq (cache and own keys, ``own=True``) and the own keys' dk, dv as autograd's through
    the naive chunk attention, given the merged output and log-sum-exp; with the default
    tiles and with tiles of 16; the dense reference of dk, dv agrees too."""
    q, k, v = chunk_operands(2, c, P, 3, d, dtype, DEVICE)
    out, lse = frozen.window_forward_reference(q, k, v, window)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    scale = 1.0 / math.sqrt(d)
    want_dq, want_dk, want_dv = _naive_grads(q, k, v, dout, window)
    ref_dk, ref_dv = frozen.own_dkdv_reference(q, k[:, P:], v[:, P:], out, dout, lse, scale)
    _close(ref_dk, want_dk, dtype)
    _close(ref_dv, want_dv, dtype)
    for config in (None, "16,16,4,1"):
        if config:
            monkeypatch.setenv("TTTLM_OWN_DKDV", config)
            monkeypatch.setenv("TTTLM_FROZEN_DQ", config)
        dk, dv = own_dkdv(q, k[:, P:], v[:, P:], out, dout, lse, scale)
        assert dk.dtype == dtype and dv.dtype == dtype
        _close(dk, want_dk, dtype)
        _close(dv, want_dv, dtype)
        # written into views of larger gradients (rows of cache + chunk), the rest untouched
        big_k, big_v = torch.full_like(k, 7.0), torch.full_like(v, 7.0)
        own_dkdv(q, k[:, P:], v[:, P:], out, dout, lse, scale, dk=big_k[:, P:],
                 dv=big_v[:, P:])
        assert torch.equal(big_k[:, P:], dk) and torch.equal(big_v[:, P:], dv)
        assert (big_k[:, :P] == 7).all() and (big_v[:, :P] == 7).all()
        _close(frozen_dq(q, k, v, out, dout, lse, P, window, scale, own=True), want_dq, dtype)
        _close(frozen_dq(q, k, v, out, dout, lse, P, window, scale, own=True,
                         descriptors=True), want_dq, dtype)
        # the dq kernel's rows' D handed to the dk, dv kernel: what each computes alone
        delta = torch.full(lse.shape, float("nan"), dtype=torch.float32, device=DEVICE)
        dq = frozen_dq(q, k, v, out, dout, lse, P, window, scale, own=True, delta_out=delta)
        want_delta = (dout.double() * out.double()).sum(-1).transpose(1, 2)
        _close(delta, want_delta, torch.float32)
        _close(dq, want_dq, dtype)
        dk2, dv2 = own_dkdv(q, k[:, P:], v[:, P:], out, dout, lse, scale, delta=delta)
        _close(dk2, want_dk, dtype)
        _close(dv2, want_dv, dtype)


def test_refusals() -> None:
    q, k, v = chunk_operands(1, 16, 16, 2, 80, DTYPES[0], DEVICE)
    out, lse = frozen.window_forward_reference(q, k, v, None)
    with pytest.raises(ValueError, match="powers of two"):
        own_dkdv(q[..., :72], k[:, 16:, :, :72], v[:, 16:, :, :72], out[..., :72],
                 out[..., :72], lse, 1.0)
    with pytest.raises(ValueError, match="own keys"):
        own_dkdv(q, k, v, out, out, lse, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        own_dkdv(q, k[:, 16:, :, ::2].repeat_interleave(2, -1)[..., ::2], v[:, 16:], out, out,
                 lse, 1.0)
    with pytest.raises(ValueError, match="own keys' shape"):
        own_dkdv(q, k[:, 16:], v[:, 16:], out, out, lse, 1.0, dk=torch.empty_like(k))
    with pytest.raises(ValueError, match="delta"):
        own_dkdv(q, k[:, 16:], v[:, 16:], out, out, lse, 1.0, delta=lse.double())
    with pytest.raises(ValueError, match="delta_out"):
        frozen_dq(q, k, v, out, out, lse, 16, None, 1.0, own=True,
                  delta_out=torch.empty(lse.shape[:-1] + (3,), device=DEVICE))
    with pytest.raises(ValueError, match="dq_chunk"):
        frozen_dq(q, k, v, out, out, lse, 16, None, 1.0, dq_chunk=q, own=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashAttention's backward: CUDA")
@pytest.mark.parametrize("P, c", [(8192, 1024), (96, 64)])
def test_cuda_matches_flash_backward(P: int, c: int) -> None:
    """At 3b's heads in bf16: dq, the own keys' dk and dv within bf16 rounding of
    FlashAttention's window backward."""
    from tttlm.ops.attention.flash import flash_chunk_attention

    q, k, v = (x.requires_grad_()
               for x in chunk_operands(1, c, P, 32, 80, torch.bfloat16, DEVICE))
    ref = flash_chunk_attention(q, k, v, 8192)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), g)
    got = torch.autograd.grad(
        frozen.frozen_chunk_attention(q, k, v, 8192, triton_forward=True, triton_backward=True),
        (q, k, v), g)
    for a, b in ((got[0], want[0]), (got[1][:, P:], want[1][:, P:]),
                 (got[2][:, P:], want[2][:, P:])):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 * max(b.float().abs().max().item(), 1.0), err
