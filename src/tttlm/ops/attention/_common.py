"""Helpers shared by the fast attention paths."""

from __future__ import annotations

import functools

import torch


def common_dtype_of(*xs: torch.Tensor) -> torch.dtype:
    """The dtype :func:`common_dtype` casts to."""
    device = xs[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return functools.reduce(torch.promote_types, (x.dtype for x in xs))


def common_dtype(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Cast to one dtype, as SDPA and einsum do: the autocast dtype inside an autocast region
    (q may be fp32 after the norms while v is bf16), else the promoted dtype."""
    dtype = common_dtype_of(*xs)
    return [x.to(dtype) for x in xs]
