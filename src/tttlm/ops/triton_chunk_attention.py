"""Triton chunk attention, differentiable twice, without an ``[H, c, past+c]`` score matrix.

The TTT blocks attend ``c`` queries (one chunk) over ``past + c`` keys (the rolling cache, then
the chunk) with the window mask of :func:`tttlm.ops.attention.window_mask`. The outer gradient
of TTT-E2E differentiates the inner gradient, so this attention needs a backward *and* a
backward of the backward. Everything below is Triton; nothing materialises scores in memory:

* forward (flash style): ``O`` and the row log-sum-exp ``LSE``;
* backward (an autograd Function of its own): ``dQ`` per query block and ``dK, dV`` per key
  block, recomputing ``P = exp(S - LSE)`` tile by tile;
* double backward: one pass for two row statistics, then query-block and key-block kernels
  for the cotangents of ``Q, K, V, dO`` (formulas in :class:`_ChunkAttentionBackward`).

Layout ``[B, T, H, d]`` (inputs are made contiguous); row statistics ``[B, H, Tq]`` in fp32
(fp64 for fp64 inputs, which only the interpreter runs). Scores, softmax and accumulators are
fp32; the operands of every tile product are cast to the input dtype, as FlashAttention does.

This module imports Triton at import time; import it only through
:func:`tttlm.ops.attention.chunk_attention`, which checks availability first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from tttlm.ops.triton_runtime import triton_interpreting

# Masked scores: finite so that a tile masked for a whole row never gives exp(-inf - -inf).
_NEG = tl.constexpr(-1.0e30)
# Above every position (an empty block's minimum).
_BIG = tl.constexpr(1 << 62)


@dataclass
class KernelConfig:
    """Tile sizes and launch options of one kernel (query block, key block)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# GPU configurations for d <= 128, chosen on an H100 (benchmarks/kernel sweep). Benchmarks may
