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

# The window kernels' loops over whole key tiles (the forward's and the frozen dq's) with each
# tile's products issued one iteration ahead of its softmax work: off until timed on a GPU;
# TTTLM_WINDOW_ROTATE=1 / 0 turns it on / off for a run.
ROTATE_DEFAULT = False


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


def rotate_products() -> bool:
    """Whether the window kernels issue the next key tile's products before this tile's
    softmax work (read at every call, as the tiles are: a benchmark switches it between
    calls)."""
    given = os.environ.get("TTTLM_WINDOW_ROTATE", "")
    if given not in ("", "0", "1"):
        raise ValueError(f"TTTLM_WINDOW_ROTATE={given!r}: give 0 or 1")
    return ROTATE_DEFAULT if not given else given == "1"


def head_split(d: int) -> tuple[int, int] | None:
    """A head width as two powers of two ``(a, b)``, ``a + b = d``, ``b`` 0 or smaller than
    ``a``, both at least 16 (the smallest tile product); ``None`` where none exists."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    if a < 16 or (b and (b < 16 or b & (b - 1))):
        return None
    return a, b
