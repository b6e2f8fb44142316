"""Rotary position embedding, in the official interleaved-pair layout or transformers' halves.

``interleaved`` (the official code): pairs ``(x[2i], x[2i+1])`` rotate as complex numbers by
``pos * inv_freq[i]``; the tables are ``[T, d/2]``. ``half`` (transformers' Llama
``rotate_half``): pairs ``(x[i], x[i+d/2])``; the tables are ``[T, d]``, the ``d/2`` angles
twice, as transformers builds them. :func:`apply_rope` reads the layout from the tables'
width, so caches and blocks pass tables around without knowing the layout.

Angles are computed as ``float32(pos) * float32(inv_freq)`` (fp64 when the model runs in
fp64) so that the rounding matches the official tables and transformers' (which multiply the
same fp32 numbers). ``inv_freq`` follows transformers' ``linear`` and ``llama3`` scalings.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from tttlm.config import TTTConfig
from tttlm.ops.cache_swap import CacheSwap, select, write_other
from tttlm.ops.compiled import inductor_compile
from tttlm.ops.grad_rows import mark_grad_rows
from tttlm.ops.triton_runtime import triton_available


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``[d/2]`` inverse frequencies ``theta^(-2i/d)``, scaled as transformers'
    ``modeling_rope_utils`` does for ``rope_type`` ``linear`` and ``llama3``."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=dtype)[: head_dim // 2]
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by the factor, short ones kept, a smooth blend between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32, *, layout: str = "interleaved",
                scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of integer ``positions [T]``: ``[T, head_dim/2]`` (``interleaved``)
    or ``[T, head_dim]`` (``half``)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = rope_inv_freq(head_dim, theta, scaling, compute, positions.device)  # [d/2]
    angles = positions.to(compute)[:, None] * freqs[None, :]  # [T, d/2]
    if layout == "half":
        angles = torch.cat((angles, angles), dim=-1)
    return torch.cos(angles), torch.sin(angles)


def config_rope_angles(positions: torch.Tensor, config: TTTConfig,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_angles` with a model config's head width, base, layout and scaling."""
    assert config.head_dim is not None
    return rope_angles(positions, config.head_dim, config.rope_theta, dtype,
                       layout=config.rope_layout, scaling=config.rope_freq_scaling)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, H, d]`` by tables ``[T, d/2]`` (interleaved pairs) or ``[T, d]``
    (halves, see the module docstring); fp32 math, result in x's dtype.

    Interleaved: one complex multiplication (``(re + i·im)(cos + i·sin)``, the same products
    and sums as the real form): a single contiguous kernel instead of six strided ones on the
    GPU, and it stays differentiable any number of times.
    """
    dtype = x.dtype
    compute = cos.dtype
    if cos.shape[-1] == x.shape[-1]:
        # transformers' q * cos + rotate_half(q) * sin, the same products and sums.
        xf = x.to(compute)
        if torch.compiler.is_compiling():
            # As halves (x1, x2)·cos + (x2, x1)·(-sin, sin): one pointwise pass, where the
            # concatenation made Inductor write rotate_half(q) in fp32 first (see below).
            halves = xf.unflatten(-1, (2, -1))  # [..., T, H, 2, d/2]
            c = cos.unflatten(-1, (2, -1))[:, None]
            s = sin.unflatten(-1, (2, -1))[:, None] * sin.new_tensor([-1.0, 1.0])[:, None]
            return (halves * c + halves.flip(-2) * s).flatten(-2).to(dtype)
        c, s = cos[:, None, :], sin[:, None, :]
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xf * c + rotated * s).to(dtype)
    pairs = x.to(compute).contiguous().unflatten(-1, (-1, 2))  # [..., T, H, d/2, 2]
    if torch.compiler.is_compiling():
        # Inductor has no complex kernels. The real form as (re, im)·cos + (im, re)·(-sin, sin):
        # the same products and sums, one pointwise pass over the pairs. (Written as
        # torch.stack((re·c - im·s, re·s + im·c)), Inductor wrote the stacked result in fp32
        # and cast it in a second pass: about three times the bytes, 3.4 ms a block for 3b's
        # queries and keys at 128K rows on an H100.)
        c = cos[:, None, :, None]
        s = sin[:, None, :, None] * sin.new_tensor([-1.0, 1.0])
        return (pairs * c + pairs.flip(-1) * s).flatten(-2).to(dtype)
    rotation = torch.complex(cos, sin)[:, None, :]  # [T, 1, d/2]
    out = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
    return out.flatten(-2).to(dtype)


def frozen_chunk_operands(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                          values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, keep: int, compiled: bool = False,
                          swap: CacheSwap | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor | None]:
    """A TTT chunk's attention operands over a cache that takes no gradient (evaluation,
    prefill): ``q [B, c, H, d]`` and the chunk's ``k, v`` after the cached ``keys`` (before
    RoPE) and ``values [B, past, H, d]``, with local tables ``[past + c, ...]``.

    Returns the rotated queries, the rotated keys and the values of cache ⊕ chunk, and the
    last ``keep`` raw keys (the next chunk's cache; its values are the last ``keep`` rows of
    the values returned). Cached keys are rotated apart from the chunk's (RoPE is per row: the
    same values), so that no backward pass runs over them.

    On a GPU with Triton (interleaved tables, a cache without gradient): Triton reads every
    row of cache and chunk once and writes the keys, values and next cache, and rotates the
    queries (:mod:`tttlm.ops.triton_rope`; the raw keys kept carry no gradient). Elsewhere,
    ``compiled``: one ``torch.compile``'d function writes all four (a pass over the cache
    instead of a concatenation, a rotation in three casts and passes, and a second
    concatenation for the keys alone); the same math, rounded as Inductor fuses it.

    ``swap`` (:class:`~tttlm.ops.cache_swap.CacheSwap`; ``keys``, ``values`` then its first
    set's views): the cache is read from the set its parity names and the next chunk's keys
    and values are written into the other set's ``next_*`` views, none returned (the fourth
    result is ``None``). The Triton pass chooses the sets on the device; elsewhere
    :func:`~tttlm.ops.cache_swap.select` and :func:`~tttlm.ops.cache_swap.write_other` do.

    Every path's backward reads only the chunk's rows of the keys' and values' gradients:
    the two are marked so (:mod:`tttlm.ops.grad_rows`), and the frozen attention leaves the
    cache's rows of the gradients it returns for them unwritten.
    """
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    if keys.shape[1] and keys.is_cuda and triton_available():
        from tttlm.ops import triton_rope  # imports Triton

        if triton_rope.triton_operands_can_run(q, keys, k, values, v, cos):
            out = triton_rope.triton_frozen_operands(q, keys, k, values, v, cos, sin, keep,
                                                     swap)
    if out is None and swap is not None:
        keys, values = select(swap.keys, swap.parity), select(swap.values, swap.parity)
        q_rot, rotated, joined, kept = frozen_chunk_operands(q, keys, k, values, v, cos, sin,
                                                             keep, compiled)
        write_other(swap.next_keys, swap.parity, kept)
        write_other(swap.next_values, swap.parity, joined[:, joined.shape[1] - kept.shape[1]:])
        return q_rot, rotated, joined, None
    if out is None:
        # An empty cache (a sequence's first chunk) has nothing to fuse, and the first TTT
        # block's operands take no gradient (nothing before its attention learns at test
        # time): eager, so that the compiled function keeps one graph per kind of cache.
        fuse = compiled and keys.shape[1] and any(t.requires_grad for t in (q, k, v))
        fn = _frozen_operands_compiled() if fuse else _frozen_operands
        out = fn(q, keys, k, values, v, cos, sin, keep)
    if not (keys.requires_grad or values.requires_grad):
        # Every path's backward reads only the chunk's rows of the keys' and values'
        # gradients (the cache takes none): the attention need not write the others.
        past = keys.shape[1]
        mark_grad_rows(out[1], past)
        mark_grad_rows(out[2], past)
    return out


def _frozen_operands(q: torch.Tensor, keys: torch.Tensor, k: torch.Tensor,
                     values: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, keep: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    past = keys.shape[1]
    drop = max(0, past + k.shape[1] - keep)  # cached rows that leave the window
    rotated = torch.cat((apply_rope(keys, cos[:past], sin[:past]),
                         apply_rope(k, cos[past:], sin[past:])), dim=1)
    return (apply_rope(q, cos[past:], sin[past:]), rotated, torch.cat((values, v), dim=1),
            torch.cat((keys[:, drop:], k), dim=1))


@functools.cache
def _frozen_operands_compiled() -> Any:
    # dynamic: the cache grows chunk by chunk up to the window; one graph for its lengths.
    return inductor_compile(_frozen_operands, dynamic=True)
