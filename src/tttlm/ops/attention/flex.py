"""Sliding-window attention through ``flex_attention`` (CUDA): only blocks inside the band run.

``torch.nn.attention.flex_attention`` is imported on first use, never at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tttlm.ops.attention._common import common_dtype
from tttlm.ops.compiled import inductor_compile

# Each new shape recompiles flex_attention; past torch's recompile limit it would silently run
# eagerly and materialise the score matrix, so shapes beyond this many take the banded path.
FLEX_MAX_SHAPES = 6
_flex_shapes: set[tuple[Any, ...]] = set()
_chunk_shapes: set[tuple[Any, ...]] = set()  # chunks have their own compiled budget


def flex_can_run(q: torch.Tensor) -> bool:
    """CUDA tensors of 16- or 32-bit floats with a head dimension of at least 16
    (flex_attention's kernels need it; the tiny test models have 8; Inductor cannot compile
    its float64 kernel)."""
    return q.is_cuda and q.shape[-1] >= 16 and q.dtype != torch.float64


def _within_budget(seen: set[tuple[Any, ...]], key: tuple[Any, ...]) -> bool:
    """True for the first ``FLEX_MAX_SHAPES`` keys added to ``seen``, and again for those."""
    if key in seen:
        return True
    if len(seen) >= FLEX_MAX_SHAPES:
        return False
    seen.add(key)
    return True


def flex_shape_allowed(q: torch.Tensor, window: int) -> bool:
    """True for the first ``FLEX_MAX_SHAPES`` (shape, window, dtype, device) seen, and again for
    those; False for any further one."""
    return _within_budget(_flex_shapes, (tuple(q.shape), window, q.dtype, q.device))


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """``flex_attention`` compiled once per process (uncompiled it materialises scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return inductor_compile(flex_attention, dynamic=False)


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


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          window: int) -> torch.Tensor:
    """Causal attention over ``[B, T, H, d]``, each query seeing its last ``window`` keys."""
    q, k, v = common_dtype(q, k, v)
    block_mask = _window_block_mask(q.shape[1], window, q.device)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask)
    return out.transpose(1, 2)


def flex_chunk_allowed(q: torch.Tensor, k: torch.Tensor, window: int | None) -> bool:
    """True for a chunk whose cache is full (``past == window``: the one shape of a long
    prefill; shorter caches early on take the other path) and whose shape is among the first
    ``FLEX_MAX_SHAPES`` seen."""
    c, n = q.shape[1], k.shape[1]
    if window is None or n - c != window:
        return False
    return _within_budget(_chunk_shapes, (tuple(q.shape), n, window, q.dtype, q.device))


@functools.lru_cache(maxsize=32)
def _chunk_block_mask(c: int, past: int, window: int, device: torch.device,
                      compiled: bool) -> Any:
    """Query ``i`` of a chunk (position ``past + i`` in the keys) sees keys ``j`` with
    ``0 <= past + i - j < window``: the same mask for every chunk with a full cache."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        diff = past + q_idx - kv_idx
        return (diff >= 0) & (diff < window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=c, KV_LEN=past + c,
                             device=device, _compile=compiled)


def flex_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: int) -> torch.Tensor:
    """A chunk's queries ``[B, c, H, d]`` over the cache and the chunk ``[B, past + c, H, d]``
    (positions consecutive, the chunk's keys last, as :class:`~tttlm.model.cache.ChunkKV`
    lays them out), each query seeing its last ``window`` keys. First-order differentiable
    (flex_attention's backward; CUDA only): for chunks whose graph is differentiated once
    (prefill, evaluation), never for meta-training's gradient of gradients."""
    q, k, v = common_dtype(q, k, v)
    c, n = q.shape[1], k.shape[1]
    mask = _chunk_block_mask(c, n - c, window, q.device, q.is_cuda)
    if q.is_cuda:
        attend = _compiled_flex()
    else:  # eager: materialises the scores (the CPU reference of this path, forward only)
        from torch.nn.attention.flex_attention import flex_attention as attend
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return out.transpose(1, 2)
