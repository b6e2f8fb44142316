"""Per-layer attention caches: where a block's keys live and which keys its queries see.

A block hands its cache the new rows' queries, keys (QK-normed) and values ``[B, n, H, d]``;
the cache applies RoPE at its positions (unless the block already did, see
:attr:`LayerCache.rope`), keeps what later rows will need, runs attention through the dispatch
point (:mod:`tttlm.ops.attention`) and returns ``[B, n, H, d]``. The block's math is the same
whatever the cache, so training, evaluation, prefill and decoding run one block forward
(:meth:`tttlm.model.layers.Block.forward`); only the cache differs:

=================  ============================================================================
``WholeSequence``  every row at once at positions ``0 .. T-1`` (prefix blocks, pretrain mode,
                   baselines; training, evaluation and a fresh prefill). With ``ring`` buffers
                   it also keeps the last keys for decoding.
``ChunkKV``        the TTT blocks, one chunk at a time over the keys (before RoPE) of earlier
                   chunks, at the *local* positions of the official code (the chunk's keys at
                   ``k .. k+c-1``). Plain tensors in, plain tensors out, so that autograd
                   (gradients of gradients) and activation checkpointing see no hidden state.
``RingKV``         decoding in a prefix block: a ring of rotated keys at absolute positions,
                   a per-sequence mask (sequences of a batch may sit at different positions).
``TTTRing``        decoding in a TTT block: the cache at the start of the pending chunk and
                   the pending chunk's own keys, at local positions.
=================  ============================================================================

The decoding caches write only the rows of the sequences that advance (``rows``) and take
every position from device tensors, so that one decoding step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tttlm.config import TTTConfig
from tttlm.ops.attention import chunk_attention, decode_attention, sequence_attention
from tttlm.ops.cache_swap import CacheSwap
from tttlm.ops.rope import apply_rope, config_rope_angles, frozen_chunk_operands

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin [n, d/2]


class LayerCache:
    """What a block's attention reads and writes (see the module docstring).

    ``rope``: RoPE tables of the new rows when every sequence has them at the same positions
    and the cache wants rotated keys: the block then rotates queries and keys inside its own
    (possibly compiled) projection. ``None``: the cache rotates them itself.
    """

    rope: RopeTables | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, mixer: Any, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
        """A recurrent block's token mixing (``mixer``: its TTT-KVB or Gated DeltaNet layer,
        :mod:`tttlm.model.layers`) over the state this cache holds."""
        raise NotImplementedError(f"{type(self).__name__} holds no recurrent state")


# ------------------------------------------------------------------------- whole sequences
class WholeSequence(LayerCache):
    """All rows of ``B`` sequences at positions ``0 .. T-1``, causal, limited to ``window``
    keys when given. ``block``: query-block size of the banded attention path.

    ``ring``: optional ``(keys, values)`` buffers ``[B, H, C, d]`` of a decoding cache (see
    :class:`RingKV`) that receive the rotated keys and values of the last ``C`` positions
    (token ``p`` in slot ``p % C``), so that decoding continues where this pass ends; for a
    recurrent block (TTT-KVB, Gated DeltaNet), the tensors of its decoding state
    (``State.mixers``).
    """

    def __init__(self, rope: RopeTables, window: int | None, block: int,
                 ring: tuple[torch.Tensor, ...] | None = None) -> None:
        self.rope = rope
        self.window = window
        self.block = block
        self.ring = ring

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.ring is not None:
            keys, values = self.ring
            T, C = k.shape[1], keys.shape[2]
            kept = min(T, C)
            slots = torch.arange(T - kept, T, device=k.device) % C
            keys[:, :, slots] = k[:, T - kept:].transpose(1, 2).to(keys.dtype)
            values[:, :, slots] = v[:, T - kept:].transpose(1, 2).to(values.dtype)
        return sequence_attention(q, k, v, self.window, self.block)

    def mix(self, mixer: Any, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
        # (a recurrent block's ``ring``: the decoding tensors of State.mixers)
        return mixer(x, q, k, v, self.ring)


class MixerStep(LayerCache):
    """A recurrent block's decoding state (its tensors of :class:`~tttlm.inference.State`'s
    ``mixers``) for new rows at chunk offsets ``offset [B]``, written in place for ``rows``."""

    def __init__(self, state: tuple[torch.Tensor, ...], offset: torch.Tensor,
                 rows: Rows) -> None:
        self.state, self.offset, self.rows = state, offset, rows

    def mix(self, mixer: Any, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
        return mixer.step(x, q, k, v, self.state, self.offset == 0, self.rows)


# ---------------------------------------------------------------------------- TTT chunks
class ChunkKV(LayerCache):
    """One chunk of a TTT block over the keys and values of earlier chunks.

    Args:
        keys, values: ``[B, past, H, d]``, keys before RoPE (at most ``window`` rows).
        start: absolute position of the chunk's first token (for the window mask).
        window: the sliding window k.
        rope: local RoPE tables of the ``past + c`` keys (cache, then chunk); the chunk's
            queries use the last ``c`` rows.
        frozen: no gradient is wanted for the cached keys and values (no outer gradient:
            evaluation, prefill, decoding). They are rotated apart so that no backward pass
            runs over them, and the attention kernel skips their gradient; first order only.
        compiled: (frozen only) the operands in one compiled pass
            (:func:`~tttlm.ops.rope.frozen_chunk_operands`).

        swap: (frozen only) the cache in two buffer sets
            (:class:`~tttlm.ops.cache_swap.CacheSwap`, ``keys`` and ``values`` then its first
            set's views): read from the set its parity names, the next chunk's written into
            the other (a CUDA graph's buffers, :class:`~tttlm.model.cuda_graph.ChunkBuffers`).

    After :meth:`attend`, ``keys`` / ``values`` hold the cache for the next chunk: the last
    ``window`` rows of cache ⊕ chunk (with ``swap``, its first set's ``next_*`` views: which
    set holds it is the parity's to say, flipped by the caller).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, window: int,
                 rope: RopeTables, frozen: bool, compiled: bool = False,
                 swap: CacheSwap | None = None) -> None:
        if swap is not None and not frozen:
            raise ValueError("ChunkKV: a cache in two buffer sets is for a frozen cache")
        self.keys, self.values = keys, values
        self.start = start
        self.window = window
        self.tables = rope
        self.frozen = frozen
        self.compiled = compiled
        self.swap = swap

    @classmethod
    def swapped(cls, swap: CacheSwap, start: int, window: int, rope: RopeTables,
                compiled: bool = False) -> ChunkKV:
        """A frozen chunk over a cache in two buffer sets (see ``swap`` above)."""
        return cls(swap.keys[0], swap.values[0], start, window, rope, True, compiled, swap)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables
        c, past, start = q.shape[1], self.keys.shape[1], self.start
        q_pos = torch.arange(start, start + c, device=q.device)
        k_pos = torch.arange(start - past, start + c, device=q.device)
        if self.swap is not None:
            q, k_rope, values, _ = frozen_chunk_operands(
                q, self.keys, k, self.values, v, cos, sin, self.window, self.compiled,
                self.swap)
            self.keys = self.swap.next_keys[0]
        elif self.frozen:
            q, k_rope, values, self.keys = frozen_chunk_operands(
                q, self.keys, k, self.values, v, cos, sin, self.window, self.compiled)
        else:
            keys = torch.cat((self.keys, k), dim=1)
            values = torch.cat((self.values, v), dim=1)
            k_rope = apply_rope(keys, cos, sin)
            q = apply_rope(q, cos[past:], sin[past:])
            self.keys = keys[:, -self.window:]
        out = chunk_attention(q, k_rope, values, q_pos, k_pos, self.window,
                              frozen_keys=past if self.frozen else 0)
        self.values = (values[:, -self.window:] if self.swap is None
                       else self.swap.next_values[0])
        return out


# ------------------------------------------------------------------------------ decoding
@dataclass
class Rows:
    """The sequences a decoding call writes: ``index [R]`` (``None``: all of them)."""

    index: torch.Tensor | None
    batch: int
    device: torch.device

    @property
    def column(self) -> torch.Tensor:
        """``[R, 1]`` row indices for advanced indexing together with ``[R, n]`` slots."""
        if self.index is None:
            return torch.arange(self.batch, device=self.device)[:, None]
        return self.index[:, None]

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of ``t [B, ...]`` that are written."""
        return t if self.index is None else t.index_select(0, self.index)


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, n, H, d]`` with per-sequence tables ``[B, n, d/2]``."""
    B, n, H, d = x.shape
    return apply_rope(x.reshape(B * n, H, d), cos.reshape(B * n, -1),
                      sin.reshape(B * n, -1)).view(B, n, H, d)


@dataclass
class RingStep:
    """What every prefix block of one decoding call shares: the new rows' RoPE tables
    ``[B, n, d/2]``, their ring slots ``[R, n]``, the visibility of the ring ``[B, 1, n, C']``
    (``C'`` = the used slots) and the written rows."""

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    used: int | None
    rows: Rows

    @classmethod
    def build(cls, lengths: torch.Tensor, n: int, capacity: int, window: int | None,
              used: int | None, rows: Rows, config: TTTConfig,
              dtype: torch.dtype) -> RingStep:
        """For sequences that have read ``lengths [B]`` tokens and now read ``n`` more."""
        device = lengths.device
        B = lengths.shape[0]
        q_pos = lengths[:, None] + torch.arange(n, device=device)  # [B, n]
        cos, sin = config_rope_angles(q_pos.reshape(-1), config, dtype)
        s = torch.arange(capacity, device=device)
        last = lengths[:, None] + n - 1  # [B, 1]
        if window is None:
            k_pos = s.expand(B, capacity)
        else:
            k_pos = last - torch.remainder(last - s, capacity)  # latest token held by slot s
        diff = q_pos[:, :, None] - k_pos[:, None, :]  # [B, n, C]
        allowed = (k_pos[:, None, :] >= 0) & (diff >= 0)
        if window is not None:
            allowed &= diff < window
        mask = allowed[:, None]
        if used is not None:
            mask = mask[..., :used]
        return cls(cos.view(B, n, -1), sin.view(B, n, -1),
                   rows.keep(torch.remainder(q_pos, capacity)), mask, used, rows)


class RingKV(LayerCache):
    """A prefix block's decoding cache: ``keys, values [B, H, C, d]``, keys rotated at their
    absolute positions; token ``p`` in slot ``p % C`` (``full`` attention: slot ``p``, the
    buffers growing). Written in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, step: RingStep) -> None:
        self.keys, self.values, self.step = keys, values, step

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.step
        q, k = rope_rows(q, st.cos, st.sin), rope_rows(k, st.cos, st.sin)
        ri, keep = st.rows.column, st.rows.keep
        self.keys[ri, :, st.slots] = keep(k).to(self.keys.dtype)
        self.values[ri, :, st.slots] = keep(v).to(self.values.dtype)
        keys, values = self.keys, self.values
        if st.used is not None:
            keys, values = keys[:, :, :st.used], values[:, :, :st.used]
        return decode_attention(q.transpose(1, 2), keys, values, st.mask).transpose(1, 2)


def rope_slots(keys: torch.Tensor, config: TTTConfig) -> torch.Tensor:
    """RoPE of a TTT-block cache ``[B, H, S, d]`` whose slot ``s`` sits at local position ``s``."""
    cos, sin = config_rope_angles(torch.arange(keys.shape[2], device=keys.device), config,
                                  keys.dtype)
    return apply_rope(keys.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()



@dataclass
class TTTStep:
    """What every TTT block of one decoding call shares: local RoPE tables ``[B, n, d/2]`` of
    the new rows, their slots ``[R, n]`` and the visibility ``[B, 1, n, k+b]``."""

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    rows: Rows

    @classmethod
    def build(cls, offset: torch.Tensor, past: torch.Tensor, n: int, window: int, chunk: int,
              tables: RopeTables, rows: Rows) -> TTTStep:
        """For new rows at chunk offsets ``offset [B] .. offset + n - 1`` after ``past [B]``
        cached keys; ``tables``: local RoPE of positions ``0 .. k+b-1``."""
        device = offset.device
        at = offset[:, None] + torch.arange(n, device=device)  # [B, n] index in the chunk
        q_slot = window + at  # local position of each new token
        s = torch.arange(window + chunk, device=device)
        diff = q_slot[:, :, None] - s  # [B, n, k+b]
        mask = ((s >= window - past[:, None, None]) & (diff >= 0) & (diff < window))[:, None]
        return cls(tables[0][q_slot], tables[1][q_slot], rows.keep(q_slot), mask, rows)


class TTTRing(LayerCache):
    """A TTT block's decoding cache, ``[B, H, k+b, d]`` each: ``keys`` before RoPE (what
    :class:`ChunkKV` takes when the chunk is learned from), ``keys_rope`` the same rotated,
    ``values``. Slots ``k-past .. k-1`` hold the cache at the start of the pending chunk, slots
    ``k ..`` the pending chunk's keys. Written in place."""

    def __init__(self, keys: torch.Tensor, keys_rope: torch.Tensor, values: torch.Tensor,
                 step: TTTStep) -> None:
        self.keys, self.keys_rope, self.values, self.step = keys, keys_rope, values, step

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.step
        q, k_rope = rope_rows(q, st.cos, st.sin), rope_rows(k, st.cos, st.sin)
        ri, keep = st.rows.column, st.rows.keep
        self.keys[ri, :, st.slots] = keep(k).to(self.keys.dtype)
        self.keys_rope[ri, :, st.slots] = keep(k_rope).to(self.keys_rope.dtype)
        self.values[ri, :, st.slots] = keep(v).to(self.values.dtype)
        out = decode_attention(q.transpose(1, 2), self.keys_rope, self.values, st.mask)
        return out.transpose(1, 2)

