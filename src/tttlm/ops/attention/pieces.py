"""Sliding-window attention of a whole sequence from SDPA pieces merged by log-sum-exp.

For a block of queries ``[s, s+n)`` past the first window, the keys a query ``s+i`` sees,
``[s+i-W+1, s+i]``, are the union of three pieces, each a mask SDPA's fused kernels take
without a mask in memory:

* ``A = [s-W+1, s-W+n]``: query ``i`` sees key ``m`` iff ``m >= i`` (the window's lower
  edge): causal once queries and keys are both reversed;
* ``M = [s-W+n+1, s-1]``: every query sees every key: no mask;
* ``C = [s, s+n)``: causal.

Each piece returns its output and the log-sum-exp of its rows; the outputs are weighted by
``exp(lse_piece - lse)`` with ``lse`` the log-sum-exp over the pieces: the softmax over the
union, to rounding. The first window's queries are plain causal attention. Compared with
``flex_attention`` (which pads a head width of 80 to 128 in its tiles), the pieces run
FlashAttention's kernels (a template for 96) at the cost of three launches per block and a
merge over the output. Forward only (prefill and evaluation: no gradient through the
prefix blocks); the LSE-returning kernels are PyTorch's private SDPA ops, the CPU one on a CPU
(tests), the CUDA flash one on a GPU.
"""

from __future__ import annotations

import torch


def pieces_can_run(q: torch.Tensor, window: int | None, block: int) -> bool:
    """Whether :func:`window_attention_pieces` applies: no gradient is taken, the sequence
    is longer than the window, the window a multiple of a shorter block, and (on CUDA) a dtype
    and head width FlashAttention takes."""
    T, d = q.shape[1], q.shape[-1]
    if window is None or window >= T or block < 1 or block >= window or window % block:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return q.device.type == "cpu"


def _piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, H, n, d]`` over ``k, v [N, H, m, d]`` (causal: square, n == m): the output and
    the rows' log-sum-exp ``[N, H, n]`` (fp32; natural log of the scaled scores)."""
    if q.is_cuda:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0,
                                                                              causal)
    return out, lse.reshape(out.shape[:-1])


def _merge(pieces: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """The softmax over the union of the pieces' keys, from their outputs and log-sum-exps."""
    lse = torch.logsumexp(torch.stack([p[1] for p in pieces]), dim=0)
    acc = torch.zeros_like(pieces[0][0], dtype=lse.dtype)
    for out, piece_lse in pieces:
        acc.addcmul_(out.to(lse.dtype), torch.exp(piece_lse - lse)[..., None])
    return acc.to(dtype)


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
            # A: reversed queries over reversed keys, causal; its rows reversed back.
            a_out, a_lse = _piece(qb.flip(2), win(kh, start - W + 1, n).flip(2),
                                  win(vh, start - W + 1, n).flip(2), causal=True)
            parts.append((a_out.flip(2), a_lse.flip(2)))
            m = W - n - 1
            if m > 0:
                parts.append(_piece(qb, win(kh, start - W + n + 1, m),
                                    win(vh, start - W + n + 1, m), causal=False))
            merged = _merge(parts, q.dtype)  # [count, H, n, d]
            out[b, :, span] = merged.permute(1, 0, 2, 3).reshape(H, count * n, d)
            start += count * n
    return out.transpose(1, 2)
