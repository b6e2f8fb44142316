"""Attention with one dispatch point.

The shapes of attention that occur in TTT-E2E:

* whole-sequence sliding-window (or causal) attention, used by the prefix blocks, by pretrain
  mode and by the baselines; it needs first-order gradients only;
* chunk attention of b queries over a rolling cache of earlier keys plus the chunk itself, used
  by the TTT blocks inside the inner loop; it must be differentiable twice, because the outer
  gradient flows through the inner gradient;
* decoding: a few new queries over a cache with a per-sequence mask (``decode_attention``,
  layout ``[B, H, n, d]``), used by the inference engine.

``naive_attention`` materialises the score matrix; it is the reference for every fast path and
the CPU path. Fast paths, chosen per call (backends are resolved lazily, never at import):

* whole sequence, window shorter than the sequence: ``flex_attention`` with a block mask built
  once per (length, window, device), compiled once, on CUDA; banded SDPA elsewhere;
* whole sequence, no window: SDPA with ``is_causal`` (flash on GPU);
* chunk attention: the Triton kernel of :mod:`tttlm.ops.triton_chunk_attention` (forward,
  backward and double backward) on CUDA when Triton is installed; ``naive_attention`` elsewhere.

Layout ``[B, T, H, d]`` except in decoding; RoPE is applied by callers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from tttlm.ops._triton import triton_can_run

_BACKEND = "auto"
# auto: fastest path for the device. naive: the reference everywhere. triton: the Triton chunk
# kernel even on CPU tensors (tests, under TRITON_INTERPRET=1). banded: whole-sequence windowed
# attention through banded SDPA instead of flex_attention (benchmarks, fallback).
_BACKENDS = ("auto", "naive", "triton", "banded")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Force an attention backend (``naive`` for tests, ``auto`` otherwise; see ``_BACKENDS``)."""
    global _BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not known; use one of {_BACKENDS}")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[Tq, Tk]`` bool: key j visible to query i iff ``0 <= i - j < window`` and ``j >= 0``."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = (diff >= 0) & (k_pos[None, :] >= 0)
    if window is not None:
        allowed &= diff < window
    return allowed


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Reference attention: ``q [B,Tq,H,d]``, ``k, v [B,Tk,H,d]``, ``mask [Tq,Tk]`` bool.

    Scores and softmax in fp32 (fp64 for fp64 inputs); masked logits are filled with
    ``-0.7 * finfo.max`` as in the official XLA path. Differentiable any number of times.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Tq, Tk]
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(compute) * scale
    scores = scores.masked_fill(~mask, -0.7 * torch.finfo(compute).max)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       window: int | None, block: int) -> torch.Tensor:
    """Causal attention over a whole sequence, limited to ``window`` keys when given.

    ``block`` is the query-block size of the banded path used when the window is shorter
    than the sequence (the model passes its chunk size).
    """
    T = q.shape[1]
    if _BACKEND == "naive":
        pos = torch.arange(T, device=q.device)
        return naive_attention(q, k, v, window_mask(pos, pos, window))
    if window is None or window >= T:
        # Every query sees all earlier keys: plain causal attention (flash on GPU).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)
    # flex_attention's kernels need a head dimension of at least 16 (tiny test models have 8)
    if _BACKEND == "auto" and q.is_cuda and q.shape[-1] >= 16 and _flex_shape_allowed(q, window):
        return _flex_window_attention(q, k, v, window)
    return _banded_attention(q, k, v, window, min(block, T))


# Each new shape recompiles flex_attention; past torch's recompile limit it would silently run
# eagerly and materialise the score matrix, so shapes beyond this many take the banded path.
_FLEX_MAX_SHAPES = 6
_flex_shapes: set[tuple[Any, ...]] = set()


def _flex_shape_allowed(q: torch.Tensor, window: int) -> bool:
    key = (tuple(q.shape), window, q.dtype, q.device)
    if key in _flex_shapes:
        return True
    if len(_flex_shapes) >= _FLEX_MAX_SHAPES:
        return False
    _flex_shapes.add(key)
    return True


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """``flex_attention`` compiled once per process (uncompiled it materialises scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _window_block_mask(T: int, window: int, device: torch.device) -> Any:
    """The sliding-window block mask of a length-``T`` sequence, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < window)

    # _compile: evaluated block by block; uncompiled it materialises the [T, T] mask and its
    # integer intermediates (over 100 GB at T = 128K).
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device,
                             _compile=True)


