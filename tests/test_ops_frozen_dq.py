"""A TTT chunk over a frozen cache whose backward computes the cache's share of dq only
(tttlm.ops.attention.frozen, the Triton kernel of tttlm.ops.triton_frozen_dq): the kernel
against its dense reference; the whole function (forward, chunk piece's backward, the kernel)
against the naive chunk attention, in fp64 and fp32 under Triton's interpreter; the backend
in a model against the reference backend; what it takes and refuses; on CUDA, against the
FlashAttention window it replaces, in bf16."""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import assert_within, chunk_operands, kernel_dtypes, triton_or_skip

triton = triton_or_skip()

from tttlm.ops.attention import attention_backend, frozen, naive  # noqa: E402
from tttlm.ops.triton_frozen_dq import frozen_dq  # noqa: E402
from tttlm.ops.triton_tiles import head_split  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tile products in bf16/fp16 are wrong (Triton 3.9 on a CPU): CPU runs
# take fp32 and fp64; bf16 runs on CUDA only.
# CUDA takes FlashAttention's dtypes (the forward and the chunk's piece are its kernels).
DTYPES = kernel_dtypes(DEVICE)
# fp64 on the interpreter: the scale reaches the kernel as an fp32 argument (a relative
# error of 2**-24 on every score), so agreement is to fp32's precision, not fp64's.
TOL = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_within(got, ref, TOL[dtype])


@pytest.mark.parametrize("d, split", [(16, (16, 0)), (64, (64, 0)), (80, (64, 16)),
                                      (96, (64, 32)), (128, (128, 0)), (72, None),
                                      (112, None), (8, None), (24, None)])
