"""Transformer blocks of TTT-E2E: sandwich-normed attention, prime MLP and SwiGLU MLP."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tttlm.config import TTTConfig
from tttlm.ops.attention import chunk_attention, sequence_attention
from tttlm.ops.norm import rms_norm
from tttlm.ops.rope import apply_rope

# The prime MLP's three matrices of one block, in nn.Linear layout: w1 [F, D], w2 [D, F],
# w3 [F, D], optionally with a leading batch axis (one copy per sequence).
FastWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
KVCache = tuple[torch.Tensor, torch.Tensor]  # keys after QK-norm, before RoPE; values. [B, t, H, d]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """``(silu(x W1ᵀ) * (x W3ᵀ)) W2ᵀ``; weights may carry a leading batch axis matching x."""
    return (F.silu(x @ w1.mT) * (x @ w3.mT)) @ w2.mT


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def weights(self) -> FastWeights:
        return self.w1.weight, self.w2.weight, self.w3.weight

    def forward(self, x: torch.Tensor, weights: FastWeights | None = None) -> torch.Tensor:
        return swiglu(x, *(weights if weights is not None else self.weights()))


class Attention(nn.Module):
    """Multi-head attention with QK-norm (shared over heads, before RoPE), no bias."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(D, D, bias=False)
        self.wk = nn.Linear(D, D, bias=False)
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (QK-normed, before RoPE) and v, each ``[B, T, H, d]``."""
        split = (self.num_heads, self.head_dim)  # head-major, as the official "(head head_dim)"
        q = self.q_norm(self.wq(x).unflatten(-1, split))
        k = self.k_norm(self.wk(x).unflatten(-1, split))
        v = self.wv(x).unflatten(-1, split)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.wo(out.flatten(-2))


class Block(nn.Module):
    """``h += post(attn(pre(h)))``; TTT blocks then ``h += post'(prime(pre'(h)))``; then the MLP."""

    def __init__(self, config: TTTConfig, has_prime: bool) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.attn_norm = RMSNorm(D, eps)
        self.attn = Attention(config)
        self.attn_post_norm = RMSNorm(D, eps)
        self.has_prime = has_prime
        if has_prime:
            assert config.prime_intermediate_size is not None
            self.prime_norm = RMSNorm(D, eps)
            self.prime = SwiGLU(D, config.prime_intermediate_size)
            self.prime_post_norm = RMSNorm(D, eps)
        self.mlp_norm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.mlp_post_norm = RMSNorm(D, eps)

    def feed_forward(self, h: torch.Tensor, fast: FastWeights | None = None) -> torch.Tensor:
        """Everything after attention: the prime MLP (with ``fast`` weights if given), the MLP."""
        if self.has_prime:
            h = h + self.prime_post_norm(self.prime(self.prime_norm(h), fast))
        return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h)))

    def attention_inputs(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys with RoPE (tables for the rows of ``h``), values."""
        q, k, v = self.attn.project(self.attn_norm(h))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def chunk_projections(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
        """q, k (QK-normed, before RoPE) and v of a chunk: what caches keep, before RoPE at
        the chunk's local positions."""
        return self.attn.project(self.attn_norm(h))

    def attention_output(self, h: torch.Tensor, out: torch.Tensor,
                         fast: FastWeights | None = None) -> torch.Tensor:
        """The residual update from the attention output ``out [B, T, H, d]``, then the rest."""
        h = h + self.attn_post_norm(self.attn.merge(out))
        return self.feed_forward(h, fast)

    def forward_sequence(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         window: int | None, block: int, compiled: bool = False) -> torch.Tensor:
        """The block over a whole sequence ``h [B, T, D]`` (RoPE tables for positions 0..T-1).

        ``compiled`` runs the code around the attention through ``torch.compile`` (fused
        norms, RoPE and casts; first-order differentiable only).
        """
        inputs, output = _parts(compiled, "sequence")
        q, k, v = inputs(self, h, cos, sin)
        return output(self, h, sequence_attention(q, k, v, window, block))

    def forward_chunk(self, h: torch.Tensor, cache: KVCache, start: int, window: int | None,
                      cos: torch.Tensor, sin: torch.Tensor, fast: FastWeights | None = None,
                      compiled: bool = False) -> tuple[torch.Tensor, KVCache]:
        """The block over one chunk ``h [B, c, D]`` starting at absolute position ``start``,
        attending to ``cache`` (the previous keys/values, ``[B, past, H, d]``).

        ``cos/sin`` are the RoPE tables of the ``past + c`` keys (cache, then chunk); the
        queries use the last ``c`` rows. Returns the output and the cache extended by this
        chunk, trimmed to ``window`` rows when a window is set. ``compiled`` as in
        :meth:`forward_sequence`, for chunks whose graph is differentiated once, without
        ``retain_graph`` (the compiled backward frees what it saved).
        """
        # Compiled parts have fixed shapes [B, c, ...]; the cache, whose length grows up to the
        # window, and RoPE over it stay eager (one complex multiply per tensor).
        project, output = _parts(compiled, "chunk")
        q, k, v = project(self, h)
        c, past = h.shape[1], cache[0].shape[1]
        keys = torch.cat((cache[0], k), dim=1)
        values = torch.cat((cache[1], v), dim=1)
        q_pos = torch.arange(start, start + c, device=h.device)
        k_pos = torch.arange(start - past, start + c, device=h.device)
        frozen = 0
        if cache[0].requires_grad or not torch.is_grad_enabled():
            k_rope = apply_rope(keys, cos, sin)
        else:
            # A detached cache (evaluation, prefill: the inner step's gradient stops at it):
            # rotate it apart so that no backward runs over it, and let the kernel skip its
            # dK, dV. Same values: RoPE is per row.
            frozen = past
            k_rope = torch.cat((apply_rope(cache[0], cos[:past], sin[:past]),
                                apply_rope(k, cos[past:], sin[past:])), dim=1)
        out = chunk_attention(apply_rope(q, cos[past:], sin[past:]), k_rope, values, q_pos,
                              k_pos, window, frozen_keys=frozen)
        if window is not None:
            keys, values = keys[:, -window:], values[:, -window:]
        return output(self, h, out, fast), (keys, values)


def _parts(compiled: bool, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """What runs before and after attention, eager or compiled."""
    if not compiled:
        before = Block.attention_inputs if kind == "sequence" else Block.chunk_projections
        return before, Block.attention_output
    return _COMPILED[kind]()


# torch.compile keeps its compiled graphs per code object, with a limit on their number: each
# use gets its own small function so that whole sequences and chunks (whose cache grows, and
# whose input may or may not require grad) do not share one budget.
def _sequence_inputs(block: Block, *args: Any) -> Any:
    return block.attention_inputs(*args)


def _sequence_output(block: Block, *args: Any) -> Any:
    return block.attention_output(*args)


def _chunk_projections(block: Block, *args: Any) -> Any:
    return block.chunk_projections(*args)


def _chunk_output(block: Block, *args: Any) -> Any:
    return block.attention_output(*args)


@functools.cache
def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled once, shared by every block: torch.compile treats the module as an input
    (its parameters are graph inputs), so 32 layers compile once per structure (with or without
    a prime MLP), not once per layer. Attention stays outside: SDPA, flex_attention and the
    Triton kernel are fused already."""
    return torch.compile(fn)


_COMPILED = {
    "sequence": lambda: (_compile(_sequence_inputs), _compile(_sequence_output)),
    "chunk": lambda: (_compile(_chunk_projections), _compile(_chunk_output)),
}
