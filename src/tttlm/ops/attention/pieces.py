"""Sliding-window attention of a whole sequence from SDPA pieces merged by log-sum-exp.

For a block of queries ``[s, s+n)`` past the first window, the keys a query ``s+i`` sees,
``[s+i-W+1, s+i]``, are the union of three pieces, each a mask SDPA's fused kernels take
without a mask in memory:

* ``A = [s-W+1, s-W+n]``: query ``i`` sees key ``m`` iff ``m >= i`` (the window's lower
  edge): causal once queries and keys are both reversed;
* ``M = [s-W+n+1, s-1]``: every query sees every key: no mask;
* ``C = [s, s+n)``: causal.

With blocks as long as the window, ``M`` is empty and ``A`` is ``[s-W+1, s-1]`` for the
block's first ``W-1`` queries (its last query sees none of it): two pieces, every block of a
sequence in one batched call each. That is the form ``auto`` runs on a GPU, through cuDNN.

Each piece returns its output and the log-sum-exp of its rows; the outputs are weighted by
``exp(lse_piece - lse)`` with ``lse`` the log-sum-exp over the pieces: the softmax over the
union, to rounding. The first window's queries are plain causal attention. Compared with
``flex_attention`` (which pads a head width of 80 to 128 in its tiles), cuDNN's causal
kernels run the pieces at 1.6x FlashAttention's speed at that width on an H200, which pays
for the reversals and the merge. :func:`window_attention_pieces` (whole sequences) is
forward only (prefill and evaluation take no gradient through the prefix blocks);
:func:`chunk_attention_pieces` (a TTT chunk over a frozen cache, full or not yet cut by the
window) has a first-order backward: each piece's backward with the merged output and
log-sum-exp gives that piece's share of the gradient exactly (what ring attention does). The
LSE-returning kernels are PyTorch's private SDPA ops: the CPU ones on a CPU (tests); on a GPU
cuDNN's where it is enabled (forward and backward), FlashAttention's otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from tttlm.ops.attention.flash import FLASH_DTYPES
from tttlm.ops.compiled import compile_or_fall_back, inductor_compile


def pieces_can_run(q: torch.Tensor, window: int | None, block: int) -> bool:
    """Whether :func:`window_attention_pieces` applies: no gradient is taken, the sequence
    is longer than the window, the window a multiple of a block no longer than it, and (on
    CUDA) a dtype and head width FlashAttention takes."""
    T = q.shape[1]
    if window is None or window >= T or block < 1 or block > window or window % block:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    return _kernels_take(q)


def _kernels_take(q: torch.Tensor) -> bool:
    """A device, dtype and head width the pieces' kernels take: the CPU's (tests), or on CUDA
    what FlashAttention takes (fp16/bf16, heads a multiple of 8 up to 256)."""
    if q.is_cuda:
        return q.dtype in FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    return q.device.type == "cpu"


def cudnn_pieces_can_run(q: torch.Tensor, window: int | None) -> bool:
    """Whether whole sequences take the two batched pieces through cuDNN (blocks as long as
    the window): no gradient wanted, on a GPU of compute capability 8.0 or later whose torch
    has cuDNN's attention enabled, heads no wider than 128 (where cuDNN's kernels are sure).
    Measured on one H200 at 3b (``benchmarks/results/prefill_flash_3b.md``): a 128K prefill
    0.0410 s per 1K tokens against 0.0440 with ``flex_attention`` there."""
    return window is not None and pieces_can_run(q, window, window) and _cudnn_fits(q)


def _cudnn_fits(q: torch.Tensor) -> bool:
    """A CUDA tensor cuDNN's attention takes: compute capability 8.0 or later, heads no wider
    than 128, cuDNN's attention enabled in this torch."""
    return (q.is_cuda and q.shape[-1] <= 128 and _cudnn_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def _piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, H, n, d]`` over ``k, v [N, H, m, d]`` (causal: square, n == m): the output and
    the rows' log-sum-exp ``[N, H, n]`` (fp32; natural log of the scaled scores). On a GPU
    through cuDNN where this torch has it (its Hopper kernels run 1.6x FlashAttention's at
    3b's head width of 80), else FlashAttention; the CPU's kernels on a CPU."""
    out, lse, _ = _piece_with_aux(q, k, v, causal)
    return out, lse


@functools.cache
def _cudnn_built() -> bool:
    """Whether this torch has cuDNN and its attention op."""
    return (hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
            and torch.backends.cudnn.is_available())


def _cudnn_available() -> bool:
    """Whether cuDNN's attention is there and enabled now (``torch.backends.cuda``'s
    switch, which ``sdpa_kernel`` and ``enable_cudnn_sdp`` set, is read at every call)."""
    return _cudnn_built() and torch.backends.cuda.cudnn_sdp_enabled()


def _piece_with_aux(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """:func:`_piece` and what its backward needs besides: which kernel ran, and (CUDA)
    sequence offsets, lengths, random state (unused without dropout, passed back as the
    kernel gave them) and the log-sum-exp's own shape."""
    if _cudnn_fits(q):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0,
                                                               causal, False))
        aux: tuple[Any, ...] = ("cudnn", cum_q, cum_k, max_q, max_k, seed, offset, lse.shape)
    elif q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal))
        aux = ("flash", cum_q, cum_k, max_q, max_k, seed, offset)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0,
                                                                              causal)
        aux = ("cpu",)
    return out, lse[..., :q.shape[2]].reshape(out.shape[:-1]), aux


