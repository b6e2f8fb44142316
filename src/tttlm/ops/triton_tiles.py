"""How the Triton kernels tile their work: each kernel module's measured default tiles, which an
environment variable ``"A,B,WARPS,STAGES"`` overrides for tuning runs (``benchmarks/``), and a
head width split into tile widths (no Triton import here: the dispatch asks before launching).

The variable is read at every call (a tuning run changes it between calls) and each value is
parsed once: the kernels run for every chunk of every TTT block.
"""

from __future__ import annotations

import functools
import os

Tiles = tuple[int, int, int, int]


def tile_config(variable: str, default: Tiles) -> Tiles:
    """``variable``'s four integers (two tile sizes, warps, pipeline stages), or ``default``
    where it is unset or empty."""
    return _parse(variable, os.environ.get(variable, ""), default)


@functools.cache
def _parse(variable: str, given: str, default: Tiles) -> Tiles:
    if not given:
        return default
    parts = given.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{variable}={given!r}: give four integers A,B,WARPS,STAGES")
    a, b, warps, stages = (int(p) for p in parts)
    return a, b, warps, stages


def head_split(d: int) -> tuple[int, int] | None:
    """A head width as two powers of two ``(a, b)``, ``a + b = d``, ``b`` 0 or smaller than
    ``a``, both at least 16 (the smallest tile product); ``None`` where none exists."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    if a < 16 or (b and (b < 16 or b & (b - 1))):
        return None
    return a, b