# overwrite entries to sweep; the interpreter always uses 16 x 16 tiles (fast on CPU).
CONFIGS: dict[str, KernelConfig] = {
    "fwd": KernelConfig(128, 64, num_warps=8, num_stages=2),
    "bwd_dq": KernelConfig(64, 64, num_warps=4, num_stages=2),
    "bwd_dkdv": KernelConfig(64, 64, num_warps=4, num_stages=2),
    "dbl_stats": KernelConfig(64, 64, num_warps=4, num_stages=2),
    "dbl_dq": KernelConfig(64, 32, num_warps=4, num_stages=2),
    "dbl_dkdv": KernelConfig(32, 64, num_warps=4, num_stages=2),
}
_INTERPRETER_CONFIG = KernelConfig(16, 16, num_warps=1, num_stages=1)
# Skip the tiles that the window and causal masks cover wholly (_key_tiles, _query_tiles): the
# same results bit for bit with less work. A chunk over a full cache has 1024 of its 9216 keys
# out of every query block's window; at a shorter cache, half the chunk's own tile grid is
# above the causal diagonal. False runs every tile (what tests compare against).
SKIP_MASKED_TILES = True


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_rows(ptr, base, rows, n_rows, stride_t, offs_d, D: tl.constexpr):
    """A ``[len(rows), BD]`` tile of one (batch, head); out-of-range rows/columns read 0."""
    mask = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + base + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, base, rows, n_rows, stride_t, offs_d, value, D: tl.constexpr):
    mask = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    tl.store(ptr + base + rows[:, None] * stride_t + offs_d[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _seen(qp, kp, k_valid, window, HAS_WINDOW: tl.constexpr):
    """``0 <= qp - kp < window`` and ``kp >= 0`` for positions broadcast to a tile's shape."""
    diff = qp - kp
    ok = (diff >= 0) & (kp >= 0) & k_valid
    if HAS_WINDOW:
        ok = ok & (diff < window)
    return ok


@triton.jit
def _allowed(qp, kp, k_valid, window, HAS_WINDOW: tl.constexpr):
    """Window mask of a tile: ``0 <= qp - kp < window`` and ``kp >= 0`` (``[BM, BN]``)."""
    return _seen(qp[:, None], kp[None, :], k_valid[None, :], window, HAS_WINDOW)


@triton.jit
def _probs(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW: tl.constexpr,
           ACC: tl.constexpr, PREC: tl.constexpr):
    """Softmax probabilities of a tile recomputed from the saved row log-sum-exp."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    ok = _allowed(qp, kp, k_valid, window, HAS_WINDOW)
    return tl.where(ok, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _allowed_t(qp, kp, k_valid, window, HAS_WINDOW: tl.constexpr):
    """:func:`_allowed` transposed, keys by queries (``[BN, BM]``)."""
    return _seen(qp[None, :], kp[:, None], k_valid[:, None], window, HAS_WINDOW)


@triton.jit
def _probs_t(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """:func:`_probs` transposed, ``Pᵀ`` keys by queries, from ``k qᵀ``: the key-block kernels
    feed it (and ``dSᵀ``) to their products as it is, where ``P`` would be transposed in
    registers (a round trip through shared memory per tile)."""
    st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC) * scale
    ok = _allowed_t(qp, kp, k_valid, window, HAS_WINDOW)
    return tl.where(ok, tl.exp(st - lse[None, :]), 0.0)


@triton.jit
def _key_tiles(KP, Tk, qp, r_valid, window, HAS_WINDOW: tl.constexpr, BN: tl.constexpr):
    """``[lo, hi)``: the key tiles (on the grid of ``BN`` from 0) that hold a key some valid
    row of this query block may see. A superset from the block's extreme positions (a key at
    ``kp`` is seen only if ``0 <= kp <= max qp`` and ``kp > min qp - window``); positions need
    not be sorted. Tiles outside it are wholly masked: they add exactly nothing (``P = 0``, the
    running maximum unchanged), so skipping them leaves every result bit for bit the same."""
    q_hi = tl.max(tl.where(r_valid, qp, -1), 0)
    q_lo = tl.min(tl.where(r_valid, qp, _BIG), 0)
    lo = Tk
    hi = 0
    for start_n in range(0, Tk, BN):
        cols = start_n + tl.arange(0, BN)
        kp = tl.load(KP + cols, mask=cols < Tk, other=-1)
        seen = (kp >= 0) & (kp <= q_hi)
        if HAS_WINDOW:
            seen = seen & (kp > q_lo - window)
        any_seen = tl.max(seen.to(tl.int32), 0) > 0
        lo = tl.where(any_seen & (start_n < lo), start_n, lo)
        hi = tl.where(any_seen, start_n + BN, hi)
    return lo, hi


@triton.jit
def _query_tiles(QP, Tq, kp, k_valid, window, HAS_WINDOW: tl.constexpr, BM: tl.constexpr):
    """``[lo, hi)``: the query tiles (grid of ``BM`` from 0) with a row that may see a key of
    this key block (``qp >= min kp`` and ``qp < max kp + window`` over its keys at ``kp >= 0``);
    see :func:`_key_tiles`."""
    valid = k_valid & (kp >= 0)
    k_lo = tl.min(tl.where(valid, kp, _BIG), 0)
    k_hi = tl.max(tl.where(valid, kp, -1), 0)
    lo = Tq
    hi = 0
    for start_m in range(0, Tq, BM):
        rows = start_m + tl.arange(0, BM)
        qp = tl.load(QP + rows, mask=rows < Tq, other=-1)
        seen = (rows < Tq) & (qp >= k_lo)
        if HAS_WINDOW:
            seen = seen & (qp < k_hi + window)
        any_seen = tl.max(seen.to(tl.int32), 0) > 0
        lo = tl.where(any_seen & (start_m < lo), start_m, lo)
        hi = tl.where(any_seen, start_m + BM, hi)
    return lo, hi


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QP, KP, sq_b, sk_b, s_t, H, Tq, Tk, window, scale,
                D: tl.constexpr, HAS_WINDOW: tl.constexpr, SKIP: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
    qp = tl.load(QP + rows, mask=rows < Tq, other=0)
    m_i = tl.full([BM], _NEG, dtype=ACC)
    l_i = tl.zeros([BM], dtype=ACC)
    acc = tl.zeros([BM, BD], dtype=ACC)
    if SKIP:
        n_lo, n_hi = _key_tiles(KP, Tk, qp, rows < Tq, window, HAS_WINDOW, BN)
    else:
        n_lo, n_hi = 0, Tk
    for start_n in range(n_lo, n_hi, BN):
        cols = start_n + tl.arange(0, BN)
        k_valid = cols < Tk
        k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
        v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
        kp = tl.load(KP + cols, mask=k_valid, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        ok = _allowed(qp, kp, k_valid, window, HAS_WINDOW)
        s = tl.where(ok, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC,
                                            out_dtype=ACC)
        m_i = m_new
    # Rows past Tq (padding) have l_i = 0; they are not stored, the guard only avoids NaN.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    _store_rows(O, q_base, rows, Tq, s_t, offs_d, acc / l_safe[:, None], D)
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m_i + tl.log(l_safe), mask=rows < Tq)


# --------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DR, DQ, QP, KP, sq_b, sk_b, s_t, H, Tq, Tk, window, scale,
                   D: tl.constexpr, HAS_WINDOW: tl.constexpr, SKIP: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """``dQ = scale · dS K`` with ``dS = P ∘ (dO Vᵀ − Δ)``, ``Δ = rowsum(dO ∘ O)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    r_base = bh.to(tl.int64) * Tq
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
    do = _load_rows(DO, q_base, rows, Tq, s_t, offs_d, D)
    qp = tl.load(QP + rows, mask=rows < Tq, other=0)
    lse = tl.load(LSE + r_base + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DR + r_base + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BM, BD], dtype=ACC)
    if SKIP:
        n_lo, n_hi = _key_tiles(KP, Tk, qp, rows < Tq, window, HAS_WINDOW, BN)
    else:
        n_lo, n_hi = 0, Tk
    for start_n in range(n_lo, n_hi, BN):
        cols = start_n + tl.arange(0, BN)
        k_valid = cols < Tk
        k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
        v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
        kp = tl.load(KP + cols, mask=k_valid, other=0)
        p = _probs(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW, ACC, PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    _store_rows(DQ, q_base, rows, Tq, s_t, offs_d, dq * scale, D)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DR, DK, DV, QP, KP, sq_b, sk_b, s_t, H, Tq, Tk, window,
                     scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr, SKIP: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr):
    """``dV = Pᵀ dO`` and ``dK = scale · dSᵀ Q``, one key block per program."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    r_base = bh.to(tl.int64) * Tq
    cols = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    k_valid = cols < Tk
    k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
    v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
    kp = tl.load(KP + cols, mask=k_valid, other=0)
    dk = tl.zeros([BN, BD], dtype=ACC)
    dv = tl.zeros([BN, BD], dtype=ACC)
    if SKIP:
        m_lo, m_hi = _query_tiles(QP, Tq, kp, k_valid, window, HAS_WINDOW, BM)
    else:
        m_lo, m_hi = 0, Tq
    for start_m in range(m_lo, m_hi, BM):
        rows = start_m + tl.arange(0, BM)
        q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
        do = _load_rows(DO, q_base, rows, Tq, s_t, offs_d, D)
        qp = tl.load(QP + rows, mask=rows < Tq, other=0)
        lse = tl.load(LSE + r_base + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(DR + r_base + rows, mask=rows < Tq, other=0.0)
        # Padded query rows load q = dO = 0 but could still pass the mask: zero them in P.
        pt = _probs_t(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW, ACC, PREC)
        pt = tl.where((rows < Tq)[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC, out_dtype=ACC)
    _store_rows(DK, k_base, cols, Tk, s_t, offs_d, dk * scale, D)
    _store_rows(DV, k_base, cols, Tk, s_t, offs_d, dv, D)


# -------------------------------------------------------------------------- double backward
@triton.jit
def _dbl_tile(q, do, gq, k, v, gk, gv, qp, kp, k_valid, lse, delta, scale, window,
              HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """The tile quantities every double-backward kernel needs: P, dP, dS, G and dO gVᵀ."""
    p = _probs(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW, ACC, PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    ds = p * (dp - delta[:, None])
    g = (tl.dot(gq, tl.trans(k), input_precision=PREC, out_dtype=ACC)
         + tl.dot(q, tl.trans(gk), input_precision=PREC, out_dtype=ACC)) * scale
    dogv = tl.dot(do, tl.trans(gv), input_precision=PREC, out_dtype=ACC)
    return p, dp, ds, g, dogv


@triton.jit
def _dbl_tile_t(q, do, gq, k, v, gk, gv, qp, kp, k_valid, lse, scale, window,
                HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """:func:`_dbl_tile` transposed, keys by queries (``Pᵀ, dPᵀ, Gᵀ, gV dOᵀ``), for the
    key-block kernel (see :func:`_probs_t`), which forms ``dSᵀ`` once its padded rows are
    masked out of ``Pᵀ``."""
    pt = _probs_t(q, k, qp, kp, k_valid, lse, scale, window, HAS_WINDOW, ACC, PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
    gt = (tl.dot(k, tl.trans(gq), input_precision=PREC, out_dtype=ACC)
          + tl.dot(gk, tl.trans(q), input_precision=PREC, out_dtype=ACC)) * scale
    dogvt = tl.dot(gv, tl.trans(do), input_precision=PREC, out_dtype=ACC)
    return pt, dpt, gt, dogvt


@triton.jit
def _dbl_stats_kernel(Q, K, V, DO, GQ, GK, GV, LSE, DR, DBAR, CR, QP, KP, sq_b, sk_b, s_t, H,
                      Tq, Tk, window, scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      SKIP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr):
    """Row statistics ``Δ̄ = −rowsum(G ∘ P)`` and ``C = rowsum(P ∘ P̄)``.

    ``P̄ = dO gVᵀ + G ∘ (dP − Δ) + Δ̄ dP`` and ``rowsum(P ∘ dP) = Δ``, so
    ``C = rowsum(P ∘ (dO gVᵀ + G ∘ (dP − Δ))) + Δ̄ Δ`` needs one pass.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    r_base = bh.to(tl.int64) * Tq
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
    do = _load_rows(DO, q_base, rows, Tq, s_t, offs_d, D)
    gq = _load_rows(GQ, q_base, rows, Tq, s_t, offs_d, D)
    qp = tl.load(QP + rows, mask=rows < Tq, other=0)
    lse = tl.load(LSE + r_base + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DR + r_base + rows, mask=rows < Tq, other=0.0)
    dbar = tl.zeros([BM], dtype=ACC)
    c = tl.zeros([BM], dtype=ACC)
    if SKIP:
        n_lo, n_hi = _key_tiles(KP, Tk, qp, rows < Tq, window, HAS_WINDOW, BN)
    else:
        n_lo, n_hi = 0, Tk
    for start_n in range(n_lo, n_hi, BN):
        cols = start_n + tl.arange(0, BN)
        k_valid = cols < Tk
        k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
        v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
        gk = _load_rows(GK, k_base, cols, Tk, s_t, offs_d, D)
        gv = _load_rows(GV, k_base, cols, Tk, s_t, offs_d, D)
        kp = tl.load(KP + cols, mask=k_valid, other=0)
        p, dp, ds, g, dogv = _dbl_tile(q, do, gq, k, v, gk, gv, qp, kp, k_valid, lse, delta,
                                       scale, window, HAS_WINDOW, ACC, PREC)
        dbar -= tl.sum(g * p, 1)
        c += tl.sum(p * (dogv + g * (dp - delta[:, None])), 1)
    tl.store(DBAR + r_base + rows, dbar, mask=rows < Tq)
    tl.store(CR + r_base + rows, c + dbar * delta, mask=rows < Tq)


