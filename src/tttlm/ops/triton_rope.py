"""A frozen TTT chunk's attention operands in one Triton pass over the cache (GPU prefill).

:func:`tttlm.ops.rope.frozen_chunk_operands` is the reference: RoPE of the cached keys and the
chunk's keys at their local positions, the values of cache ⊕ chunk, the raw keys the next
chunk keeps, and the rotated queries. Written with ``torch.cat`` and :func:`apply_rope` that
is three concatenations and a rotation, each a pass over the whole cache; Inductor fuses them
into three kernels of its own, which ran at a fifth of the H200's bandwidth (dynamic shapes,
interleaved pairs). Here one kernel reads every cached row once and writes the three outputs,
and a second rotates the queries.

Interleaved RoPE only (the official layout: pairs ``(x[2i], x[2i+1])``, tables ``[n, d/2]``).
The rotation is the reference's arithmetic (fp32, fp64 for fp64 tables: ``re·c − im·s``,
``re·s + im·c``, one rounding to the output dtype); on a GPU the compiler may contract a
product and a sum into one FMA, so results agree with the reference to the last bit only
under the interpreter.

Differentiable once, with respect to the chunk's ``q``, ``k`` and ``v`` (the cache is a
constant: no outer gradient); the backward rotates the gradients back with the same kernel.

This module imports Triton at import time; import it through
:func:`tttlm.ops.rope.frozen_chunk_operands`, which checks availability first.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from tttlm.ops.triton_runtime import triton_interpreting


@triton.jit
def _two_source_rows(A, B, b, r, p, split, a_sb, a_sr, b_sb, b_sr, in_a, in_b):
    """Elements ``2p`` and ``2p + 1`` of row ``r``: ``A``'s row ``r`` below ``split``,
    ``B``'s row ``r - split`` from there on (a select, not a sum: zeros keep their sign)."""
    off_a = b * a_sb + r * a_sr + 2 * p
    off_b = b * b_sb + (r - split) * b_sr + 2 * p
    even = tl.where(in_a, tl.load(A + off_a, mask=in_a, other=0.0),
                    tl.load(B + off_b, mask=in_b, other=0.0))
    odd = tl.where(in_a, tl.load(A + off_a + 1, mask=in_a, other=0.0),
                   tl.load(B + off_b + 1, mask=in_b, other=0.0))
    return even, odd


@triton.jit
def _operands_kernel(KA, KB, ka_sb, ka_sr, kb_sb, kb_sr, COS, SIN, t_sr,
                     ROT, rot_sb, rot_sr, RAW, raw_sb, raw_sr, drop,
                     VA, VB, va_sb, va_sr, vb_sb, vb_sr, VOUT, vo_sb, vo_sr,
                     split, n, pairs,
                     HALF: tl.constexpr, WRITE_RAW: tl.constexpr, WRITE_VALUES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows ``0 .. n-1`` of ``KA ⊕ KB`` (split at row ``split``) rotated by the tables'
    rows into ``ROT``; with ``WRITE_RAW`` rows ``drop ..`` unrotated into ``RAW``; with
    ``WRITE_VALUES`` rows of ``VA ⊕ VB`` into ``VOUT``. A row is ``pairs`` pairs (heads × d/2,
    heads contiguous); grid: (batch, row blocks, pair blocks)."""
    b = tl.program_id(0).to(tl.int64)  # batch offsets of large caches pass 2**31
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    p = (tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
    valid = (r < n) & (p < pairs)
    in_a = valid & (r < split)
    in_b = valid & (r >= split)
    re, im = _two_source_rows(KA, KB, b, r, p, split, ka_sb, ka_sr, kb_sb, kb_sr, in_a, in_b)
    i = p % HALF
    cos = tl.load(COS + r * t_sr + i, mask=valid, other=0.0)
    sin = tl.load(SIN + r * t_sr + i, mask=valid, other=0.0)
    x_re = re.to(cos.dtype)
    x_im = im.to(cos.dtype)
    out = ROT + b * rot_sb + r * rot_sr + 2 * p
    tl.store(out, (x_re * cos - x_im * sin).to(ROT.dtype.element_ty), mask=valid)
    tl.store(out + 1, (x_re * sin + x_im * cos).to(ROT.dtype.element_ty), mask=valid)
    if WRITE_RAW:
        keep = valid & (r >= drop)
        raw = RAW + b * raw_sb + (r - drop) * raw_sr + 2 * p
        tl.store(raw, re, mask=keep)
        tl.store(raw + 1, im, mask=keep)
    if WRITE_VALUES:
        v0, v1 = _two_source_rows(VA, VB, b, r, p, split, va_sb, va_sr, vb_sb, vb_sr, in_a, in_b)
        vout = VOUT + b * vo_sb + r * vo_sr + 2 * p
        tl.store(vout, v0, mask=valid)
        tl.store(vout + 1, v1, mask=valid)


def _rows_ok(x: torch.Tensor) -> bool:
    """``[B, T, H, d]`` with each row's ``H × d`` elements contiguous (batch and row strides
    free): a projection's view or a slice of a cache."""
    return x.dim() == 4 and x.stride(3) == 1 and x.stride(2) == x.shape[3]


