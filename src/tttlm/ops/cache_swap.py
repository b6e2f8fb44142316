"""A frozen TTT cache kept in two buffer sets, the one that holds it chosen on the device.

A CUDA graph of a TTT chunk reads the caches from fixed buffers and must leave the next
chunk's in the same buffers. With one set, the next cache (the last ``window`` rows of
cache ⊕ chunk: a shift by a chunk) cannot be written over the one being read, so the graph
copied it in after the chunk: 16 copies of 42 MB a chunk at 3b, 60 ms of a 3.7 s step at
128K on an H100 (``memcpy128`` in the profile of
``benchmarks/results/prefill_own_dkdv_3b_h100.json``, section 3 of its report). With two
sets and a flag on the device (``parity``: which set holds the cache), a chunk reads one set
and the operands write the next cache straight into the other; the graph flips the flag, and
the same graph serves the next chunk.

:func:`select` and :func:`write_other` are the operations in torch (a reference, and the
path where the Triton pass does not run): capture-safe, no host synchronisation, at the cost
of reading both sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CacheSwap:
    """One TTT block's cache in two buffer sets (index 0 and 1 of each pair: views of equal
    shape and strides into the two sets). ``keys``, ``values``: this chunk's cache
    ``[B, past, H, d]`` (keys before RoPE); ``next_keys``, ``next_values``: the next chunk's
    ``[B, min(past + c, window), H, d]``; ``parity``: ``int32 [1]`` on the device, the set that
    holds this chunk's cache (the other receives the next one)."""

    keys: Pair
    values: Pair
    next_keys: Pair
    next_values: Pair
    parity: torch.Tensor


def distance(pair: Pair) -> int:
    """How many elements the second view lies past the first (kernels move one base pointer
    by it); the two must be of one shape, dtype and strides."""
    a, b = pair
    if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
        raise ValueError("cache swap: the two sets' views differ in shape, dtype or strides")
    gap = b.data_ptr() - a.data_ptr()
    if gap % a.element_size():
        raise ValueError("cache swap: the two sets are not a whole number of elements apart")
    return gap // a.element_size()


def select(pair: Pair, parity: torch.Tensor) -> torch.Tensor:
    """The view of the set ``parity`` names (read from both: no host synchronisation)."""
    return torch.where(parity.bool().view(1, 1, 1, 1), pair[1], pair[0])


def write_other(pair: Pair, parity: torch.Tensor, new: torch.Tensor) -> None:
    """``new`` into the view of the set ``parity`` does not name; the other left as it is."""
    with torch.no_grad():  # (a cache is a constant: the buffers take no autograd history)
        for i, view in enumerate(pair):
            keep = (parity == i).view(1, 1, 1, 1)
            view.copy_(torch.where(keep, view, new.detach()))
