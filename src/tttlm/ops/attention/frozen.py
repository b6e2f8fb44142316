"""A TTT chunk over a frozen cache whose backward skips the cache's dK and dV.

The forward is FlashAttention's sliding window, as :func:`~tttlm.ops.attention.flash.
flash_chunk_attention` runs it (one launch, its output and log-sum-exp kept). The backward
splits the keys in two:

* the chunk's own keys (causal, square): FlashAttention's backward given the *merged* output
  and log-sum-exp, which gives this piece's share of dq and the chunk's dk, dv exactly;
* the cached keys (frozen: no gradient wanted): only their share of dq, through the Triton
  kernel of :mod:`tttlm.ops.triton_frozen_dq`, which also adds the first share in. Three of
  FlashAttention's five tile products per cached key tile.

The cache's dk, dv come back as zeros (autograd wants a gradient of the input's shape; the
cache is detached, so it goes nowhere), or unwritten where the keys' and values' producer
marked that its backward reads only the chunk's rows (:mod:`tttlm.ops.grad_rows`; the frozen
operands of :func:`tttlm.ops.rope.frozen_chunk_operands` do). First order only. On a CPU
the forward is the dense reference and the chunk's piece goes through the CPU's flash
backward, so that the Triton kernel's interpreter run (``TRITON_INTERPRET=1``) tests the
whole backward there.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from tttlm.ops.attention import flash, naive
from tttlm.ops.grad_rows import grad_rows_read_from, unread_rows_may_stay_unwritten
from tttlm.ops.triton_runtime import triton_available, triton_can_run, triton_interpreting
from tttlm.ops.triton_tiles import head_split


def frozen_dq_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        dout: torch.Tensor, lse: torch.Tensor, frozen: int,
                        window: int | None, scale: float) -> torch.Tensor:
    """The reference of :func:`tttlm.ops.triton_frozen_dq.frozen_dq` (without the added
    share): the cached keys' share of dq from dense scores, in fp32 (fp64 for fp64), returned
    in that precision. ``q, out, dout [B, c, H, d]``, ``k, v [B, n, H, d]`` with the cache
    its first ``frozen`` keys, ``lse [B, H, c]`` the forward's over all the keys."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = q.shape[1]
    qf, kf, vf, of, gf = (x.to(acc) for x in (q, k[:, :frozen], v[:, :frozen], out, dout))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    probs = torch.exp(scores - lse.to(acc)[..., None])
    seen = naive.window_mask(frozen + torch.arange(c, device=q.device),
                             torch.arange(frozen, device=q.device), window)
    probs = probs * seen
    dp = torch.einsum("bqhd,bkhd->bhqk", gf, vf)
    delta = (gf * of).sum(-1).transpose(1, 2)  # [B, H, c]
    ds = probs * (dp - delta[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale


def frozen_can_run(q: torch.Tensor, k: torch.Tensor, window: int | None,
                   frozen_keys: int) -> bool:
    """Whether :func:`frozen_chunk_attention` takes this chunk: every cached key frozen
    (``k`` = cache ⊕ chunk, ``frozen_keys`` the cache's length, at least one), the chunk no
    longer than the window, a head width the kernel splits (two powers of two of at least 16:
    64, 80, 96, 128, ...), and either FlashAttention's window on CUDA with Triton installed,
    or CPU tensors under Triton's interpreter (tests)."""
    c, d = q.shape[1], q.shape[-1]
    if frozen_keys <= 0 or frozen_keys != k.shape[1] - c:
        return False
    if window is not None and c > window:
        return False
    if not triton_available() or not triton_can_run(q):
        return False
    if head_split(d) is None:
        return False
    if q.is_cuda:
        return flash.flash_window_can_run(q)
    return triton_interpreting()


def flash_pads_head(d: int) -> bool:
    """Whether FlashAttention pads head width ``d`` (its kernels are built for multiples of
    32: 80 runs as 96) while the Triton kernels split it into two powers of two (80 = 64 + 16)
    and pad nothing."""
    return d % 32 != 0 and head_split(d) is not None


def frozen_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: int | None, triton_forward: bool = False,
                           triton_backward: bool = False) -> torch.Tensor:
    """``q [B, c, H, d]`` over ``k, v [B, P + c, H, d]`` (a frozen cache of ``P`` keys, then
    the chunk's own), query ``i`` seeing keys ``j`` with ``0 <= P + i - j < window``: the
    function of :func:`~tttlm.ops.attention.flash.flash_chunk_attention`, with a backward
    that computes no dk, dv for the cache (see :func:`frozen_can_run`). One dtype in.
    ``triton_forward``: the forward through :mod:`tttlm.ops.triton_window_fwd` instead of
    FlashAttention's (CPU tensors: under the interpreter). ``triton_backward``: the chunk's
    own keys' share through Triton too (:mod:`tttlm.ops.triton_own_dkdv` for dk, dv; their dq
    folded into the cache's kernel) instead of FlashAttention's backward (CPU: the CPU's)."""
    return _FrozenChunk.apply(q, k, v, window, triton_forward, triton_backward)


@functools.cache
def _no_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholders for FlashAttention's random state (seed, offset), made once per device
    (before any CUDA graph is captured: a run's first chunks are launched)."""
    return (torch.zeros(2, dtype=torch.int64, device=device),
            torch.empty(0, dtype=torch.int64, device=device))


def own_dkdv_reference(q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor,
                       out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`tttlm.ops.triton_own_dkdv.own_dkdv`: the chunk's own keys'
    dk, dv (causal) from dense scores, in fp32 (fp64 for fp64). ``q, out, dout, k_own, v_own
    [B, c, H, d]``, ``lse [B, H, c]`` the forward's over all the keys."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = q.shape[1]
    qf, kf, vf, of, gf = (x.to(acc) for x in (q, k_own, v_own, out, dout))
    seen = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    probs = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale - lse.to(acc)[..., None])
    probs = probs * seen
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, gf)
    dp = torch.einsum("bqhd,bkhd->bhqk", gf, vf)
    delta = (gf * of).sum(-1).transpose(1, 2)  # [B, H, c]
    ds = probs * (dp - delta[..., None])
    return torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale, dv


def window_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (in ``q``'s dtype) and ``lse [B, H, c]`` (fp32; fp64 for fp64) of a chunk
    over cache ⊕ chunk from dense scores: the forward on a CPU, and the reference of
    :func:`tttlm.ops.triton_window_fwd.window_forward`."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, n = q.shape[1], k.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) / math.sqrt(q.shape[-1])
    seen = naive.window_mask(torch.arange(n - c, n, device=q.device),
                             torch.arange(n, device=q.device), window)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v.to(acc))
    return out.to(q.dtype), lse


def _chunk_piece_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          aux: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    """The chunk's own keys' share of dq and their dk, dv (causal, square), given the merged
    output and log-sum-exp."""
    if q.is_cuda:
        rng_state, unused = aux
        c = q.shape[1]
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, None, None, c, c, 0.0, True, rng_state, unused,
            window_size_left=-1, window_size_right=0)
    from tttlm.ops.attention.pieces import cpu_piece_backward

    heads = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
    # (the Triton forward's log-sum-exp is fp32 for every dtype; the CPU kernels want fp64's)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return tuple(g.transpose(1, 2) for g in cpu_piece_backward(*heads, lse, causal=True))