def _piece_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, causal: bool, aux: tuple[Any, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The piece's share of dq, dk, dv given the *merged* ``out`` and ``lse`` (its
    probabilities are then the union's, restricted to its keys), through the kernel family
    its forward ran in."""
    kind = aux[0]
    if kind == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset, lse_shape = aux[1:]
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.reshape(lse_shape), seed, offset, None, cum_q, cum_k,
            max_q, max_k, 0.0, causal)
    if kind == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = aux[1:]
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset)
    return cpu_piece_backward(dout, q, k, v, out, lse, causal)


def cpu_piece_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A piece's share of dq, dk, dv through the CPU's flash backward (heads first,
    ``lse [N, H, n]`` in the accumulation dtype), given the merged ``out`` and ``lse``."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal)


def _merge(pieces: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over the union of the pieces' keys, from their outputs and log-sum-exps:
    the merged output and log-sum-exp."""
    lse = torch.logsumexp(torch.stack([p[1] for p in pieces]), dim=0)
    acc = torch.zeros_like(pieces[0][0], dtype=lse.dtype)
    for out, piece_lse in pieces:
        acc.addcmul_(out.to(lse.dtype), torch.exp(piece_lse - lse)[..., None])
    return acc.to(dtype), lse


def _merge_chunk(pieces: list[tuple[torch.Tensor, torch.Tensor, bool]], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_merge` of a chunk's pieces ``(out, lse, reversed)``, the reversed ones' rows
    put back in order first."""
    return _merge([(o.flip(2), lse.flip(2)) if rev else (o, lse) for o, lse, rev in pieces],
                  dtype)


def _sum_dq(parts: list[tuple[torch.Tensor, bool]], dtype: torch.dtype) -> torch.Tensor:
    """The pieces' shares of dq summed in ``dtype`` (fp32, fp64 for fp64), reversed rows put
    back in order."""
    total = None
    for g, rev in parts:
        g = (g.flip(2) if rev else g).to(dtype)
        total = g if total is None else total + g
    assert total is not None
    return total


@functools.cache
def _fused(fn: Any) -> Any:
    """``fn`` compiled (one kernel for the merge or the sum instead of a dozen over small
    tensors, a few per chunk and layer); the shapes are the chunk's, the same for every
    chunk."""
    return inductor_compile(fn, dynamic=False)


def _on_device(fn: Any, x: torch.Tensor, any_length: bool = False) -> Any:
    """``fn`` compiled for a GPU tensor ``x`` (``any_length``: for shapes that vary with the
    sequence's length); on a CPU (tests) ``fn`` as it is, which needs no compiler."""
    if not x.is_cuda:
        return fn
    return _fused_any_length(fn) if any_length else _fused(fn)


@functools.cache
def _fused_any_length(fn: Any) -> Any:
    """``fn`` compiled for shapes that vary with the sequence's length (the number of blocks):
    marked dynamic after the first new shape instead of compiled again for each; uncompiled
    where the compiler fails (a GPU without a working compiler: the same values, one warning)."""
    return compile_or_fall_back(fn, dynamic=None)


def _reverse_rows(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of ``xs [N, H, n, d]`` with their rows (dim 2) reversed. Compiled
    on a GPU: one pass per tensor at the card's bandwidth, where ATen's flip gathers at less
    than half of it (89 ms of a 3b 128K step on an H100)."""
    return tuple(x.flip(2).contiguous() for x in xs)


def _merge_window(parts: list[tuple[torch.Tensor, torch.Tensor]], edge_out: torch.Tensor,
                  edge_lse: torch.Tensor, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_merge` of a block's pieces and its window edge (``A``), whose rows come
    reversed and ``pad`` short (the block's last queries see none of it): put back in order
    and padded inside the merge, which is one fused pass when compiled."""
    a_out, a_lse = edge_out.flip(2), edge_lse.flip(2)
    if pad:
        a_out = F.pad(a_out, (0, 0, 0, pad))
        a_lse = F.pad(a_lse, (0, pad), value=-math.inf)
    return _merge([*parts, (a_out, a_lse)], dtype)[0]


def _blocks(x: torch.Tensor, first: int, size: int, count: int, step: int) -> torch.Tensor:
    """``count`` windows of ``size`` rows of ``x [H, T, d]`` (one sequence, heads first), the
    j-th starting at row ``first + j·step``: ``[count, H, size, d]``, a view (windows may
    overlap; the kernels only read them)."""
    sH, sT, sd = x.stride()
    return x.as_strided((count, x.shape[0], size, x.shape[2]), (step * sT, sH, sT, sd),
                        x.storage_offset() + first * sT)


def window_attention_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                            block: int) -> torch.Tensor:
    """Sliding-window causal attention of ``q, k, v [B, T, H, d]`` (query ``t`` sees keys
    ``(t-window, t]``) from the pieces of the module docstring, ``block`` queries per block
    (``window`` a multiple of it; see :func:`pieces_can_run`). Same values as
    ``naive_attention`` with the window mask, to rounding."""
    B, T, H, d = q.shape
    W = window
    out = torch.empty(B, H, T, d, dtype=q.dtype, device=q.device)
    for b in range(B):  # one sequence at a time: its blocks share one batch of kernel calls
        qh, kh, vh = (x[b].transpose(0, 1) for x in (q, k, v))  # [H, T, d] views
        first, _ = _piece(qh[None, :, :W], kh[None, :, :W], vh[None, :, :W], causal=True)
        out[b, :, :W] = first[0]
        start = W
        while start < T:
            n = min(block, T - start)  # a last, shorter block on its own
            count = (T - start) // n if n == block else 1
            span = slice(start, start + count * n)

            def win(x: torch.Tensor, first_row: int, size: int) -> torch.Tensor:
                return _blocks(x, first_row, size, count, n)  # noqa: B023 (used at once)

            qb = win(qh, start, n)
            parts = [_piece(qb, win(kh, start, n), win(vh, start, n), causal=True)]
            m = W - n - 1
            if m > 0:
                parts.append(_piece(qb, win(kh, start - W + n + 1, m),
                                    win(vh, start - W + n + 1, m), causal=False))
            # A: reversed queries over reversed keys, causal; its rows reversed back in the
            # merge. A block as long as the window has no M: A's keys stop before the
            # block's first key (C has it), and the block's last query sees none of them.
            a = min(n, W - 1)
            reversed_qkv = _on_device(_reverse_rows, q, any_length=True)(
                qb[:, :, :a], win(kh, start - W + 1, a), win(vh, start - W + 1, a))
            a_out, a_lse = _piece(*reversed_qkv, causal=True)
            merged = _on_device(_merge_window, q, any_length=True)(
                parts, a_out, a_lse, n - a, q.dtype)  # [count, H, n, d]
            out[b, :, span] = merged.permute(1, 0, 2, 3).reshape(H, count * n, d)
            start += count * n
    return out.transpose(1, 2)


def chunk_pieces_can_run(q: torch.Tensor, k: torch.Tensor, window: int | None,
                         frozen_keys: int) -> bool:
    """Whether :func:`chunk_attention_pieces` applies: a chunk of ``c`` queries after a
    frozen cache of ``frozen_keys`` keys (``k`` = cache ⊕ chunk) that is either full
    (``window`` keys, ``window > c``) or leaves no key out of the window (cache + chunk
    ``<= window``, or no window); a first-order gradient at most; and (on CUDA) a dtype and
    head width FlashAttention takes."""
    c = q.shape[1]
    past = k.shape[1] - c
    if frozen_keys <= 0 or frozen_keys != past:
        return False
    if window is not None and past + c > window and not (past == window and c < window):
        return False
    return _kernels_take(q)


def cudnn_chunk_pieces_can_run(q: torch.Tensor, k: torch.Tensor, window: int | None,
                               frozen_keys: int) -> bool:
    """:func:`chunk_pieces_can_run` where the pieces run through cuDNN (see
    :func:`cudnn_pieces_can_run`)."""
    return chunk_pieces_can_run(q, k, window, frozen_keys) and _cudnn_fits(q)


def chunk_attention_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: int | None) -> torch.Tensor:
    """A TTT chunk ``q [B, c, H, d]`` over ``k, v [B, P+c, H, d]`` (a frozen cache of ``P``
    keys, then the chunk's own), query ``i`` seeing keys ``(P+i-window, P+i]``, as pieces
    merged by log-sum-exp: ``C`` (the chunk's own keys, causal) and, over a full cache
    (``P = window``), ``A`` (cache rows ``1 .. c``) and ``M`` (rows ``c+1 .. W-1``); over a
    cache that leaves no key out of the window, ``M`` is the whole cache. Differentiable
    once; the cache's keys and values get zero gradients (they are frozen: see
    :func:`chunk_pieces_can_run`)."""
    return _ChunkPieces.apply(q, k, v, window)


def _chunk_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool]]:
    """Per piece: heads-first q, k, v, whether causal, whether reversed (A). The first is C,
    the chunk's own keys (the only ones whose gradient is taken)."""
    c = q.shape[1]
    P = k.shape[1] - c
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, n, d] views
    parts = [(qh, kh[:, :, P:], vh[:, :, P:], True, False)]
    if window is None or P + c <= window:  # no cached key leaves the window
        parts.append((qh, kh[:, :, :P], vh[:, :, :P], False, False))
        return parts
    W = window
    parts.append((qh.flip(2), kh[:, :, 1:c + 1].flip(2), vh[:, :, 1:c + 1].flip(2), True, True))
    if W - c - 1 > 0:
        parts.append((qh, kh[:, :, c + 1:W], vh[:, :, c + 1:W], False, False))
    return parts


class _ChunkPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                window: int | None) -> torch.Tensor:
        parts = _chunk_operands(q, k, v, window)
        results, auxes = [], []
        for pq, pk, pv, causal, reverse in parts:
            out, lse, aux = _piece_with_aux(pq, pk, pv, causal)
            results.append((out, lse, reverse))
            auxes.append(aux)
        out, lse = _on_device(_merge_chunk, q)(results, q.dtype)  # [B, H, c, d], [B, H, c]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.auxes = window, auxes
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        P = k.shape[1] - q.shape[1]
        dout = grad.transpose(1, 2)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        parts = _chunk_operands(q, k, v, ctx.window)
        shares = []
        for i, ((pq, pk, pv, causal, reverse), aux) in enumerate(
                zip(parts, ctx.auxes, strict=True)):
            o, l_, g = ((out.flip(2), lse.flip(2), dout.flip(2)) if reverse
                        else (out, lse, dout))
            gq, gk, gv = _piece_backward(g, pq, pk, pv, o, l_, causal, aux)
            shares.append((gq, reverse))
            if i == 0:  # C: the chunk's own keys; the cache's (A, M) are frozen
                dk[:, P:] = gk.transpose(1, 2)
                dv[:, P:] = gv.transpose(1, 2)
        dq = _on_device(_sum_dq, q)(shares, acc)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, None
