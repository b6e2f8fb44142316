"""How the Triton attention kernels read a head's key and value tiles: through pointers, or
through tensor descriptors (on Hopper, the GPU's tensor copies: one instruction per tile,
no per-element addresses in registers).

Keys and values are ``[B, N, H, d]`` with the head width split into two powers of two
(:func:`tttlm.ops.triton_tiles.head_split`); a descriptor views them as ``[B, N, H · d]``
and reads ``[1, rows, part]`` blocks of one head's part. Rows past ``N`` read as zeros there,
as the pointer path's masked loads do. On a GPU the kernels take descriptors but for a chunk
of one sequence launched outside a CUDA graph (:func:`use_descriptors`); on a CPU (Triton's
interpreter, tests) pointers unless asked.

This module imports Triton at import time; the kernel modules that use it do too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def key_tile(at, desc, b, col, start, s_t, dims, N, BN: tl.constexpr, W: tl.constexpr,
             MASK: tl.constexpr, DESC: tl.constexpr):
    """``BN`` rows from ``start`` of one head's keys (or values), ``W`` columns: through the
    descriptor ``desc`` at ``[b, start, col]``, or through pointers ``at`` (one head's rows,
    row stride ``s_t``, columns ``dims``), with rows from ``N`` on masked to zeros where
    ``MASK``."""
    if DESC:
        return tl.reshape(desc.load([b, start, col]), [BN, W])
    cols = start + tl.arange(0, BN)
    if MASK:
        return tl.load(at + cols[:, None] * s_t + dims[None, :], mask=(cols < N)[:, None],
                       other=0.0)
    return tl.load(at + cols[:, None] * s_t + dims[None, :])


def descriptors_apply(*tensors: torch.Tensor) -> bool:
    """Whether tensors ``[B, N, H, d]`` can be read through descriptors ``[B, N, H · d]``:
    each head's row next to the last (``stride(2) == d``), and the addresses and the two
    outer strides in whole 16 bytes (what the GPU's tensor copies need)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.stride(2) != t.shape[-1] or t.data_ptr() % 16:
            return False
        if (t.stride(0) * size) % 16 or (t.stride(1) * size) % 16:
            return False
    return True


def use_descriptors(asked: bool | None, *tensors: torch.Tensor,
                    whole_sequence: bool = False) -> bool:
    """Whether a kernel reads ``tensors [B, N, H, d]`` through descriptors: as ``asked``
    (refusing tensors they cannot read), or for ``None`` on a GPU where they apply, except
    for a chunk of one sequence launched outside a CUDA graph's capture;
    ``TTTLM_KV_DESC=0`` / ``1``: never / always (benchmarks' baselines).

    Why not there: a descriptor costs the host time at each launch (Triton binds it in
    Python), and a TTT chunk of one sequence launched eagerly is bound by its launches: 3b
    at 128K x 1 on one H100, those chunks took 40 ms of host time each with descriptors, 30
    without, for ~16 ms of GPU work. A graph records them once, a whole sequence is one
    launch a block, and chunks of several sequences keep the GPU busier than the host;
    there they gain (the same H100: the 119 graph replays 2233 -> 2206 ms, the prefix blocks
    1415 -> 1374 ms; benchmarks/results/prefill_kept_desc_3b_h100.md)."""
    if asked is None:
        env = os.environ.get("TTTLM_KV_DESC")
        if env == "0" or not tensors[0].is_cuda or not descriptors_apply(*tensors):
            return False
        return (env == "1" or whole_sequence or tensors[0].shape[0] > 1
                or torch.cuda.is_current_stream_capturing())
    if asked and not descriptors_apply(*tensors):
        raise ValueError("keys and values need heads side by side and 16-byte strides "
                         "for tensor descriptors")
    return asked


def kv_descriptors(t: torch.Tensor, block: int, split: tuple[int, int]) -> tuple[Any, Any]:
    """Descriptors of ``t [B, N, H, d]`` as ``[B, N, H · d]`` in blocks of ``block`` rows and
    the head's two parts (the second the first again when the head is not split: unread)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, N, H, d = t.shape
    shape, strides = [B, N, H * d], [t.stride(0), t.stride(1), 1]
    first = TensorDescriptor(t, shape, strides, [1, block, split[0]])
    second = TensorDescriptor(t, shape, strides, [1, block, split[1]]) if split[1] else first
    return first, second


def kv_operands(asked: bool | None, k: torch.Tensor, v: torch.Tensor, block: int,
                split: tuple[int, int], whole_sequence: bool = False
                ) -> tuple[bool, Any, Any, Any, Any]:
    """What a kernel reads keys and values ``[B, N, H, d]`` through: whether descriptors
    (:func:`use_descriptors`), and the four of them (keys' two head parts, values' two), or
    ``k`` four times as placeholders the pointer path never reads."""
    if use_descriptors(asked, k, v, whole_sequence=whole_sequence):
        return (True, *kv_descriptors(k, block, split), *kv_descriptors(v, block, split))
    return False, k, k, k, k
