"""Attention with one dispatch point and a registry of backends.

The shapes of attention that occur in TTT-E2E, each with an entry point here:

* :func:`sequence_attention`: whole-sequence sliding-window (or causal) attention, used by the
  prefix blocks, by pretrain mode and by the baselines; first-order gradients only;
* :func:`chunk_attention`: ``b`` queries over a rolling cache of earlier keys plus the chunk
  itself, used by the TTT blocks inside the inner loop; differentiable twice, because the outer
  gradient flows through the inner gradient;
* :func:`decode_attention`: a few new queries over a cache with a per-sequence mask (layout
  ``[B, H, n, d]``), used by the inference engine.

Each entry point calls the active :class:`AttentionBackend`, so one override,
``with attention_backend("naive"):``, reaches training, evaluation and inference alike.
Built-in backends (module beside each path, as in fla's ``ops/<op>/naive.py``):

* ``auto`` (the default): the fastest path for the device, chosen per call: ``flex_attention``
  (:mod:`.flex`) for windowed sequences on CUDA, banded SDPA elsewhere, causal SDPA without a
  window (:mod:`.sdpa`), the Triton chunk kernel (:mod:`.triton`) on CUDA, decoding matmuls;
* ``naive``: the reference for all three shapes (:mod:`.naive`); materialises scores;
* ``triton``: the Triton chunk kernel even on CPU tensors (tests, ``TRITON_INTERPRET=1``),
  otherwise as ``auto``;
* ``banded``: windowed whole sequences through banded SDPA instead of ``flex_attention``,
  otherwise as ``auto``;
* ``first-order``: chunks needing only first-order gradients (frozen caches: prefill,
  evaluation) through SDPA with a lower-right causal bias while their keys fit the window
  (flash on a GPU), through ``flex_attention`` on CUDA once their cache is full, otherwise as
  ``auto`` (opt-in; to be measured against the Triton kernel);
* ``pieces``: ``auto``, with windowed sequences and frozen chunks as SDPA pieces merged by
  log-sum-exp (:mod:`.pieces`);
* ``frozen-dq``: as ``auto``, whose frozen chunks on CUDA take a backward computing only dq
  for their cache (:mod:`.frozen`: FlashAttention's backward on the chunk's own keys, a
  Triton kernel for the cache's share); CPU tensors take it too, under Triton's interpreter;
* ``triton-fwd``: ``frozen-dq``, with those chunks' forward through a Triton kernel too
  (:mod:`tttlm.ops.triton_window_fwd`: the head width split into powers of two, not padded);
* ``frozen-triton``: ``triton-fwd``, with the chunk's own keys' backward through Triton too
  (:mod:`tttlm.ops.triton_own_dkdv`; what ``auto`` runs on CUDA where FlashAttention pads
  the head width, here for every head width);
* ``flash-window``: ``auto``, with frozen chunks through FlashAttention's own window backward
  (dq, dk, dv for every key), what ``auto`` ran before ``frozen-dq``'s backward;
* ``cudnn-sequence``: ``auto``, with whole sequences' sliding windows without gradient through
  SDPA / the cuDNN pieces instead of the Triton window pass (:mod:`.window_sequence`).

:func:`register_attention_backend` adds one (subclass :class:`AutoBackend` to replace one shape).
Backends resolve their fast paths lazily: nothing imports Triton or ``flex_attention`` at
import time.

The active backend is process-wide, not per thread or context: autograd runs backward (and
the recomputation of checkpointed chunks) on its own threads, which must see the same backend.
Layout ``[B, T, H, d]`` except in decoding; RoPE is applied by callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tttlm.ops.attention._common import common_dtype
from tttlm.ops.attention.backends import (
    AttentionBackend,
    AutoBackend,
    BandedBackend,
    CudnnSequenceBackend,
    FirstOrderBackend,
    FlashWindowBackend,
    FrozenDqBackend,
    FrozenTritonBackend,
    NaiveBackend,
    PiecesBackend,
    TritonBackend,
    TritonForwardBackend,
)
from tttlm.ops.attention.naive import naive_attention, window_mask

__all__ = [
    "AttentionBackend",
    "AutoBackend",
    "BandedBackend",
    "CudnnSequenceBackend",
    "FirstOrderBackend",
    "FlashWindowBackend",
    "FrozenDqBackend",
    "FrozenTritonBackend",
    "PiecesBackend",
    "NaiveBackend",
    "TritonBackend",
    "TritonForwardBackend",
    "attention_backend",
    "attention_backend_names",
    "chunk_attention",
    "decode_attention",
    "expand_kv_heads",
    "get_attention_backend",
    "naive_attention",
    "register_attention_backend",
    "sequence_attention",
    "window_mask",
]

_REGISTRY: dict[str, AttentionBackend] = {}
# A name, looked up per call, so that replacing a registered backend takes effect at once.
_active = "auto"


def register_attention_backend(backend: AttentionBackend, *,
                               replace: bool = False) -> AttentionBackend:
    """Make ``backend`` selectable as ``attention_backend(backend.name)``; returns it.

    A name already taken is refused unless ``replace`` (replacing ``auto`` changes the
    default of the whole process).
    """
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"an attention backend must be an AttentionBackend, not "
                        f"{type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(backend).__name__} has no name (set the class attribute "
                         "`name`)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"attention backend {name!r} is already registered "
                         "(pass replace=True to replace it)")
    _REGISTRY[name] = backend
    return backend


def attention_backend_names() -> tuple[str, ...]:
    """The registered backends' names, built-in ones first."""
    return tuple(_REGISTRY)


