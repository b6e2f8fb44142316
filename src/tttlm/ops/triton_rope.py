"""A frozen TTT chunk's attention operands in one Triton pass over the cache (GPU prefill).

:func:`tttlm.ops.rope.frozen_chunk_operands` is the reference: RoPE of the cached keys and the
chunk's keys at their local positions, the values of cache ⊕ chunk, the raw keys the next
chunk keeps, and the rotated queries. Written with ``torch.cat`` and :func:`apply_rope` that
is three concatenations and a rotation, each a pass over the whole cache; Inductor fuses them
into three kernels of its own, which ran at a fifth of the H200's bandwidth (dynamic shapes,
interleaved pairs). Here one kernel reads every row once and writes the three outputs (a
launch for the cached rows, one for the chunk's), and a third launch rotates the queries.

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

from tttlm.ops.cache_swap import CacheSwap, distance
from tttlm.ops.triton_runtime import triton_interpreting


@triton.jit
def _rows_kernel(X, x_sb, x_sr, COS, SIN, t_sr, ROT, rot_sb, rot_sr,
                 RAW, raw_sb, raw_sr, V, v_sb, v_sr, VOUT, vo_sb, vo_sr,
                 VNEXT, vn_sb, vn_sr, PARITY, x_alt, v_alt, raw_alt, vn_alt,
                 dst0, drop, n, width,
                 HALF: tl.constexpr, WRITE_RAW: tl.constexpr, WRITE_VALUES: tl.constexpr,
                 WRITE_VNEXT: tl.constexpr, SWAP: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Rows ``0 .. n-1`` of ``X`` (``width`` = heads × d elements each, contiguous) rotated by
    the tables' rows into ``ROT``'s rows ``dst0 + r``; with ``WRITE_RAW`` the unrotated rows
    into ``RAW``'s rows ``dst0 + r - drop`` (those not dropped); with ``WRITE_VALUES`` ``V``'s
    rows into ``VOUT``'s rows ``dst0 + r``, and with ``WRITE_VNEXT`` into ``VNEXT``'s rows
    ``dst0 + r - drop`` too. ``SWAP``: two buffer sets, ``*_alt`` elements apart, the one to
    read chosen by the device's ``PARITY`` (``X``, ``V`` moved by ``parity · alt``) and the
    other written (``RAW``, ``VNEXT`` moved by ``(1 - parity) · alt``). Grid: (batch, row
    blocks, element blocks).

    Tiles are whole runs of a row's elements (vector loads and stores); the interleaved pairs
    are split and joined in registers."""
    if SWAP:  # (a CUDA graph replays one launch: the sets are chosen where it runs)
        par = tl.load(PARITY).to(tl.int64)
        X += par * x_alt
        V += par * v_alt
        RAW += (1 - par) * raw_alt
        VNEXT += (1 - par) * vn_alt
    b = tl.program_id(0).to(tl.int64)  # batch offsets of large caches pass 2**31
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    e = (tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E))[None, :]
    valid = (r < n) & (e < width)
    x = tl.load(X + b * x_sb + r * x_sr + e, mask=valid, other=0.0)
    re, im = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_E // 2, 2)))
    p = (tl.program_id(2) * (BLOCK_E // 2) + tl.arange(0, BLOCK_E // 2))[None, :]
    in_table = (r < n) & (p < width // 2)
    i = p % HALF
    cos = tl.load(COS + r * t_sr + i, mask=in_table, other=0.0)
    sin = tl.load(SIN + r * t_sr + i, mask=in_table, other=0.0)
    x_re = re.to(cos.dtype)
    x_im = im.to(cos.dtype)
    out = tl.join(x_re * cos - x_im * sin, x_re * sin + x_im * cos)
    out = tl.reshape(out, (BLOCK_R, BLOCK_E)).to(ROT.dtype.element_ty)
    row = dst0 + r
    tl.store(ROT + b * rot_sb + row * rot_sr + e, out, mask=valid)
    if WRITE_RAW:
        tl.store(RAW + b * raw_sb + (row - drop) * raw_sr + e, x, mask=valid & (row >= drop))
    if WRITE_VALUES:
        val = tl.load(V + b * v_sb + r * v_sr + e, mask=valid, other=0.0)
        tl.store(VOUT + b * vo_sb + row * vo_sr + e, val, mask=valid)
        if WRITE_VNEXT:
            tl.store(VNEXT + b * vn_sb + (row - drop) * vn_sr + e, val,
                     mask=valid & (row >= drop))


def _rows_ok(x: torch.Tensor) -> bool:
    """``[B, T, H, d]`` with each row's ``H × d`` elements contiguous (batch and row strides
    free): a projection's view or a slice of a cache."""
    return x.dim() == 4 and x.stride(3) == 1 and x.stride(2) == x.shape[3]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel reads it: as it is when :func:`_rows_ok` (a slice of rows needs no
    copy), else a contiguous copy (a gradient laid out heads-first, say)."""
    return x if _rows_ok(x) else x.contiguous()


def triton_operands_can_run(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                            values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`triton_frozen_operands` takes these: interleaved tables, a cache that
    wants no gradient, one dtype for keys and values, rows laid out as :func:`_rows_ok`."""
    d = q.shape[-1]
    return (d % 2 == 0 and cos.shape[-1] == d // 2 and cos.is_contiguous()
            and not keys.requires_grad and not values.requires_grad
            and keys.dtype == k.dtype and values.dtype == v.dtype
            and all(_rows_ok(t) for t in (q, keys, k, values, v)))


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor,
            dst0: int = 0, raw: torch.Tensor | None = None, drop: int = 0,
            values: torch.Tensor | None = None, vout: torch.Tensor | None = None,
            vnext: torch.Tensor | None = None,
            swap: tuple[torch.Tensor, int, int, int, int] | None = None) -> None:
    """One source's rows ``x [B, n, H, d]`` into rows ``dst0 ..`` of the outputs (see
    :func:`_rows_kernel`); the tables hold ``x``'s rows. ``swap``: ``(parity, x_alt, v_alt,
    raw_alt, vnext_alt)``, the sets' distances in elements."""
    B, n, H, d = x.shape
    if n == 0:
        return
    width = H * d
    if triton_interpreting():
        block_r, block_e, warps = 4, 16, 1
    else:  # 8 rows × 512 elements per program: 16-byte vectors, 4K elements in flight
        block_r, block_e, warps = 8, 512, 4
    grid = (B, triton.cdiv(n, block_r), triton.cdiv(width, block_e))
    raw_t = raw if raw is not None else rot
    v_t = values if values is not None else x
    vout_t = vout if vout is not None else rot
    vnext_t = vnext if vnext is not None else rot
    parity, *alts = swap if swap is not None else (rot, 0, 0, 0, 0)
    _rows_kernel[grid](
        x, x.stride(0), x.stride(1), cos, sin, cos.stride(0), rot, rot.stride(0), rot.stride(1),
        raw_t, raw_t.stride(0), raw_t.stride(1), v_t, v_t.stride(0), v_t.stride(1),
        vout_t, vout_t.stride(0), vout_t.stride(1), vnext_t, vnext_t.stride(0),
        vnext_t.stride(1), parity, *alts, dst0, drop, n, width,
        HALF=d // 2, WRITE_RAW=raw is not None, WRITE_VALUES=vout is not None,
        WRITE_VNEXT=vnext is not None, SWAP=swap is not None,
        BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, T, H, d]`` by tables ``[T, d/2]`` (one launch, no cache)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, out)
    return out


class _FrozenOperands(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep: int, swap: CacheSwap | None) -> tuple[torch.Tensor, ...]:
        B, past, H, d = keys.shape
        c = k.shape[1]
        n = past + c
        drop = max(0, n - keep)
        rotated = torch.empty(B, n, H, d, dtype=k.dtype, device=k.device)
        joined = torch.empty(B, n, H, d, dtype=v.dtype, device=v.device)
        if swap is None:
            kept = torch.empty(B, n - drop, H, d, dtype=k.dtype, device=k.device)
            vnext, cached, own = None, None, None
        else:  # (the first set's views; the kernel moves them to the parity's sets)
            kept, vnext = swap.next_keys[0], swap.next_values[0]
            if kept.shape[1] != n - drop or vnext.shape[1] != n - drop:
                raise ValueError(f"cache swap: next caches of {kept.shape[1]} rows for "
                                 f"{n - drop}")
            to_next = (distance(swap.next_keys), distance(swap.next_values))
            cached = (swap.parity, distance(swap.keys), distance(swap.values), *to_next)
            own = (swap.parity, 0, 0, *to_next)
        # The cached rows, then the chunk's: one launch each, every row read once.
        _launch(keys, cos[:past], sin[:past], rotated, 0, kept, drop, values, joined, vnext,
                cached)
        _launch(k, cos[past:], sin[past:], rotated, past, kept, drop, v, joined, vnext, own)
        q_rot = _rotate(q, cos[past:], sin[past:])
        ctx.save_for_backward(cos[past:], sin[past:])
        ctx.past = past
        # (otherwise autograd hands the backward a tensor of zeros for every output without a
        # gradient, the kept keys always: a fill as large as the cache, read by nothing)
        ctx.set_materialize_grads(False)
        if swap is not None:
            return q_rot, rotated, joined
        ctx.mark_non_differentiable(kept)
        return q_rot, rotated, joined, kept

    @staticmethod
    def backward(ctx: Any, g_q: torch.Tensor | None, g_rot: torch.Tensor | None,
                 g_joined: torch.Tensor | None, *g_kept: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        past = ctx.past
        # The transpose of a rotation is the rotation by minus the angle: the reference's
        # backward multiplies by the conjugate, the same products and sums.
        neg = -sin
        dq = _rotate(_rows(g_q), cos, neg) if g_q is not None else None
        dk = _rotate(_rows(g_rot[:, past:]), cos, neg) if g_rot is not None else None
        dv = g_joined[:, past:] if g_joined is not None else None
        return dq, None, dk, None, dv, None, None, None, None


def triton_frozen_operands(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                           values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, keep: int, swap: CacheSwap | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor | None]:
    """:func:`tttlm.ops.rope.frozen_chunk_operands` in three Triton launches (see the module
    docstring); check :func:`triton_operands_can_run` first. The raw keys kept for the next
    chunk carry no gradient (a frozen cache). ``swap``: ``keys``, ``values`` are its first
    set's views; the launches read the set its parity names and write the next cache into
    the other (nothing returned for it)."""
    out = _FrozenOperands.apply(q, keys, k, values, v, cos, sin, keep, swap)
    return out[0], out[1], out[2], (out[3] if swap is None else None)