@triton.jit
def _dbl_dq_kernel(Q, K, V, O, DO, GQ, GK, GV, LSE, DR, DBAR, CR, QB, DOB, QP, KP, sq_b, sk_b,
                   s_t, H, Tq, Tk, window, scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   SKIP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BD: tl.constexpr):
    """``Q̄ = scale · (dS gK + S̄ K)`` and ``dŌ = P gV + (G ∘ P) V + Δ̄ O``, per query block."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    r_base = bh.to(tl.int64) * Tq
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    r_valid = rows < Tq
    q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
    do = _load_rows(DO, q_base, rows, Tq, s_t, offs_d, D)
    gq = _load_rows(GQ, q_base, rows, Tq, s_t, offs_d, D)
    qp = tl.load(QP + rows, mask=r_valid, other=0)
    lse = tl.load(LSE + r_base + rows, mask=r_valid, other=0.0)
    delta = tl.load(DR + r_base + rows, mask=r_valid, other=0.0)
    dbar = tl.load(DBAR + r_base + rows, mask=r_valid, other=0.0)
    c = tl.load(CR + r_base + rows, mask=r_valid, other=0.0)
    qbar = tl.zeros([BM, BD], dtype=ACC)
    dobar = tl.zeros([BM, BD], dtype=ACC)
    if SKIP:
        n_lo, n_hi = _key_tiles(KP, Tk, qp, rows < Tq, window, HAS_WINDOW, BN)
    else:
        n_lo, n_hi = 0, Tk
    for start_n in range(n_lo, n_hi, BN):
        cols = start_n + tl.arange(0, BN)
        k_valid = cols < Tk
        k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
        v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
        gk = _load_rows(GK, k_base, cols, Tk, s_t, offs_d, D)
        gv = _load_rows(GV, k_base, cols, Tk, s_t, offs_d, D)
        kp = tl.load(KP + cols, mask=k_valid, other=0)
        p, dp, ds, g, dogv = _dbl_tile(q, do, gq, k, v, gk, gv, qp, kp, k_valid, lse, delta,
                                       scale, window, HAS_WINDOW, ACC, PREC)
        pbar = dogv + g * (dp - delta[:, None]) + dbar[:, None] * dp
        sbar = p * (pbar - c[:, None])
        qbar += tl.dot(ds.to(gk.dtype), gk, input_precision=PREC, out_dtype=ACC)
        qbar += tl.dot(sbar.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
        dobar += tl.dot(p.to(gv.dtype), gv, input_precision=PREC, out_dtype=ACC)
        dobar += tl.dot((g * p).to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    o = _load_rows(O, q_base, rows, Tq, s_t, offs_d, D)
    dobar += dbar[:, None] * o.to(ACC)
    _store_rows(QB, q_base, rows, Tq, s_t, offs_d, qbar * scale, D)
    _store_rows(DOB, q_base, rows, Tq, s_t, offs_d, dobar, D)


@triton.jit
def _dbl_dkdv_kernel(Q, K, V, DO, GQ, GK, GV, LSE, DR, DBAR, CR, KB, VB, QP, KP, sq_b, sk_b,
                     s_t, H, Tq, Tk, window, scale, D: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     SKIP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr):
    """``K̄ = scale · (dSᵀ gQ + S̄ᵀ Q)`` and ``V̄ = (P ∘ (G + Δ̄))ᵀ dO``, per key block."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = b * sq_b + h * D
    k_base = b * sk_b + h * D
    r_base = bh.to(tl.int64) * Tq
    cols = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    k_valid = cols < Tk
    k = _load_rows(K, k_base, cols, Tk, s_t, offs_d, D)
    v = _load_rows(V, k_base, cols, Tk, s_t, offs_d, D)
    gk = _load_rows(GK, k_base, cols, Tk, s_t, offs_d, D)
    gv = _load_rows(GV, k_base, cols, Tk, s_t, offs_d, D)
    kp = tl.load(KP + cols, mask=k_valid, other=0)
    kbar = tl.zeros([BN, BD], dtype=ACC)
    vbar = tl.zeros([BN, BD], dtype=ACC)
    if SKIP:
        m_lo, m_hi = _query_tiles(QP, Tq, kp, k_valid, window, HAS_WINDOW, BM)
    else:
        m_lo, m_hi = 0, Tq
    for start_m in range(m_lo, m_hi, BM):
        rows = start_m + tl.arange(0, BM)
        r_valid = rows < Tq
        q = _load_rows(Q, q_base, rows, Tq, s_t, offs_d, D)
        do = _load_rows(DO, q_base, rows, Tq, s_t, offs_d, D)
        gq = _load_rows(GQ, q_base, rows, Tq, s_t, offs_d, D)
        qp = tl.load(QP + rows, mask=r_valid, other=0)
        lse = tl.load(LSE + r_base + rows, mask=r_valid, other=0.0)
        delta = tl.load(DR + r_base + rows, mask=r_valid, other=0.0)
        dbar = tl.load(DBAR + r_base + rows, mask=r_valid, other=0.0)
        c = tl.load(CR + r_base + rows, mask=r_valid, other=0.0)
        pt, dpt, gt, dogvt = _dbl_tile_t(q, do, gq, k, v, gk, gv, qp, kp, k_valid, lse, scale,
                                         window, HAS_WINDOW, ACC, PREC)
        pt = tl.where(r_valid[None, :], pt, 0.0)
        dst = pt * (dpt - delta[None, :])
        pbart = dogvt + gt * (dpt - delta[None, :]) + dbar[None, :] * dpt
        sbart = pt * (pbart - c[None, :])
        kbar += tl.dot(dst.to(gq.dtype), gq, input_precision=PREC, out_dtype=ACC)
        kbar += tl.dot(sbart.to(q.dtype), q, input_precision=PREC, out_dtype=ACC)
        vbar += tl.dot((pt * (gt + dbar[None, :])).to(do.dtype), do,
                       input_precision=PREC, out_dtype=ACC)
    _store_rows(KB, k_base, cols, Tk, s_t, offs_d, kbar * scale, D)
    _store_rows(VB, k_base, cols, Tk, s_t, offs_d, vbar, D)


