"""Sliding-window attention through ``flex_attention`` (CUDA): only blocks inside the band run.

``torch.nn.attention.flex_attention`` is imported on first use, never at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tttlm.ops.attention._common import common_dtype

# Each new shape recompiles flex_attention; past torch's recompile limit it would silently run
# eagerly and materialise the score matrix, so shapes beyond this many take the banded path.
FLEX_MAX_SHAPES = 6
_flex_shapes: set[tuple[Any, ...]] = set()


def flex_can_run(q: torch.Tensor) -> bool:
    """CUDA tensors of 16- or 32-bit floats with a head dimension of at least 16
    (flex_attention's kernels need it; the tiny test models have 8; Inductor cannot compile
    its float64 kernel)."""
    return q.is_cuda and q.shape[-1] >= 16 and q.dtype != torch.float64


def flex_shape_allowed(q: torch.Tensor, window: int) -> bool:
    """True for the first ``FLEX_MAX_SHAPES`` (shape, window, dtype, device) seen, and again for
    those; False for any further one."""
    key = (tuple(q.shape), window, q.dtype, q.device)
    if key in _flex_shapes:
        return True
    if len(_flex_shapes) >= FLEX_MAX_SHAPES:
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


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          window: int) -> torch.Tensor:
    """Causal attention over ``[B, T, H, d]``, each query seeing its last ``window`` keys."""
    q, k, v = common_dtype(q, k, v)
    block_mask = _window_block_mask(q.shape[1], window, q.device)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask)
    return out.transpose(1, 2)
