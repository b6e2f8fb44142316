"""A TTT chunk's attention forward over its cache and its own keys, in one Triton pass (GPU).

Query ``i`` of a chunk of ``c`` (position ``P + i``, after a cache of ``P`` keys) sees keys
``j`` with ``0 <= P + i - j < window``: the window's lower edge over the cache, causal over the
chunk's own keys. The kernel returns the output and the log-sum-exp of the scaled scores
(fp32, natural log, ``[B, H, c]``), which is what FlashAttention's backward and
:func:`tttlm.ops.triton_frozen_dq.frozen_dq` read, so it can stand in for FlashAttention's
window forward in :mod:`tttlm.ops.attention.frozen`.

Why not FlashAttention's: it pads a head width of 80 to 96 and, at one sequence (what a 128K
prefill runs), launches 8 query tiles × 32 heads, two waves on 132 SMs at its 128-query tile.
Here the head width is split into two powers of two (80 = 64 + 16) as in the dq kernel, and the
masks run only on the tiles that need them: the window's edge and the causal diagonal.

With :data:`SETTLE_SHIFT` (48 by default; ``TTTLM_WINDOW_SETTLE``), the whole key tiles
after a query tile's first shift their scores by a value settled after that first one instead
of by the running maximum: the softmax needs a shift that keeps its terms in range, not the
maximum, and dropping it (the row maxima, their rescaling of the accumulators) cuts a whole
tile's instructions by about a quarter on sm_90 (``benchmarks/results/kernel_sm90_settle_cpu.md``).
A query tile whose sums leave range starts over with the running maximum. fp16 operands keep
the running maximum: their exponent range cannot hold the shifted terms (``2**-SETTLE`` and
below underflow when cast for the products).

With no cache (``P = 0``) the same pass is a whole sequence's sliding-window (or causal)
attention: the prefix blocks' forward without gradient, with tiles of its own
(:data:`SEQUENCE_CONFIG`), through :mod:`tttlm.ops.attention.window_sequence`.

Its reference is :func:`tttlm.ops.attention.frozen.window_forward_reference` (dense, fp32 or
fp64). This module imports Triton at import time; reach it through
:mod:`tttlm.ops.attention.frozen`, which checks availability first.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tttlm.ops.triton_kv import key_tile, kv_operands
from tttlm.ops.triton_tiles import head_split, tile_config

# Tiles (queries, keys), warps, pipeline stages. Measured on one H100 at 3b's shapes (cache
# 8192, chunk 1024, 32 heads of 80; benchmarks/results/frozen_dq_3b_h100.md), the kernel at
# one sequence: 64x64 with 4 warps and 4 stages 0.308 ms, 64x32/4/3 0.316, 128x32/4/3 0.325,
# 64x64/4/3 0.374, 128x64/8/2 0.458; FlashAttention's window forward 0.429. The first two are
# within noise of each other at two sequences too (0.565, 0.577); the whole-step table was
# timed with 64x32/4/3. TTTLM_WINDOW_FWD="BM,BN,WARPS,STAGES" overrides it
# (benchmarks/frozen_dq.py --fwd-configs times others).
# Retimed at 128x64/4/3 (the whole sequences' tiles, which the first sweep had not tried for
# chunks; prefill_tiles_groups_3b_h100.md, section 1): 0.281 ms against 64x32/4/3's 0.366 at one
# sequence, 0.593 against 0.658 at two; 3b e2e at 8K x 16 -7%, at 128K -1.2%.
DEFAULT_CONFIG = (128, 64, 4, 3)
# Whole sequences (no cache; benchmarks/results/prefill_targets_3b_h100.md, window_sequence.py):
# at 16 x 8K, 4 x 32K and 1 x 128K on one H100, 128x64/4/3 was the fastest of five tiles (13.8,
# 24.0, 27.7 ms a block, against 14.4 for cuDNN's causal attention and 27.8 and 29.7 for the
# cuDNN pieces); 64x32/4/3 (the chunk's) 16.7, 29.1, 32.2. TTTLM_WINDOW_SEQ overrides it.
SEQUENCE_CONFIG = (128, 64, 4, 3)

# Of the tiles every query sees whole, all but the first shift their scores by a settled
# value, this many (log2 units) above the rows' maxima after that first tile, instead of by
# the running maximum (0: the running maximum throughout, as FlashAttention 2). On one H100,
# 3b e2e prefill at 128K x 1 (benchmarks/results/prefill_settle_3b_h100.md): 0.02784 s per 1K
# at 48 against 0.02854 and 0.02822 at 0 (same tiles, one call). bf16 and fp32 only (see
# settle_shift). TTTLM_WINDOW_SETTLE overrides it.
SETTLE_SHIFT = 48


@triton.jit
def _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, start, k_at, v_at, sk_t, sv_t, da, db,
              N, P, WINDOW, qk_scale, KA, KB, VA, VB, b32, col_a, col_b,
              BN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
              MASK_EDGE: tl.constexpr, MASK_CAUSAL: tl.constexpr, DESC: tl.constexpr,
              FIXED: tl.constexpr = False):
    """One tile of ``BN`` keys into the running max ``m_i`` (log2 units), sum ``l_i`` and the
    accumulators (``qb, db, acc_b``: the head's second part, placeholders when ``DB`` is 0).
    ``MASK_EDGE``: the window's lower edge crosses the tile; ``MASK_CAUSAL``: the diagonal does
    (keys past ``N`` are masked there too: they lie past every query's own position).
    ``DESC``: keys and values through the descriptors ``KA, KB, VA, VB`` (the head's two
    parts, at columns ``col_a, col_b`` of sequence ``b32``) instead of pointers. ``FIXED``
    (a tile without masks): ``m_i`` is a settled shift, not a running max, and stays."""
    cols = start + tl.arange(0, BN)
    ka = key_tile(k_at, KA, b32, col_a, start, sk_t, da, N, BN, DA, MASK_CAUSAL, DESC)
    va = key_tile(v_at, VA, b32, col_a, start, sv_t, da, N, BN, DA, MASK_CAUSAL, DESC)
    s = tl.dot(qa, tl.trans(ka))
    if DB > 0:
        kb = key_tile(k_at, KB, b32, col_b, start, sk_t, db, N, BN, DB, MASK_CAUSAL, DESC)
        vb = key_tile(v_at, VB, b32, col_b, start, sv_t, db, N, BN, DB, MASK_CAUSAL, DESC)
        s = tl.dot(qb, tl.trans(kb), s)
    if MASK_CAUSAL or MASK_EDGE:
        s = s * qk_scale
        if MASK_CAUSAL:
            s = tl.where(cols[None, :] <= P + rows[:, None], s, float("-inf"))
        if MASK_EDGE:
            s = tl.where(P + rows[:, None] - cols[None, :] < WINDOW, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet (the window's edge starts past this tile for it)
        # keeps -inf; shifting by 0 there makes its terms 0 instead of exp2(-inf + inf) = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    else:
        # Every query sees every key of the tile (most tiles): the maximum is finite, and
        # the scale folds into the shift, one fused multiply-add an element instead of a
        # multiply and a subtraction (the softmax's elementwise work, not the products,
        # bounds this kernel at a head width of 80). max(s)·c = max(s·c) for c > 0.
        if FIXED:  # the shift m_i settled by the caller: no maximum, no rescaling
            p = tl.math.exp2(s * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            p = p.to(ka.dtype)
            acc_a = tl.dot(p, va, acc_a)
            if DB > 0:
                acc_b = tl.dot(p, vb, acc_b)
            return acc_a, acc_b, m_i, l_i
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(ka.dtype)
    # (the accumulating form: the products add into the rescaled accumulator in place)
    acc_a = tl.dot(p, va, acc_a * alpha[:, None])
    if DB > 0:
        acc_b = tl.dot(p, vb, acc_b * alpha[:, None])
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _window_fwd_kernel(Q, K, V, O, LSE, KA, KB, VA, VB,
                       sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                       so_b, so_t, so_h, sl_b, sl_h,
                       H, C, P, WINDOW, scale,
                       BM: tl.constexpr, BN: tl.constexpr, DA: tl.constexpr,
                       DB: tl.constexpr, HAS_WINDOW: tl.constexpr, DESC: tl.constexpr,
                       SETTLE: tl.constexpr):
    """One tile of ``BM`` queries of one head over the keys it sees. Grid: (query tiles,
    batch × heads). ``DESC``: keys and values through the tensor descriptors ``KA, KB, VA,
    VB`` (``[B, N, H · d]``, blocks of the head's two parts) instead of pointers."""
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
    N = P + C
    da = tl.arange(0, DA)
    q_at = Q + b * sq_b + h * sq_h + rows[:, None] * sq_t
    k_at = K + b * sk_b + h * sk_h
    v_at = V + b * sv_b + h * sv_h
    qa = tl.load(q_at + da[None, :], mask=row_ok[:, None], other=0.0)
    acc_a = tl.zeros([BM, DA], dtype=tl.float32)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        qb = tl.load(q_at + db[None, :], mask=row_ok[:, None], other=0.0)
        acc_b = tl.zeros([BM, DB], dtype=tl.float32)
    else:  # placeholders, never read
        db, qb, acc_b = da, qa, acc_a
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x · log2 e)
    # Key tiles: [lo, edge) cross the window's lower edge, [edge, diag) are seen whole by every
    # query of the tile, [diag, hi) cross the causal diagonal (the tile's own positions).
    hi = P + first + BM
    diag = ((P + first) // BN) * BN
    lo = 0
    edge = 0
    if HAS_WINDOW:  # the tile's first query sees keys from P + first + 1 - WINDOW on
        lo = (tl.maximum(P + first + 1 - WINDOW, 0) // BN) * BN
        # its last query does not see keys below P + first + BM - WINDOW
        edge = lo + tl.cdiv(tl.maximum(P + first + BM - WINDOW - lo, 0), BN) * BN
        edge = tl.minimum(edge, diag)
    for start in range(lo, edge, BN):
        acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, start, k_at,
                                           v_at, sk_t, sv_t, da, db, N, P, WINDOW, qk_scale,
                                           KA, KB, VA, VB, b32, col_a, col_b,
                                           BN, DA, DB, True, False, DESC)
    mid = tl.maximum(edge, lo)
    exact_from = mid  # where the whole tiles with the running maximum begin
    if SETTLE > 0:  # noqa: SIM102  (compiled in or not; the inner test runs on the GPU)
        if mid < diag:
            # The first whole tile with the running maximum: every row has seen keys.
            acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, mid,
                                               k_at, v_at, sk_t, sv_t, da, db, N, P, WINDOW,
                                               qk_scale, KA, KB, VA, VB, b32, col_a, col_b,
                                               BN, DA, DB, False, False, DESC)
            # Then the shift settles SETTLE above that maximum (an exact power of two) and
            # the other whole tiles shift by it: no maximum, no rescaling of the
            # accumulators (about a quarter of a tile's instructions, kernel_sm90_settle_cpu.md).
            # The softmax does not need the maximum, only a shift that keeps its terms in
            # range: the largest are then at least 2**-SETTLE, and one row's scores may
            # grow about SETTLE + 50 above the first tile's before the sums leave it.
            down = 2.0 ** (-SETTLE)
            acc_a = acc_a * down
            if DB > 0:
                acc_b = acc_b * down
            l_i = l_i * down
            m_i = m_i + SETTLE
            for start in range(mid + BN, diag, BN):
                acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, start,
                                                   k_at, v_at, sk_t, sv_t, da, db, N, P, WINDOW,
                                                   qk_scale, KA, KB, VA, VB, b32, col_a, col_b,
                                                   BN, DA, DB, False, False, DESC, True)
            exact_from = diag
            # Sums past 2**64 (or NaN): some score outgrew the shift; this tile of queries
            # starts over with the running maximum (one vote a query tile, rare).
            if tl.max(tl.where(l_i < 18446744073709551616.0, 0, 1), 0) > 0:
                acc_a = tl.zeros([BM, DA], dtype=tl.float32)
                if DB > 0:
                    acc_b = tl.zeros([BM, DB], dtype=tl.float32)
                m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([BM], dtype=tl.float32)
                for start in range(lo, edge, BN):
                    acc_a, acc_b, m_i, l_i = _fwd_tile(
                        acc_a, acc_b, m_i, l_i, qa, qb, rows, start, k_at, v_at, sk_t, sv_t,
                        da, db, N, P, WINDOW, qk_scale, KA, KB, VA, VB, b32, col_a, col_b,
                        BN, DA, DB, True, False, DESC)
                exact_from = mid
    for start in range(exact_from, diag, BN):
        acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, start, k_at,
                                           v_at, sk_t, sv_t, da, db, N, P, WINDOW, qk_scale,
                                           KA, KB, VA, VB, b32, col_a, col_b,
                                           BN, DA, DB, False, False, DESC)
    for start in range(tl.maximum(diag, lo), hi, BN):
        acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, rows, start, k_at,
                                           v_at, sk_t, sv_t, da, db, N, P, WINDOW, qk_scale,
                                           KA, KB, VA, VB, b32, col_a, col_b,
                                           BN, DA, DB, HAS_WINDOW, True, DESC)
    # Rows past C saw no key: keep them finite (they are not stored).
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_at = O + b * so_b + h * so_h + rows[:, None] * so_t
    tl.store(o_at + da[None, :], (acc_a / l_safe[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None])
    if DB > 0:
        tl.store(o_at + db[None, :], (acc_b / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + b * sl_b + h * sl_h + rows, lse, mask=row_ok)


def window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                   scale: float, sequence: bool = False, descriptors: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, c, H, d]`` over ``k, v [B, P + c, H, d]`` (a cache of ``P`` keys, then the
    chunk's own), query ``i`` seeing keys ``j`` with ``0 <= P + i - j < window`` (no lower
    bound for ``None``): the output in ``q``'s dtype and ``lse [B, H, c]`` (fp32, natural
    log of the scaled scores). The last axis of each input must be contiguous. ``sequence``:
    the tiles for whole sequences (:data:`SEQUENCE_CONFIG`) instead of a chunk's.
    ``descriptors``: read keys and values through tensor descriptors (the GPU's tensor
    copies) instead of pointers; ``None``: as :func:`~tttlm.ops.triton_kv.use_descriptors`
    decides."""
    B, c, H, d = q.shape
    split = head_split(d)
    if split is None:
        raise ValueError(f"head width {d} is not two powers of two of at least 16")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("window_forward reads rows whose last axis is contiguous")
    P = k.shape[1] - c
    if P < 0 or v.shape[1] != k.shape[1]:
        raise ValueError(f"keys {k.shape[1]} and values {v.shape[1]} for a chunk of {c}")
    bm, bn, warps, stages = (tile_config("TTTLM_WINDOW_SEQ", SEQUENCE_CONFIG) if sequence
                             else tile_config("TTTLM_WINDOW_FWD", DEFAULT_CONFIG))
    descriptors, ka, kb, va, vb = kv_operands(descriptors, k, v, bn, split, whole_sequence=sequence)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, c, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(c, bm), B * H)
    _window_fwd_kernel[grid](
        q, k, v, out, lse, ka, kb, va, vb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        H, c, P, window or 0, scale,
        BM=bm, BN=bn, DA=split[0], DB=split[1], HAS_WINDOW=window is not None,
        DESC=descriptors, SETTLE=settle_shift(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


def settle_shift(dtype: torch.dtype = torch.bfloat16) -> int:
    """:data:`SETTLE_SHIFT`, or ``TTTLM_WINDOW_SETTLE`` (0 to 64; 0 for off) where set; 0 for
    fp16 operands, whose products take the terms cast to fp16: a settled shift puts the
    largest at ``2**-SETTLE`` or below, where fp16 (smallest subnormal ``2**-24``) holds none
    of them at the default; bf16 has fp32's exponent range."""
    given = os.environ.get("TTTLM_WINDOW_SETTLE", "")
    if given and not (given.isdigit() and int(given) <= 64):
        raise ValueError(f"TTTLM_WINDOW_SETTLE={given!r}: give a whole number from 0 (off) "
                         "to 64")
    if dtype == torch.float16:
        return 0
    return int(given) if given else SETTLE_SHIFT