@contextmanager
def skip_masked_tiles(enabled: bool) -> Iterator[None]:
    """Within the block, launches skip wholly masked tiles (``True``, the default) or run every
    tile (``False``: the kernels as they were, for benchmarks and tests)."""
    global SKIP_MASKED_TILES
    before, SKIP_MASKED_TILES = SKIP_MASKED_TILES, enabled
    try:
        yield
    finally:
        SKIP_MASKED_TILES = before


# ------------------------------------------------------------------------------- launchers
@dataclass
class _Meta:
    """Everything a launch needs besides the tensors (the mask and tile parameters)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None
    B: int
    Tq: int
    Tk: int
    H: int
    d: int
    # Leading keys whose gradient nobody takes (a detached cache in evaluation and prefill):
    # the first-order backward skips their dK, dV (zeros), the largest share of its work.
    frozen_keys: int = 0

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)


def _constants(x: torch.Tensor, meta: _Meta) -> dict[str, object]:
    fp64 = x.dtype == torch.float64
    return dict(D=meta.d, HAS_WINDOW=meta.window is not None, SKIP=SKIP_MASKED_TILES,
                ACC=tl.float64 if fp64 else tl.float32,
                # fp64 (interpreter only) exact; fp32 as 3xTF32 on tensor cores, about fp32
                # accuracy (IEEE fp32 products become FMA loops that take ~a minute to
                # compile and run slowly); tf32 is the ignored default for 16-bit operands.
                PREC={torch.float64: "ieee", torch.float32: "tf32x3"}.get(x.dtype, "tf32"),
                BD=max(16, triton.next_power_of_2(meta.d)))


def _launch(kernel: triton.JITFunction, name: str, over_keys: bool, meta: _Meta,
            tensors: list[torch.Tensor], x: torch.Tensor) -> None:
    """Launch ``kernel`` with one program per (query block, or key block if ``over_keys``)
    and (batch, head), with the arguments every kernel shares."""
    cfg = _INTERPRETER_CONFIG if triton_interpreting() else CONFIGS[name]
    n_blocks = (triton.cdiv(meta.Tk, cfg.block_n) if over_keys
                else triton.cdiv(meta.Tq, cfg.block_m))
    grid = (n_blocks, meta.B * meta.H)
    window = meta.window if meta.window is not None else 0
    # Strides from the tensors (tensors[0] is laid out as q, tensors[1] as k): a launch over a
    # slice of the keys passes views whose batch stride is the whole key tensor's.
    kernel[grid](*tensors, meta.q_pos, meta.k_pos, tensors[0].stride(0), tensors[1].stride(0),
                 tensors[0].stride(1), meta.H, meta.Tq, meta.Tk, window,
                 meta.scale, BM=cfg.block_m, BN=cfg.block_n, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, **_constants(x, meta))


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: _Meta) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty_like(q)  # [B, Tq, H, d]
    lse = torch.empty(meta.B, meta.H, meta.Tq, device=q.device, dtype=_stat_dtype(q))
    _launch(_fwd_kernel, "fwd", False, meta, [q, k, v, o, lse], q)
    return o, lse


def _row_delta(do: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``Δ = rowsum(dO ∘ O)`` as ``[B, H, Tq]`` in the statistics dtype."""
    dt = _stat_dtype(o)
    return (do.to(dt) * o.to(dt)).sum(-1).transpose(1, 2).contiguous()


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
              lse: torch.Tensor, delta: torch.Tensor,
              meta: _Meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = torch.empty_like(q)
    _launch(_bwd_dq_kernel, "bwd_dq", False, meta, [q, k, v, do, lse, delta, dq], q)
    n = meta.frozen_keys
    if n == 0:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _launch(_bwd_dkdv_kernel, "bwd_dkdv", True, meta, [q, k, v, do, lse, delta, dk, dv], q)
        return dq, dk, dv
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if n < meta.Tk:
        rest = replace(meta, k_pos=meta.k_pos[n:], Tk=meta.Tk - n)
        _launch(_bwd_dkdv_kernel, "bwd_dkdv", True, rest,
                [q, k[:, n:], v[:, n:], do, lse, delta, dk[:, n:], dv[:, n:]], q)
    return dq, dk, dv


