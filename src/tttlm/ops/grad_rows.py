"""Which rows of a tensor's gradient its producer's backward reads.

A frozen TTT chunk's keys and values are cache ⊕ chunk (``[B, past + c, H, d]``), made by
:func:`tttlm.ops.rope.frozen_chunk_operands`, whose backward reads only the chunk's rows of
their gradients: the cache takes none. The attention's backward must still return a gradient
of the whole shape, and filling its cache rows with zeros nobody reads was 35 ms of the 3.7 s
of kernels of a 3b prefill step at 128K on an H100 (two 42 MB fills per TTT block and chunk;
left unwritten, the step ran 0.4-0.5% faster, ``benchmarks/results/
prefill_final_3b_h100_2026-12-07.md``). A producer that
reads only rows ``first:`` marks its output here; a consumer may then leave the other rows of
the gradient it returns unwritten.

The mark is an attribute of the tensor object: an op that makes a new tensor (a cast, a
copy) drops it, and a consumer then writes every row, as before.
"""

from __future__ import annotations

import torch

_ATTRIBUTE = "_tttlm_grad_rows_from"


def mark_grad_rows(t: torch.Tensor, first: int) -> torch.Tensor:
    """Record that the backward of ``t``'s producer reads rows ``first:`` (axis 1) of
    ``t``'s gradient and no others; returns ``t``."""
    setattr(t, _ATTRIBUTE, first)
    return t


def grad_rows_read_from(t: torch.Tensor) -> int | None:
    """The first row (axis 1) of ``t``'s gradient that its producer reads, where marked by
    :func:`mark_grad_rows`; ``None``: any row may be read."""
    return getattr(t, _ATTRIBUTE, None)


def unread_rows_may_stay_unwritten() -> bool:
    """Whether a backward may leave a gradient's unread rows unwritten: not while anomaly
    detection checks every backward's outputs for NaN (stale memory may hold some)."""
    return not (torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled())