def get_attention_backend() -> AttentionBackend:
    """The backend the entry points call now (``auto`` outside any override)."""
    return _REGISTRY[_active]


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[AttentionBackend]:
    """Run the block with the backend registered as ``name`` (``naive`` for references,
    ``auto`` by default); overrides nest, and the previous one comes back on exit."""
    global _active
    if name not in _REGISTRY:
        raise ValueError(f"attention backend {name!r} is not known; use one of "
                         f"{attention_backend_names()}")
    previous, _active = _active, name
    try:
        yield _REGISTRY[name]
    finally:
        _active = previous


for _builtin in (AutoBackend(), NaiveBackend(), TritonBackend(), BandedBackend(),
                 FirstOrderBackend(), PiecesBackend(), FrozenDqBackend(),
                 FlashWindowBackend(), TritonForwardBackend(),
                 FrozenTritonBackend(), CudnnSequenceBackend()):
    register_attention_backend(_builtin)
del _builtin


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: ``k``, ``v`` with each of their heads (axis ``dim``) repeated
    for the query heads it serves (KV head ``j`` serves query heads ``j*g .. j*g+g-1``, as
    transformers' ``repeat_kv``), so that every backend sees as many KV heads as query heads.
    Caches keep only the KV heads; the copy lives for one attention call."""
    groups = q.shape[dim] // k.shape[dim]
    if groups == 1:
        return k, v
    return (k.repeat_interleave(groups, dim=dim), v.repeat_interleave(groups, dim=dim))


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       window: int | None, block: int) -> torch.Tensor:
    """Causal attention over a whole sequence ``[B, T, H, d]``, limited to ``window`` keys
    when given.

    ``block`` is the query-block size of the banded path used when the window is shorter
    than the sequence (the model passes its chunk size).
    """
    k, v = expand_kv_heads(q, k, v, 2)
    return _REGISTRY[_active].sequence(q, k, v, window, block)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_pos: torch.Tensor, k_pos: torch.Tensor,
                    window: int | None, frozen_keys: int = 0) -> torch.Tensor:
    """Attention of a chunk's queries over cached keys plus the chunk's own keys.

    Positions are absolute token indices (used only for the mask); every query must see at
    least one key. Differentiable twice with ``frozen_keys=0``: ``auto`` runs the Triton
    kernel on CUDA (``triton`` anywhere Triton runs), the naive reference otherwise.
    ``frozen_keys``: the first keys' gradient is not wanted (a detached cache) and the
    chunk is differentiated once (prefill, evaluation): ``auto`` takes first-order kernels
    (:func:`~tttlm.ops.attention.backends.first_order_chunk`), whose backward on CUDA computes
    only dq for those keys.
    """
    k, v = expand_kv_heads(q, k, v, 2)
    return _REGISTRY[_active].chunk(q, k, v, q_pos, k_pos, window, frozen_keys)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """``q [B, H, n, d]`` over ``k, v [B, H, C, d]`` with a bool ``mask [B, 1, n, C]``.

    ``auto``: one query (decoding) goes through two batched matmuls, which read the cache
    once with the whole GPU (fused kernels parallelise over queries and leave it idle for
    n = 1); scores and softmax in fp32 (fp64 for fp64), as the reference ``naive_attention``.
    Several queries (prefill, the inner step) use SDPA, which never materialises ``[n, C]``
    scores.
    """
    # One dtype (autocast's where it is on): a state's rings may be narrower than q
    # (made under autocast, read without it).
    q, k, v = common_dtype(q, *expand_kv_heads(q, k, v, 1))
    return _REGISTRY[_active].decode(q, k, v, mask)