def _double_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                     gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor,
                     meta: _Meta) -> tuple[torch.Tensor, ...]:
    dbar, c = torch.empty_like(lse), torch.empty_like(lse)
    _launch(_dbl_stats_kernel, "dbl_stats", False, meta,
            [q, k, v, do, gq, gk, gv, lse, delta, dbar, c], q)
    qbar, dobar = torch.empty_like(q), torch.empty_like(do)
    _launch(_dbl_dq_kernel, "dbl_dq", False, meta,
            [q, k, v, o, do, gq, gk, gv, lse, delta, dbar, c, qbar, dobar], q)
    kbar, vbar = torch.empty_like(k), torch.empty_like(v)
    _launch(_dbl_dkdv_kernel, "dbl_dkdv", True, meta,
            [q, k, v, do, gq, gk, gv, lse, delta, dbar, c, kbar, vbar], q)
    return qbar, kbar, vbar, dobar


# ------------------------------------------------------------------------ autograd functions
class _ChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                meta: _Meta) -> torch.Tensor:
        o, lse = _forward(q, k, v, meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        # O and LSE enter the backward as constants: their dependence on Q, K, V is part of
        # the double-backward formulas, so autograd must not chain through them again.
        dq, dk, dv = _ChunkAttentionBackward.apply(q, k, v, o.detach(), lse, do.contiguous(),
                                                   ctx.meta)
        return dq, dk, dv, None


class _ChunkAttentionBackward(torch.autograd.Function):
    """``(Q, K, V, dO) → (dQ, dK, dV)`` as a function with its own backward.

    Per (batch, head), with ``s`` the softmax scale, ``P`` the masked softmax, ``dP = dO Vᵀ``,
    ``Δ = rowsum(dO ∘ O)``, ``dS = P ∘ (dP − Δ)`` and incoming cotangents ``gQ, gK, gV``:
    ``G = s (gQ Kᵀ + Q gKᵀ)`` (cotangent of dS), ``Δ̄ = −rowsum(G ∘ P)``,
    ``P̄ = dO gVᵀ + G ∘ (dP − Δ) + Δ̄ dP``, ``S̄ = P ∘ (P̄ − rowsum(P ∘ P̄))``; then
    ``Q̄ = s (dS gK + S̄ K)``, ``K̄ = s (dSᵀ gQ + S̄ᵀ Q)``, ``V̄ = (P ∘ (G + Δ̄))ᵀ dO``,
    ``dŌ = P gV + (G ∘ P) V + Δ̄ O`` (the last from Δ's dependence on dO; Δ's dependence on
    O = P V is inside P̄). Third derivatives are not provided (TTT-E2E needs two).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                meta: _Meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        delta = _row_delta(do, o)
        dq, dk, dv = _backward(q, k, v, do, lse, delta, meta)
        ctx.save_for_backward(q, k, v, o, do, lse, delta)
        ctx.meta = meta
        return dq, dk, dv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor,  # type: ignore[override]
                 gv: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, do, lse, delta = ctx.saved_tensors
        if ctx.meta.frozen_keys:
            raise RuntimeError("chunk attention with frozen_keys > 0 has no second derivative "
                               "(its dK, dV are zero for the frozen keys); pass frozen_keys=0 "
                               "when the gradient will be differentiated again")
        qbar, kbar, vbar, dobar = _double_backward(
            q, k, v, o, do, lse, delta, gq.contiguous(), gk.contiguous(), gv.contiguous(),
            ctx.meta)
        return qbar, kbar, vbar, None, None, dobar, None


def triton_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor, k_pos: torch.Tensor,
                           window: int | None, frozen_keys: int = 0) -> torch.Tensor:
    """Chunk attention ``q [B,Tq,H,d]`` over ``k, v [B,Tk,H,d]`` with the window mask on
    absolute positions ``q_pos [Tq]``, ``k_pos [Tk]``; differentiable twice.

    Same function as ``naive_attention(q, k, v, window_mask(q_pos, k_pos, window))`` for
    inputs where every query sees at least one key. ``frozen_keys = n`` promises that the
    gradient of the first ``n`` keys and values is not used: the backward returns zeros there
    without computing them, and a second derivative is refused.
    """
    B, Tq, H, d = q.shape
    Tk = k.shape[1]
    if k.shape != (B, Tk, H, d) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Tq, H, d] and k, v [B, Tk, H, d]")
    if q_pos.shape != (Tq,) or k_pos.shape != (Tk,):
        raise ValueError(f"q_pos {tuple(q_pos.shape)} / k_pos {tuple(k_pos.shape)} must be "
                         f"[{Tq}] / [{Tk}] absolute positions")
    if not 0 <= frozen_keys <= Tk:
        raise ValueError(f"frozen_keys={frozen_keys} must lie in [0, {Tk}]")
    meta = _Meta(q_pos.to(q.device, torch.int64).contiguous(),
                 k_pos.to(q.device, torch.int64).contiguous(), window, B, Tq, Tk, H, d,
                 frozen_keys)
    return _ChunkAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), meta)
