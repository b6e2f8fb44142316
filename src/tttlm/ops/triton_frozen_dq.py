"""The query gradient of a TTT chunk's attention over a frozen cache, in one Triton pass (GPU).

Without an outer gradient (prefill, evaluation), the inner step differentiates a chunk's
attention once, and the cached keys and values are detached: their gradients are thrown away.
FlashAttention's backward computes them anyway: of the five products per key tile (``S = QKᵀ``,
``dP = dO Vᵀ``, ``dQ += dS K``, ``dK += dSᵀ Q``, ``dV += Pᵀ dO``), the last two are wasted over
the cache, which holds most of a chunk's keys (8192 of 9216 at 3b once the window is full).
This kernel runs the first three over the cache only: ``dq = scale · Σ_j P_ij (dP_ij − D_i) k_j``
with ``P`` recomputed from the forward's log-sum-exp and ``D_i = Σ_d dO_id O_id`` from the
*merged* output, so its share is exact for a cache that is one piece of a larger key set (the
chunk's own keys go through FlashAttention's backward, with the same output and log-sum-exp).

A head width that is not a power of two is split into two that are (80 = 64 + 16) instead of
padded (FlashAttention pads 80 to 96, ``flex_attention`` to 128). The reference is
:func:`tttlm.ops.attention.frozen.frozen_dq_reference` (dense, fp32 or fp64).

This module imports Triton at import time; reach it through
:mod:`tttlm.ops.attention.frozen`, which checks availability first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.triton_kv import key_tile, kv_operands
from tttlm.ops.triton_tiles import head_split, tile_config

# Tiles (queries, keys), warps, pipeline stages. Measured on one H100 at 3b's shapes (cache
# 8192, chunk 1024, 32 heads of 80; benchmarks/results/frozen_dq_3b_h100.md), the kernel alone
# at batch 1: 64x64 with 4 warps and 3 stages 0.299 ms, 128x32/4/3 0.320, 64x64/4/4 0.332,
# 128x64/8/2 (the first, untuned choice) 0.467. TTTLM_FROZEN_DQ="BM,BN,WARPS,STAGES"
# overrides it.
DEFAULT_CONFIG = (64, 64, 4, 3)


@triton.jit
def _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start, k_at, v_at, sk_t, sv_t,
             da, db, P, LIMIT, WINDOW, qk_scale, KA, KB, VA, VB, b32, col_a, col_b,
             BN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
             MASK_COLS: tl.constexpr, MASK_WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
             DESC: tl.constexpr):
    """One tile of ``BN`` keys into the accumulators (``qb, dob, db, acc_b``: the second part
    of the head, placeholders when ``DB`` is 0). Masks only where asked: keys from ``LIMIT``
    on (the cache's or the chunk's end, in its last tile), the window's lower edge (the first
    tiles a query tile reads), and the causal diagonal (the chunk's own keys). ``DESC``: keys
    and values through the descriptors ``KA, KB, VA, VB`` (the head's two parts at columns
    ``col_a, col_b`` of sequence ``b32``), whose rows past ``LIMIT`` are read (the chunk's own
    keys past the cache's) and masked out of ``p`` as the pointers' zeros are."""
    cols = start + tl.arange(0, BN)
    col_ok = cols < LIMIT
    ka = key_tile(k_at, KA, b32, col_a, start, sk_t, da, LIMIT, BN, DA, MASK_COLS, DESC)
    va = key_tile(v_at, VA, b32, col_a, start, sv_t, da, LIMIT, BN, DA, MASK_COLS, DESC)
    if DB > 0:
        kb = key_tile(k_at, KB, b32, col_b, start, sk_t, db, LIMIT, BN, DB, MASK_COLS, DESC)
        vb = key_tile(v_at, VB, b32, col_b, start, sv_t, db, LIMIT, BN, DB, MASK_COLS, DESC)
    s = tl.dot(qa, tl.trans(ka))
    dp = tl.dot(doa, tl.trans(va))
    if DB > 0:
        s += tl.dot(qb, tl.trans(kb))
        dp += tl.dot(dob, tl.trans(vb))
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASK_COLS:
        p = tl.where(col_ok[None, :], p, 0.0)
    if MASK_WINDOW:
        p = tl.where(P + rows[:, None] - cols[None, :] < WINDOW, p, 0.0)
    if CAUSAL:
        p = tl.where(cols[None, :] <= P + rows[:, None], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(ka.dtype)
    acc_a += tl.dot(ds, ka)
    if DB > 0:
        acc_b += tl.dot(ds, kb)
    return acc_a, acc_b


@triton.jit
def _frozen_dq_kernel(Q, K, V, O, DO, LSE, DQC, DQ, DELTA, KA, KB, VA, VB,
                      sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                      so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, sl_b, sl_h,
                      sc_b, sc_t, sc_h, sdq_b, sdq_t, sdq_h,
                      H, C, P, WINDOW, scale,
                      BM: tl.constexpr, BN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_DQC: tl.constexpr, OWN: tl.constexpr,
                      DESC: tl.constexpr, STORE_DELTA: tl.constexpr):
    """One tile of ``BM`` queries of one head: ``DQ = scale · Σ_j P (dP − D) k_j (+ DQC)``
    over the cache keys ``j < P`` that query ``i`` (position ``P + i``) sees:
    ``P + i − j < WINDOW``; with ``OWN``, over the chunk's own keys ``P <= j <= P + i`` too
    (the chunk is no longer than the window). Head width ``DA + DB`` (``DB`` 0 or a power of
    two). Grid: (query tiles, batch × heads). ``DESC``: keys and values through the tensor
    descriptors ``KA, KB, VA, VB`` instead of pointers. ``STORE_DELTA``: the rows'
    ``D = Σ dO·O`` written to ``DELTA`` (``[B, H, C]`` fp32, the log-sum-exp's strides) for
    the own keys' dk, dv kernel."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // H  # (descriptor coordinates are 32-bit)
    col_a = (bh % H) * (DA + DB)
    col_b = col_a + DA
    b = b32.to(tl.int64)  # (offsets of large batches pass 2**31)
    h = (bh % H).to(tl.int64)
    first = pid_m * BM
    rows = first + tl.arange(0, BM)
    row_ok = rows < C
    da = tl.arange(0, DA)
    q_at = Q + b * sq_b + h * sq_h + rows[:, None] * sq_t
    o_at = O + b * so_b + h * so_h + rows[:, None] * so_t
    do_at = DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t
    k_at = K + b * sk_b + h * sk_h
    v_at = V + b * sv_b + h * sv_h
    qa = tl.load(q_at + da[None, :], mask=row_ok[:, None], other=0.0)
    doa = tl.load(do_at + da[None, :], mask=row_ok[:, None], other=0.0)
    oa = tl.load(o_at + da[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(doa.to(tl.float32) * oa.to(tl.float32), 1)
    acc_a = tl.zeros([BM, DA], dtype=tl.float32)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        qb = tl.load(q_at + db[None, :], mask=row_ok[:, None], other=0.0)
        dob = tl.load(do_at + db[None, :], mask=row_ok[:, None], other=0.0)
        ob = tl.load(o_at + db[None, :], mask=row_ok[:, None], other=0.0)
        delta += tl.sum(dob.to(tl.float32) * ob.to(tl.float32), 1)
        acc_b = tl.zeros([BM, DB], dtype=tl.float32)
    else:  # placeholders, never read
        db, qb, dob, acc_b = da, qa, doa, acc_a
    lse = tl.load(LSE + b * sl_b + h * sl_h + rows, mask=row_ok, other=0.0).to(tl.float32)
    if STORE_DELTA:
        tl.store(DELTA + b * sl_b + h * sl_h + rows, delta, mask=row_ok)
    lse2 = lse * 1.4426950408889634  # exp(x) = exp2(x · log2 e)
    qk_scale = scale * 1.4426950408889634
    # Key tiles: [lo, edge) cross the window's lower edge (masked), [edge, full) are seen by
    # every query of the tile, [full, P) is the cache's partial last tile.
    full = (P // BN) * BN
    lo = 0
    edge = 0
    if HAS_WINDOW:  # the tile's first query sees keys from P + first + 1 - WINDOW on
        lo = (tl.maximum(P + first + 1 - WINDOW, 0) // BN) * BN
        # its last query does not see keys below P + first + BM - WINDOW
        edge = lo + tl.cdiv(tl.maximum(P + first + BM - WINDOW - lo, 0), BN) * BN
        edge = tl.minimum(edge, full)
    for start in range(lo, edge, BN):
        acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start, k_at,
                                v_at, sk_t, sv_t, da, db, P, P, WINDOW, qk_scale,
                                KA, KB, VA, VB, b32, col_a, col_b, BN, DA, DB,
                                False, True, False, DESC)
    for start in range(tl.maximum(edge, lo), full, BN):
        acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start, k_at,
                                v_at, sk_t, sv_t, da, db, P, P, WINDOW, qk_scale,
                                KA, KB, VA, VB, b32, col_a, col_b, BN, DA, DB,
                                False, False, False, DESC)
    for start in range(tl.maximum(full, lo), P, BN):
        acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start, k_at,
                                v_at, sk_t, sv_t, da, db, P, P, WINDOW, qk_scale,
                                KA, KB, VA, VB, b32, col_a, col_b, BN, DA, DB,
                                True, HAS_WINDOW, False, DESC)
    if OWN:  # own keys before the tile's first query: seen whole; then the diagonal's
        below = P + (first // BN) * BN
        for start in range(P, below, BN):
            acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start,
                                    k_at, v_at, sk_t, sv_t, da, db, P, P + C, WINDOW, qk_scale,
                                    KA, KB, VA, VB, b32, col_a, col_b, BN, DA, DB,
                                    False, False, False, DESC)
        for start in range(below, P + tl.minimum(first + BM, C), BN):
            acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, delta, lse2, rows, start,
                                    k_at, v_at, sk_t, sv_t, da, db, P, P + C, WINDOW, qk_scale,
                                    KA, KB, VA, VB, b32, col_a, col_b, BN, DA, DB,
                                    True, False, True, DESC)
    dq_at = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t
    dqc_at = DQC + b * sc_b + h * sc_h + rows[:, None] * sc_t
    acc_a = acc_a * scale
    if HAS_DQC:
        acc_a += tl.load(dqc_at + da[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_at + da[None, :], acc_a.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if DB > 0:
        acc_b = acc_b * scale
        if HAS_DQC:
            acc_b += tl.load(dqc_at + db[None, :], mask=row_ok[:, None],
                             other=0.0).to(tl.float32)
        tl.store(dq_at + db[None, :], acc_b.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def frozen_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              dout: torch.Tensor, lse: torch.Tensor, frozen: int, window: int | None,
              scale: float, dq_chunk: torch.Tensor | None = None, own: bool = False,
              descriptors: bool | None = None, delta_out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The query gradient from the first ``frozen`` keys of ``k, v [B, n, H, d]`` for
    ``q, out, dout [B, c, H, d]`` (query ``i`` at position ``frozen + i``), plus ``dq_chunk``
    (the rest of the keys' share) when given, or with ``own`` the rest of the keys' own share
    (the chunk's keys, causal: ``n = frozen + c``); in ``q``'s dtype. ``lse [B, H, c]`` (fp32,
    natural log of the scaled scores) and ``out`` are the forward's over *all* the keys.
    ``descriptors``: keys and values through tensor descriptors instead of pointers (``None``:
    as :func:`~tttlm.ops.triton_kv.use_descriptors` decides). ``delta_out``: where to write
    the rows' ``D = Σ_d dO·O`` (``[B, H, c]`` fp32 with ``lse``'s strides), which the kernel
    forms anyway (:func:`~tttlm.ops.triton_own_dkdv.own_dkdv` reads it)."""
    B, c, H, d = q.shape
    split = head_split(d)
    if split is None:
        raise ValueError(f"head width {d} is not two powers of two of at least 16")
    if own and (dq_chunk is not None or k.shape[1] != frozen + c):
        raise ValueError("own=True adds the chunk's own keys itself: no dq_chunk, and keys "
                         "= the cache + the chunk")
    if any(t.stride(-1) != 1 for t in (q, k, v, out, dout, lse)) or (
            dq_chunk is not None and dq_chunk.stride(-1) != 1):
        raise ValueError("frozen_dq reads rows whose last axis is contiguous")
    if delta_out is not None and (delta_out.shape != (B, H, c) or delta_out.stride() != lse.stride()
                                  or delta_out.dtype != torch.float32):
        raise ValueError("delta_out: [B, H, c] fp32 with the log-sum-exp's strides")
    bm, bn, warps, stages = tile_config("TTTLM_FROZEN_DQ", DEFAULT_CONFIG)
    descriptors, ka, kb, va, vb = kv_operands(descriptors, k, v, bn, split)
    dq = torch.empty_like(q)
    extra = dq_chunk if dq_chunk is not None else dq  # (unread without HAS_DQC)
    grid = (triton.cdiv(c, bm), B * H)
    _frozen_dq_kernel[grid](
        q, k, v, out, dout, lse, extra, dq, dq if delta_out is None else delta_out,
        ka, kb, va, vb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
        extra.stride(0), extra.stride(1), extra.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, c, frozen, window or 0, scale,
        BM=bm, BN=bn, DA=split[0], DB=split[1], HAS_WINDOW=window is not None,
        HAS_DQC=dq_chunk is not None, OWN=own, DESC=descriptors,
        STORE_DELTA=delta_out is not None, num_warps=warps, num_stages=stages)
    return dq