def _common_dtype(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Cast to one dtype, as SDPA and einsum do: the autocast dtype inside an autocast region
    (q may be fp32 after the norms while v is bf16), else the promoted dtype."""
    device = xs[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return [x.to(dtype) for x in xs]


def _flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: int) -> torch.Tensor:
    """Sliding-window attention through ``flex_attention``: only blocks inside the band run."""
    q, k, v = _common_dtype(q, k, v)
    block_mask = _window_block_mask(q.shape[1], window, q.device)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask)
    return out.transpose(1, 2)


def _banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      window: int, block: int) -> torch.Tensor:
    """Sliding-window attention as query blocks of ``block`` rows, each over the
    ``window - 1 + block`` keys that can reach it, through SDPA with a small mask."""
    B, T, H, d = q.shape
    n = -(-T // block)
    pad = n * block - T
    left = window - 1
    span = left + block
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, n, block, H, d)
    # Keys padded with `left` rows in front so block j's keys start at padded row j*block.
    kp = F.pad(k, (0, 0, 0, 0, left, pad))
    vp = F.pad(v, (0, 0, 0, 0, left, pad))
    kb = kp.unfold(1, span, block).permute(0, 1, 4, 2, 3)  # [B, n, span, H, d]
    vb = vp.unfold(1, span, block).permute(0, 1, 4, 2, 3)
    a = torch.arange(block, device=q.device)
    c = torch.arange(span, device=q.device)
    j = torch.arange(n, device=q.device)
    band = (c[None, :] >= a[:, None]) & (c[None, :] <= a[:, None] + left)  # [block, span]
    nonneg = (j[:, None] * block - left + c[None, :]) >= 0  # [n, span]
    mask = band[None] & nonneg[:, None, :]  # [n, block, span]
    mask = mask[None, :, None].expand(B, n, 1, block, span).reshape(B * n, 1, block, span)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B * n, x.shape[2], H, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(qb), heads_first(kb), heads_first(vb),
                                         attn_mask=mask)  # [B*n, H, block, d]
    out = out.transpose(1, 2).reshape(B, n * block, H, d)
    return out[:, :T]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_pos: torch.Tensor, k_pos: torch.Tensor,
                    window: int | None, frozen_keys: int = 0) -> torch.Tensor:
    """Attention of a chunk's queries over cached keys plus the chunk's own keys.

    Positions are absolute token indices (used only for the mask); every query must see at
    least one key. Differentiable twice. Runs the Triton kernel on CUDA (or anywhere under the
    ``triton`` backend), the naive reference otherwise. ``frozen_keys``: the first keys'
    gradient is not wanted (a detached cache), so the kernel skips it; first order only.
    """
    use_triton = _BACKEND == "triton" or (
        _BACKEND == "auto" and q.is_cuda and q.dtype in _TRITON_DTYPES)
    if use_triton and triton_can_run(q):
        from tttlm.ops.triton_chunk_attention import triton_chunk_attention

        return triton_chunk_attention(*_common_dtype(q, k, v), q_pos, k_pos, window,
                                      frozen_keys)
    return naive_attention(q, k, v, window_mask(q_pos, k_pos, window))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """``q [B, H, n, d]`` over ``k, v [B, H, C, d]`` with a bool ``mask [B, 1, n, C]``.

    One query (decoding) goes through two batched matmuls, which read the cache once with the
    whole GPU (fused kernels parallelise over queries and leave it idle for n = 1); scores and
    softmax in fp32 (fp64 for fp64), as the reference ``naive_attention``. Several queries
    (prefill, the inner step) use SDPA, which never materialises ``[n, C]`` scores.
    """
    if q.shape[2] > 1 and _BACKEND != "naive":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.mT).to(compute) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, 1, C]
    scores = scores.masked_fill(~mask, -0.7 * torch.finfo(compute).max)
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v
