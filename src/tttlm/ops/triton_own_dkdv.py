"""The key and value gradients of a TTT chunk's own keys, in one Triton pass (GPU).

A frozen chunk (:mod:`tttlm.ops.attention.frozen`) attends over its cache and its own keys; only
its own keys want a gradient. Query ``i`` sees own key ``j`` where ``j <= i`` (the chunk is no
longer than the window, so the window never cuts inside it). With the forward's log-sum-exp
and ``D_i = Σ_d dO_id O_id`` over *all* the keys (the merged output), the own keys' gradients
are exact on their own: ``P_ij = exp(scale · q_i·k_j − lse_i)``,
``dv_j = Σ_i P_ij dO_i``, ``dk_j = scale · Σ_i P_ij (dO_i·v_j − D_i) q_i``. Each program holds
one tile of keys and walks the query tiles from the diagonal down (the causal half only).

This replaces FlashAttention's backward on the chunk's own keys at one sequence, where that
kernel (its head width 80 padded to 96, a 1024-query square at batch 1) runs far below its
rate; the own keys' share of dq comes from :func:`tttlm.ops.triton_frozen_dq.frozen_dq`
(``own=True``). The head width is split into two powers of two, as there. The reference is
:func:`tttlm.ops.attention.frozen.own_dkdv_reference`.

This module imports Triton at import time; reach it through
:mod:`tttlm.ops.attention.frozen`, which checks availability first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tttlm.ops.triton_tiles import head_split, tile_config

# Tiles (keys, queries), warps, pipeline stages. The fastest of four tried at 3b's shapes on
# an H100 with the scores formed queries by keys, as this kernel did before (0.181 ms at one
# sequence, against 0.26-0.45 for 128 x 64/8/2, 64 x 32/4/3 and 32 x 64/4/3:
# benchmarks/results/prefill_targets_3b_h100.md; some of those spilled,
# benchmarks/results/kernel_sm90_cpu.md); TTTLM_OWN_DKDV="BN,BM,WARPS,STAGES" overrides it.
DEFAULT_CONFIG = (64, 64, 4, 3)


@triton.jit
def _dkdv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, cols, start, q_at, do_at, sq_t, sdo_t,
               LSE_at, DELTA_at, da, db, C, qk_scale, BM: tl.constexpr, DB: tl.constexpr,
               CAUSAL: tl.constexpr):
    """One tile of ``BM`` queries into the key tile's accumulators (``kb, vb, dkb, dvb``: the
    head's second part, placeholders when ``DB`` is 0). ``CAUSAL``: the diagonal crosses the
    tile (and the chunk's end may: rows past ``C`` are masked there too).

    The scores are formed transposed, keys by queries (``k qᵀ``, ``v dOᵀ``): the
    probabilities and ``dS`` then feed ``dv`` and ``dk`` as they are, where ``q kᵀ`` would
    need both transposed in registers (a round trip through shared memory per tile)."""
    rows = start + tl.arange(0, BM)
    row_ok = rows < C
    qa = tl.load(q_at + rows[:, None] * sq_t + da[None, :], mask=row_ok[:, None], other=0.0)
    doa = tl.load(do_at + rows[:, None] * sdo_t + da[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE_at + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # (log2 units)
    delta = tl.load(DELTA_at + rows, mask=row_ok, other=0.0)
    if DB > 0:
        qb = tl.load(q_at + rows[:, None] * sq_t + db[None, :], mask=row_ok[:, None], other=0.0)
        dob = tl.load(do_at + rows[:, None] * sdo_t + db[None, :], mask=row_ok[:, None],
                      other=0.0)
    else:  # placeholders, never read
        qb, dob = qa, doa
    # The scores' products first, both head parts, then dO's: the exponentials need only the
    # first, so the second may still run.
    st = tl.dot(ka, tl.trans(qa))  # [BN, BM]
    if DB > 0:
        st += tl.dot(kb, tl.trans(qb))
    dpt = tl.dot(va, tl.trans(doa))
    if DB > 0:
        dpt += tl.dot(vb, tl.trans(dob))
    pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    if CAUSAL:
        pt = tl.where((cols[:, None] <= rows[None, :]) & row_ok[None, :], pt, 0.0)
    dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
    pt = pt.to(qa.dtype)
    dva += tl.dot(pt, doa)
    dka += tl.dot(dst, qa)
    if DB > 0:
        dvb += tl.dot(pt, dob)
        dkb += tl.dot(dst, qb)
    return dka, dkb, dva, dvb


@triton.jit
def _own_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                     sdo_b, sdo_t, sdo_h, sl_b, sl_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                     H, C, scale,
                     BN: tl.constexpr, BM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """One tile of ``BN`` of the chunk's own keys of one head. ``K, V`` point at the chunk's
    first own key; ``LSE`` is the forward's log-sum-exp (natural log), ``DELTA`` the rows'
    ``D``, both ``[B, H, C]`` fp32 with the same strides. Grid: (key tiles, batch × heads)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # (offsets of large batches pass 2**31)
    h = (bh % H).to(tl.int64)
    first = pid_n * BN
    cols = first + tl.arange(0, BN)
    col_ok = cols < C
    da = tl.arange(0, DA)
    k_at = K + b * sk_b + h * sk_h + cols[:, None] * sk_t
    v_at = V + b * sv_b + h * sv_h + cols[:, None] * sv_t
    ka = tl.load(k_at + da[None, :], mask=col_ok[:, None], other=0.0)
    va = tl.load(v_at + da[None, :], mask=col_ok[:, None], other=0.0)
    dka = tl.zeros([BN, DA], dtype=tl.float32)
    dva = tl.zeros([BN, DA], dtype=tl.float32)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        kb = tl.load(k_at + db[None, :], mask=col_ok[:, None], other=0.0)
        vb = tl.load(v_at + db[None, :], mask=col_ok[:, None], other=0.0)
        dkb = tl.zeros([BN, DB], dtype=tl.float32)
        dvb = tl.zeros([BN, DB], dtype=tl.float32)
    else:  # placeholders, never read
        db, kb, vb, dkb, dvb = da, ka, va, dka, dva
    q_at = Q + b * sq_b + h * sq_h
    do_at = DO + b * sdo_b + h * sdo_h
    lse_at = LSE + b * sl_b + h * sl_h
    delta_at = DELTA + b * sl_b + h * sl_h
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x · log2 e)
    # Query tiles: [lo, full) cross the diagonal (a query tile starting before the key
    # tile's last key), [full, C) see every key of the tile; the last may run past C.
    lo = (first // BM) * BM
    full = tl.minimum(tl.cdiv(first + BN, BM) * BM, C)
    for start in range(lo, full, BM):
        dka, dkb, dva, dvb = _dkdv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, cols, start, q_at,
                                        do_at, sq_t, sdo_t, lse_at, delta_at, da, db, C,
                                        qk_scale, BM, DB, True)
    whole = tl.maximum(full, lo) + ((C - tl.maximum(full, lo)) // BM) * BM
    for start in range(tl.maximum(full, lo), whole, BM):
        dka, dkb, dva, dvb = _dkdv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, cols, start, q_at,
                                        do_at, sq_t, sdo_t, lse_at, delta_at, da, db, C,
                                        qk_scale, BM, DB, False)
    for start in range(whole, C, BM):  # the chunk's partial last query tile
        dka, dkb, dva, dvb = _dkdv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, cols, start, q_at,
                                        do_at, sq_t, sdo_t, lse_at, delta_at, da, db, C,
                                        qk_scale, BM, DB, True)
    dk_at = DK + b * sdk_b + h * sdk_h + cols[:, None] * sdk_t
    dv_at = DV + b * sdv_b + h * sdv_h + cols[:, None] * sdv_t
    tl.store(dk_at + da[None, :], (dka * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_at + da[None, :], dva.to(DV.dtype.element_ty), mask=col_ok[:, None])
    if DB > 0:
        tl.store(dk_at + db[None, :], (dkb * scale).to(DK.dtype.element_ty),
                 mask=col_ok[:, None])
        tl.store(dv_at + db[None, :], dvb.to(DV.dtype.element_ty), mask=col_ok[:, None])


def own_dkdv(q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor, out: torch.Tensor,
             dout: torch.Tensor, lse: torch.Tensor, scale: float,
             dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dk, dv [B, c, H, d]`` of a chunk's own keys ``k_own, v_own`` (causal: query ``i``
    sees own key ``j <= i``) for ``q, out, dout [B, c, H, d]``, in ``k_own``'s dtype.
    ``lse [B, H, c]`` (fp32, natural log of the scaled scores) and ``out`` are the forward's
    over *all* the keys (cache and own), which makes these the own keys' exact gradients.
    ``dk, dv``: where to write them (views of larger gradients, any row strides).
    ``delta``: the rows' ``D = Σ_d dO·O`` ``[B, H, c]`` fp32, contiguous, where a kernel has
    it already (:func:`~tttlm.ops.triton_frozen_dq.frozen_dq`'s ``delta_out``); else computed
    here."""
    B, c, H, d = q.shape
    split = head_split(d)
    if split is None:
        raise ValueError(f"head width {d} is not two powers of two of at least 16")
    if k_own.shape[1] != c or v_own.shape[1] != c:
        raise ValueError(f"own keys {k_own.shape[1]}, values {v_own.shape[1]} for a chunk of {c}")
    if any(t.stride(-1) != 1 for t in (q, k_own, v_own, dout)):
        raise ValueError("own_dkdv reads rows whose last axis is contiguous")
    # Per row, once: D = Σ dO·O ([B, H, c] fp32, the log-sum-exp's layout)
    if delta is None:
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    elif delta.shape != (B, H, c) or delta.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError(f"delta: [B, H, c] = {[B, H, c]} fp32 contiguous, not "
                         f"{list(delta.shape)} {delta.dtype}")
    lse = lse.float().contiguous()
    bn, bm, warps, stages = tile_config("TTTLM_OWN_DKDV", DEFAULT_CONFIG)
    dk = torch.empty_like(k_own) if dk is None else dk
    dv = torch.empty_like(v_own) if dv is None else dv
    if dk.shape != k_own.shape or dv.shape != v_own.shape or dk.stride(-1) != 1 or (
            dv.stride(-1) != 1):
        raise ValueError("own_dkdv writes dk, dv of the own keys' shape, last axis contiguous")
    grid = (triton.cdiv(c, bn), B * H)
    _own_dkdv_kernel[grid](
        q, k_own, v_own, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k_own.stride(0), k_own.stride(1),
        k_own.stride(2), v_own.stride(0), v_own.stride(1), v_own.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, c, scale,
        BN=bn, BM=bm, DA=split[0], DB=split[1], num_warps=warps, num_stages=stages)
    return dk, dv