def test_head_split(d: int, split: tuple[int, int] | None) -> None:
    assert head_split(d) == split


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, P, window, d", [
    (16, 48, 40, 80),     # a full window: early cache keys out of reach of late queries
    (32, 64, None, 64),   # no window
    (10, 30, 35, 96),     # a chunk shorter than a tile, a cache not a multiple of one
    (32, 32, 64, 16),     # the cache and chunk inside the window
    (40, 100, 64, 80),    # tiles of 16: the edge, full and partial last key tiles all met
])
@pytest.mark.parametrize("descriptors", [False, True])
def test_kernel_equals_reference(c: int, P: int, window: int | None, d: int,
                                 dtype: torch.dtype, descriptors: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's share of dq from the dense scores; with the chunk's share added in; small
    tiles too, so that several key tiles and the window's edge inside a tile are crossed;
    keys and values through pointers and through tensor descriptors (which read the chunk's
    own keys past the cache's last tile, to be masked)."""
    q, k, v = chunk_operands(2, c, P, 3, d, dtype, DEVICE)
    out, lse = frozen.window_forward_reference(q, k, v, window) if DEVICE == "cpu" else _flash_out(
        q, k, v, window)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    scale = 1.0 / math.sqrt(d)
    ref = frozen.frozen_dq_reference(q, k, v, out, dout, lse, P, window, scale)
    for config in (None, "16,16,4,1"):
        if config:
            monkeypatch.setenv("TTTLM_FROZEN_DQ", config)
        _close(frozen_dq(q, k, v, out, dout, lse, P, window, scale, descriptors=descriptors),
               ref, dtype)
        extra = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
        got = frozen_dq(q, k, v, out, dout, lse, P, window, scale, dq_chunk=extra,
                        descriptors=descriptors)
        _close(got, ref + extra.to(ref.dtype), dtype)


def test_kernel_reads_strided_rows() -> None:
    """q, k, v as views of fused projections (a row stride wider than the heads), and an
    output of another layout: the kernel follows the strides it is given."""
    dtype = DTYPES[0]
    B, c, P, H, d = 2, 16, 32, 2, 80
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(B, c, 3, H, d, generator=gen).to(DEVICE, dtype)
    q = fused[:, :, 1]
    kv = torch.randn(B, P + c, 2, H, d, generator=gen).to(DEVICE, dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out, lse = frozen.window_forward_reference(q, k, v, 24) if DEVICE == "cpu" else _flash_out(
        q, k, v, 24)
    dout = torch.randn(B, H, c, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    scale = 1.0 / math.sqrt(d)
    ref = frozen.frozen_dq_reference(q, k, v, out, dout, lse, P, 24, scale)
    _close(frozen_dq(q, k, v, out, dout, lse, P, 24, scale), ref, dtype)
    _close(frozen_dq(q, k, v, out, dout, lse, P, 24, scale, descriptors=True), ref, dtype)
    with pytest.raises(ValueError, match="descriptors"):  # heads not side by side in a row
        apart = torch.randn(B, P + c, H, 2, d, generator=gen).to(DEVICE, dtype)[:, :, :, 0]
        frozen_dq(q, apart, apart, out, dout, lse, P, 24, scale, descriptors=True)
    with pytest.raises(ValueError, match="contiguous"):
        frozen_dq(q, k[..., ::2], v, out, dout, lse, P, 24, scale)
    with pytest.raises(ValueError, match="powers of two"):
        frozen_dq(q[..., :72], k[..., :72], v[..., :72], out[..., :72], dout[..., :72], lse,
                  P, 24, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, P, window, d", [(16, 48, 40, 80), (32, 64, None, 64),
                                             (10, 30, 35, 96), (32, 96, 96, 16)])
@pytest.mark.parametrize("triton_forward, triton_backward", [(False, False), (True, False),
                                                              (True, True)])
def test_function_equals_naive_chunk_attention(c: int, P: int, window: int | None, d: int,
                                               dtype: torch.dtype, triton_forward: bool,
                                               triton_backward: bool) -> None:
    """Output, dq, and the chunk's own dk, dv as the naive reference's; the cache's dk, dv
    zeros (it is frozen: the reference's own gradient there is not wanted). The forward
    through FlashAttention (a dense one on a CPU) or the Triton kernel, whose log-sum-exp
    the backward's two shares then read; the own keys' share through FlashAttention's
    backward (the CPU's on a CPU) or the Triton kernels."""
    q, k, v = (x.requires_grad_()
               for x in chunk_operands(2, c, P, 3, d, dtype, DEVICE, seed=5))
    assert frozen.frozen_can_run(q, k, window, P)
    out = frozen.frozen_chunk_attention(q, k, v, window, triton_forward=triton_forward,
                                        triton_backward=triton_backward)
    q_pos = torch.arange(P, P + c, device=DEVICE)
    k_pos = torch.arange(P + c, device=DEVICE)
    ref = naive.naive_chunk_attention(q, k, v, q_pos, k_pos, window)
    _close(out, ref, dtype)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    _close(dq, rq, dtype)
    _close(dk[:, P:], rk[:, P:], dtype)
    _close(dv[:, P:], rv[:, P:], dtype)
    assert not dk[:, :P].any() and not dv[:, :P].any()
    # the reference's cache gradient is not zero: the function really dropped it
    assert rk[:, :P].abs().max() > 0


@pytest.mark.parametrize("triton_backward", [False, True])
def test_cache_rows_unwritten_after_the_operands(triton_backward: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and values from :func:`~tttlm.ops.rope.frozen_chunk_operands`, whose backward
    reads only the chunk's rows: the attention leaves the cache's rows of dk, dv unwritten
    (memory from ``torch.empty_like``, made NaN here to show it: correct code writes all it
    reads), and the chunk's q, k, v get the gradients they get when the keys and values come
    unmarked (copies: the cache's rows then written as zeros). Under anomaly detection's NaN
    check the rows are written."""
    from tttlm.ops.grad_rows import grad_rows_read_from
    from tttlm.ops.rope import frozen_chunk_operands, rope_angles

    # (CUDA: bf16, FlashAttention's window being what the function stands in for; its
    # backward may add in another order from run to run)
    dtype = torch.float64 if DEVICE == "cpu" else torch.bfloat16
    B, c, P, H, d, window = 2, 16, 48, 3, 80, 40
    real = torch.empty_like

    def stale(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        out = real(x, *args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", stale)
    q, cache_k, cache_v = chunk_operands(B, c, P, H, d, dtype, DEVICE, seed=7)
    k, v = cache_k[:, P:].clone(), cache_v[:, P:].clone()
    cache_k, cache_v = cache_k[:, :P], cache_v[:, :P]
    cos, sin = rope_angles(torch.arange(P + c, device=DEVICE), d, 10000.0,
                           torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn(B, c, H, d, generator=torch.Generator().manual_seed(8),
                    dtype=dtype).to(DEVICE)

    def run(marked: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        q_rot, k_rot, values, _ = frozen_chunk_operands(leaves[0], cache_k, leaves[1],
                                                        cache_v, leaves[2], cos, sin, window)
        assert grad_rows_read_from(k_rot) == P and grad_rows_read_from(values) == P
        if not marked:
            k_rot, values = k_rot.clone(), values.clone()
        seen: dict[str, torch.Tensor] = {}
        k_rot.register_hook(lambda grad: seen.setdefault("dk", grad.detach().clone()))
        out = frozen.frozen_chunk_attention(q_rot, k_rot, values, window, triton_forward=True,
                                            triton_backward=triton_backward)
        return list(torch.autograd.grad(out, leaves, g)), seen["dk"]

    got, dk = run(marked=True)
    want, dk_zeros = run(marked=False)
    assert dk[:, :P].isnan().all(), "the cache's rows were written"
    assert not dk_zeros[:, :P].any()
    for a, b in zip(got, want):
        assert a.isfinite().all()
        _same(a, b, dtype)
    with torch.autograd.detect_anomaly():
        got, dk = run(marked=True)
    assert not dk[:, :P].any()
    for a, b in zip(got, want):
        _same(a, b, dtype)


def _same(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit for bit on a CPU; within the dtype's tolerance on CUDA (see above)."""
    if DEVICE == "cpu":
        assert torch.equal(got, ref)
    else:
        _close(got, ref, dtype)


@pytest.mark.parametrize("args, why", [
    (dict(frozen_keys=0), "no frozen cache"),
    (dict(frozen_keys=20), "part of the cache not frozen"),
    (dict(window=16), "a chunk longer than the window"),
    (dict(d=72), "a head width the kernel cannot split"),
])
def test_refusals(args: dict, why: str) -> None:
    c, P = 32, 48
    q, k, _ = chunk_operands(1, c, P, 2, args.get("d", 64), DTYPES[0], DEVICE)
    assert not frozen.frozen_can_run(q, k, args.get("window", 64),
                                     args.get("frozen_keys", P)), why


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's switch, on a CPU")
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, _ = chunk_operands(1, 16, 16, 2, 64, torch.float32, DEVICE)
    assert frozen.frozen_can_run(q, k, 64, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not frozen.frozen_can_run(q, k, 64, 16)


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 takes the path on a CPU only (the "
                    "interpreter); on CUDA the kernel tests above cover it")
@pytest.mark.parametrize("backend", ["frozen-dq", "triton-fwd", "frozen-triton"])
def test_backend_in_a_model_equals_the_reference(backend: str) -> None:
    """The ``frozen-dq`` backend (and ``triton-fwd``, its forward through Triton too, and
    ``frozen-triton``, its whole backward too) through a TTT model's scoring forward (every
    chunk after the first over a frozen cache, the inner step differentiating it once): the
    same loss and the same fast weights as the naive reference backend, in fp64."""
    from tttlm import TTTConfig, TTTForCausalLM

    cfg = TTTConfig.from_preset("tiny", "e2e")
    torch.manual_seed(0)
    model = TTTForCausalLM(cfg).to(DEVICE, torch.float64).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.chunk_size + 1), device=DEVICE)
    calls = []
    original = frozen.frozen_chunk_attention

    def counted(*a: object, **kw: object) -> torch.Tensor:
        calls.append(kw.get("triton_forward", False))
        return original(*a, **kw)  # type: ignore[arg-type]

    results = {}
    for name in ("naive", backend):
        with torch.no_grad(), attention_backend(name), pytest.MonkeyPatch.context() as mp:
            mp.setattr(frozen, "frozen_chunk_attention", counted)
            out = model(ids[:, :-1], labels=ids[:, 1:], ttt=True, return_fast_weights=True)
        results[name] = out
    assert calls == [backend != "frozen-dq"] * len(calls) and calls, calls
    a, b = results["naive"], results[backend]
    torch.testing.assert_close(b.token_nll, a.token_nll, rtol=1e-6, atol=1e-6)
    for wa, wb in zip(a.fast_weights, b.fast_weights, strict=True):
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-6)


def _flash_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's window forward (CUDA): the output and log-sum-exp the backward reads."""
    left = -1 if window is None or window >= k.shape[1] else window - 1
    out, lse = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), None, None, q.shape[1], k.shape[1],
        0.0, True, False, window_size_left=left, window_size_right=0)[:2]
    return out, lse


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashAttention's window: CUDA")
@pytest.mark.parametrize("P, c", [(8192, 1024), (3072, 1024), (96, 64)])
def test_cuda_equals_the_flash_window(P: int, c: int) -> None:
    """At 3b's heads, bf16: the output the flash window's bit for bit (the same forward), dq
    and the chunk's dk, dv within bf16 rounding of the flash window's own backward."""
    from tttlm.ops.attention.flash import flash_chunk_attention

    q, k, v = (x.requires_grad_()
               for x in chunk_operands(1, c, P, 32, 80, torch.bfloat16, DEVICE))
    window = 8192
    out = frozen.frozen_chunk_attention(q, k, v, window)
    ref = flash_chunk_attention(q, k, v, window)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((got[0], want[0]), (got[1][:, P:], want[1][:, P:]),
                 (got[2][:, P:], want[2][:, P:])):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 * max(b.float().abs().max().item(), 1.0), err


@pytest.mark.parametrize("name, takes", [("auto", DEVICE == "cuda"), ("flash-window", False),
                                         ("frozen-dq", True), ("triton-fwd", True),
                                         ("frozen-triton", True)])
def test_which_backends_take_it(name: str, takes: bool, monkeypatch: pytest.MonkeyPatch
                                ) -> None:
    """``auto`` takes the cache-dq-only backward on CUDA only (on a CPU the kernels would run
    under the interpreter), ``flash-window`` never, ``frozen-dq`` and ``triton-fwd``
    wherever they run; the own keys' backward in Triton: ``frozen-triton``, and ``auto`` at a
    head width FlashAttention pads (80 here); the output is the same either way."""
    from tttlm.ops.attention import chunk_attention

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    c, P, window = 64, 192, 128
    q, k, v = chunk_operands(1, c, P, 2, 80, dtype, DEVICE)
    pos = torch.arange(P + c, device=DEVICE)
    calls = []
    original = frozen.frozen_chunk_attention

    backward = []

    def counted(*a: object, **kw: object) -> torch.Tensor:
        calls.append(kw.get("triton_forward", False))
        backward.append(kw.get("triton_backward", False))
        return original(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(frozen, "frozen_chunk_attention", counted)
    with attention_backend(name):
        got = chunk_attention(q, k, v, pos[P:], pos, window, frozen_keys=P)
    # auto: the Triton forward too, for a head width FlashAttention pads (80 here)
    assert calls == ([name in ("triton-fwd", "auto", "frozen-triton")] if takes else [])
    assert backward == ([name in ("auto", "frozen-triton")] if takes else [])
    want = naive.naive_chunk_attention(q.double(), k.double(), v.double(), pos[P:], pos, window)
    _close(got, want, dtype)


@pytest.mark.parametrize("d, pads", [(80, True), (48, True), (144, True), (64, False),
                                     (96, False), (128, False), (160, False), (72, False)])
def test_flash_pads_head(d: int, pads: bool) -> None:
    """The Triton forward replaces FlashAttention's where FlashAttention pads the head width
    (to a multiple of 32) and the kernels split it; elsewhere FlashAttention's is kept."""
    assert frozen.flash_pads_head(d) == pads
