"""Tile configurations of the Triton kernels: each kernel module's measured default, which an
environment variable ``"A,B,WARPS,STAGES"`` overrides for tuning runs (``benchmarks/``).

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