class _FrozenChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                window: int | None, triton_forward: bool, triton_backward: bool
                ) -> torch.Tensor:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if triton_forward:
            from tttlm.ops.triton_window_fwd import window_forward

            out, lse = window_forward(q, k, v, window, 1.0 / math.sqrt(q.shape[-1]))
            # FlashAttention's backward reads no random state without dropout
            ctx.aux = _no_rng(q.device)
        elif q.is_cuda:
            left = -1 if window is None or window >= k.shape[1] else window - 1
            out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
                window_size_left=left, window_size_right=0)
            ctx.aux = (rng_state, unused)
        else:
            out, lse = window_forward_reference(q, k, v, window)
            ctx.aux = ()
        ctx.save_for_backward(q, k, v, out, lse)
        # (whether the keys' and values' producers read only the chunk's rows of their
        # gradients: then the cache's rows are left unwritten)
        P = k.shape[1] - q.shape[1]
        ctx.cache_rows_unread = (grad_rows_read_from(k) == P and grad_rows_read_from(v) == P)
        ctx.window = window
        ctx.triton_backward = triton_backward
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from tttlm.ops.triton_frozen_dq import frozen_dq

        q, k, v, out, lse = ctx.saved_tensors
        P = k.shape[1] - q.shape[1]
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        scale = 1.0 / math.sqrt(q.shape[-1])
        # The cache's dk, dv are zeros (written once), or left unwritten where their
        # producers read only the chunk's rows; the own keys' go into the rest.
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if not (ctx.cache_rows_unread and unread_rows_may_stay_unwritten()):
            dk[:, :P].zero_()
            dv[:, :P].zero_()
        if ctx.triton_backward:
            from tttlm.ops.triton_own_dkdv import own_dkdv

            # The dq kernel forms each row's D = Σ dO·O; it hands them to the dk, dv kernel
            # (which forms them itself for a log-sum-exp of other strides)
            delta = (torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
                     if lse.is_contiguous() else None)
            dq = frozen_dq(q, k, v, out, grad, lse, P, ctx.window, scale, own=True,
                           delta_out=delta)
            own_dkdv(q, k[:, P:], v[:, P:], out, grad, lse, scale, dk=dk[:, P:], dv=dv[:, P:],
                     delta=delta)
        else:
            dq_own, dk_own, dv_own = _chunk_piece_backward(
                grad, q, k[:, P:], v[:, P:], out, lse, ctx.aux)
            dq = frozen_dq(q, k, v, out, grad, lse, P, ctx.window, scale,
                           dq_chunk=dq_own.contiguous())
            dk[:, P:] = dk_own
            dv[:, P:] = dv_own
        return dq, dk, dv, None, None, None