def triton_operands_can_run(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                            values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`triton_frozen_operands` takes these: interleaved tables, a cache that
    wants no gradient, one dtype for keys and values, rows laid out as :func:`_rows_ok`."""
    d = q.shape[-1]
    return (d % 2 == 0 and cos.shape[-1] == d // 2 and cos.is_contiguous()
            and not keys.requires_grad and not values.requires_grad
            and keys.dtype == k.dtype and values.dtype == v.dtype
            and all(_rows_ok(t) for t in (q, keys, k, values, v)))


def _launch(ka: torch.Tensor, kb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            rot: torch.Tensor, raw: torch.Tensor | None = None, drop: int = 0,
            va: torch.Tensor | None = None, vb: torch.Tensor | None = None,
            vout: torch.Tensor | None = None) -> None:
    B, split, H, d = ka.shape
    n = split + kb.shape[1]
    pairs = H * d // 2
    if triton_interpreting():
        block_r, block_p, warps = 4, 32, 1
    else:  # 16 rows × 256 pairs: 8K elements in flight per program
        block_r, block_p, warps = 16, 256, 4
    grid = (B, triton.cdiv(n, block_r), triton.cdiv(pairs, block_p))
    write_raw, write_values = raw is not None, vout is not None
    raw_t = raw if raw is not None else rot
    va_t = va if va is not None else ka
    vb_t = vb if vb is not None else kb
    vout_t = vout if vout is not None else rot
    _operands_kernel[grid](
        ka, kb, ka.stride(0), ka.stride(1), kb.stride(0), kb.stride(1), cos, sin, cos.stride(0),
        rot, rot.stride(0), rot.stride(1), raw_t, raw_t.stride(0), raw_t.stride(1), drop,
        va_t, vb_t, va_t.stride(0), va_t.stride(1), vb_t.stride(0), vb_t.stride(1),
        vout_t, vout_t.stride(0), vout_t.stride(1), split, n, pairs,
        HALF=d // 2, WRITE_RAW=write_raw, WRITE_VALUES=write_values,
        BLOCK_R=block_r, BLOCK_P=block_p, num_warps=warps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, T, H, d]`` by tables ``[T, d/2]`` (one launch, no cache)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, x[:, :0], cos, sin, out)
    return out


class _FrozenOperands(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, ...]:
        B, past, H, d = keys.shape
        c = k.shape[1]
        n = past + c
        drop = max(0, n - keep)
        rotated = torch.empty(B, n, H, d, dtype=k.dtype, device=k.device)
        joined = torch.empty(B, n, H, d, dtype=v.dtype, device=v.device)
        kept = torch.empty(B, n - drop, H, d, dtype=k.dtype, device=k.device)
        _launch(keys, k, cos, sin, rotated, kept, drop, values, v, joined)
        q_rot = _rotate(q, cos[past:], sin[past:])
        ctx.save_for_backward(cos[past:], sin[past:])
        ctx.sizes = (past, c, n - drop)
        ctx.mark_non_differentiable(kept)
        return q_rot, rotated, joined, kept

    @staticmethod
    def backward(ctx: Any, g_q: torch.Tensor | None, g_rot: torch.Tensor | None,
                 g_joined: torch.Tensor | None, g_kept: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        past, c, _ = ctx.sizes
        # The transpose of a rotation is the rotation by minus the angle: the reference's
        # backward multiplies by the conjugate, the same products and sums.
        neg = -sin
        dq = _rotate(g_q.contiguous(), cos, neg) if g_q is not None else None
        dk = (_rotate(g_rot[:, past:].contiguous(), cos, neg)
              if g_rot is not None else None)
        dv = g_joined[:, past:] if g_joined is not None else None
        return dq, None, dk, None, dv, None, None, None


def triton_frozen_operands(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                           values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, keep: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tttlm.ops.rope.frozen_chunk_operands` in two Triton launches (see the module
    docstring); check :func:`triton_operands_can_run` first. The raw keys kept for the next
    chunk carry no gradient (a frozen cache)."""
    out = _FrozenOperands.apply(q, keys, k, values, v, cos, sin, keep)
    return out[0], out[1], out[2], out[3]
