"""The gated delta rule of Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2024) through
flash-linear-attention (``fla``, the ``fla`` extra): its chunked Triton kernel for whole
sequences and its fused recurrent kernel for decoding on CUDA, and its naive recurrent torch
reference elsewhere (CPU, tests). Per head, with a state ``S [d_k, d_v]``, for each token:
``S = exp(g_t) S``, ``u = beta_t (v_t - S^T k_t)``, ``S = S + k_t u^T``, ``o_t = S^T q_t * scale``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Any

import torch

from tttlm.errors import UserError


def require_fla() -> Any:
    """The ``fla`` package, or a one-line :class:`UserError` saying how to install it."""
    try:
        import fla
    except ImportError:
        raise UserError("gated_deltanet and mamba2 models need flash-linear-attention; "
                        "install it with pip install 'tttlm[fla]'") from None
    return fla


def hopper_backward_refusal(capability: tuple[int, int], triton_version: str,
                            has_tilelang: bool) -> str | None:
    """Why fla's gated chunk backward cannot run here, or ``None``: flash-linear-attention 0.6
    refuses it on Hopper (compute capability 9.x) under Triton >= 3.4 and < 3.7.1, which give
    wrong gradients there (fla issue 640), unless tilelang provides the kernel."""
    version = tuple(int(p) for p in re.findall(r"\d+", triton_version)[:3])
    if capability[0] != 9 or has_tilelang or not (3, 4, 0) <= version < (3, 7, 1):
        return None
    return (f"training gated_deltanet or mamba2 on a Hopper GPU needs Triton >= 3.7.1 or "
            f"tilelang: flash-linear-attention's gated backward gives wrong gradients under "
            f"Triton {triton_version} there (fla issue 640); pip install -U 'triton>=3.7.1' or "
            f"pip install tilelang (their forward, prefill and decoding, runs as it is)")


@functools.cache
def _refusal_on(device_index: int) -> str | None:
    import triton

    return hopper_backward_refusal(torch.cuda.get_device_capability(device_index),
                                   triton.__version__,
                                   importlib.util.find_spec("tilelang") is not None)


def _check_backward(*xs: torch.Tensor) -> None:
    """One line before the forward, rather than fla's error from inside the backward pass."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        reason = _refusal_on(xs[0].device.index or 0)
        if reason:
            raise UserError(reason)


def kernel_inputs(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``q, k, v`` in one dtype for fla's Triton kernels, whose ``tl.dot`` refuses mixed operands
    (under autocast the projections come out in bf16 while normalised keys may be float32): the
    half-precision dtype when one is present (what autocast chose), else float32."""
    half = [x.dtype for x in xs if x.dtype in (torch.bfloat16, torch.float16)]
    dtype = half[0] if half else torch.float32
    return [x.to(dtype) for x in xs]


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                     decoding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k [B, T, H, d_k]`` (L2-normalised), ``v [B, T, H, d_v]``, log-decays ``g`` and
    write strengths ``beta [B, T, H]``, state ``[B, H, d_k, d_v]`` before the first token
    (zeros when ``None``). Returns the outputs ``[B, T, H, d_v]`` (float32 on the reference
    path) and the state after the last token (float32). ``decoding``: few tokens after a
    state (the recurrent kernel rather than the chunked one on CUDA)."""
    require_fla()
    scale = q.shape[-1] ** -0.5
    if q.is_cuda:
        if decoding:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as kernel
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel
        if not decoding:
            _check_backward(q, k, v, g, beta)
        state = None if initial_state is None else initial_state.float()
        q, k, v = kernel_inputs(q, k, v)
        out, final = kernel(q, k, v, g=g.float(), beta=beta.float(), scale=scale,
                            initial_state=state, output_final_state=True)
        return out, final
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    return naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale,
                                            initial_state=initial_state,
                                            output_final_state=True)


def ssd_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
             initial_state: torch.Tensor | None = None, decoding: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba 2's recurrence as a scalar-gated linear recurrence (flash-linear-attention's
    simple GLA, scale 1): per head ``S = exp(g_t) S + k_t v_t^T``, ``o_t = S^T q_t``, with
    ``q, k [B, T, H, d_k]``, ``v [B, T, H, d_v]``, ``g [B, T, H]``. Returns the outputs and the
    state after the last token (float32); kernels as :func:`gated_delta_rule`."""
    require_fla()
    if q.is_cuda:
        if decoding:
            from fla.ops.simple_gla import fused_recurrent_simple_gla as kernel
        else:
            from fla.ops.simple_gla import chunk_simple_gla as kernel
        if not decoding:
            _check_backward(q, k, v, g)
        state = None if initial_state is None else initial_state.float()
        q, k, v = kernel_inputs(q, k, v)
        return kernel(q, k, v, g=g.float(), scale=1.0, initial_state=state,
                      output_final_state=True)
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    out, final = naive_recurrent_simple_gla(q, k, v, g, scale=1.0,
                                            initial_state=initial_state,
                                            output_final_state=True)
    return out.float(), final
