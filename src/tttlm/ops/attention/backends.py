"""Attention backends: one object per way of computing the three shapes of attention.

A backend answers all three shapes, so that one override reaches training (whole sequences and
chunks), evaluation (the same, without outer gradient) and inference (decoding):

* ``sequence(q, k, v, window, block)``: causal attention over a whole sequence, limited to
  ``window`` keys when given; layout ``[B, T, H, d]``; first-order gradients only;
* ``chunk(q, k, v, q_pos, k_pos, window, frozen_keys=0)``: a chunk's queries over cached keys
  plus its own, masked by absolute positions; differentiable twice (the outer gradient of
  TTT-E2E differentiates the inner gradient); layout ``[B, T, H, d]``;
* ``decode(q, k, v, mask)``: a few queries over a cache with a per-sequence bool mask;
  ``q [B, H, n, d]``, ``k, v [B, H, C, d]``, ``mask [B, 1, n, C]``.

Built-in backends resolve their fast paths per call and import Triton or ``flex_attention``
only on first use.
"""

from __future__ import annotations

import abc

import torch

from tttlm.ops.attention import flash, flex, frozen, naive, pieces, sdpa, window_sequence
from tttlm.ops.attention import triton as triton_path
from tttlm.ops.attention._common import common_dtype
from tttlm.ops.triton_runtime import triton_can_run


class AttentionBackend(abc.ABC):
    """One way of computing the three shapes of attention, registered under ``name``.

    To replace one shape only, subclass :class:`AutoBackend` (or :class:`NaiveBackend`) and
    override that method. Methods must compute the function of :class:`NaiveBackend` (up to
    rounding) with the same output dtype; RoPE is applied by callers.
    """

    name: str = ""

    @abc.abstractmethod
    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        """Causal attention over ``[B, T, H, d]``, each query seeing at most ``window`` keys
        (all earlier ones for ``None``). ``block`` is a query-block size a blocked path may
        use (the model passes its chunk size); it does not change the result."""

    @abc.abstractmethod
    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        """``q [B, c, H, d]`` over ``k, v [B, past + c, H, d]``; key j is visible to query i
        iff ``0 <= q_pos[i] - k_pos[j] < window`` and ``k_pos[j] >= 0`` (every query must see
        one key). Differentiable twice. ``frozen_keys``: the first keys' gradient is not
        wanted (a detached cache); a backend may skip it (then first order only) or ignore
        the hint."""

    @abc.abstractmethod
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """``q [B, H, n, d]`` over ``k, v [B, H, C, d]`` where ``mask [B, 1, n, C]`` (bool)
        is True; returns ``[B, H, n, d]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NaiveBackend(AttentionBackend):
    """The reference everywhere: score matrices in memory, fp32 (fp64) softmax."""

    name = "naive"

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        return naive.naive_sequence_attention(q, k, v, window)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        # frozen_keys is only a saving: a detached cache gets no gradient here either.
        return naive.naive_chunk_attention(q, k, v, q_pos, k_pos, window)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        return naive.naive_decode_attention(q, k, v, mask)


def first_order_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      window: int | None, frozen_keys: int,
                      cache_dq_only: bool = True) -> torch.Tensor | None:
    """A chunk whose cached keys are frozen (no outer gradient) through kernels with a
    first-order backward, or ``None`` where none applies: on CUDA in fp16/bf16, a backward
    that computes the cache's share of dq only
    (:func:`~tttlm.ops.attention.frozen.frozen_chunk_attention`), where FlashAttention
    would pad the head width (80 = 64 + 16 split, which it pads to 96) after a Triton
    forward and with the chunk's own keys' backward in Triton too, otherwise after
    FlashAttention's sliding window forward, with its backward on the own keys (with
    ``cache_dq_only=False``,
    or a head width the kernels do not split, FlashAttention's own window forward and
    backward); otherwise, while no cached key has left the window, SDPA with a
    lower-right causal bias (any device), and once the cache is full ``flex_attention`` with a
    block mask (CUDA). Chunks are laid out as :class:`~tttlm.model.cache.ChunkKV` lays them
    out (consecutive positions, the chunk's keys last)."""
    if frozen_keys <= 0:
        return None
    q, k, v = common_dtype(q, k, v)
    # (CUDA only: on a CPU the kernels run under Triton's interpreter, for tests)
    if cache_dq_only and q.is_cuda and frozen.frozen_can_run(q, k, window, frozen_keys):
        # 3b on one H100 (benchmarks/results/frozen_dq_3b_h100.md): the cache-dq-only
        # backward, 8K x 16 0.02691 -> 0.02593 s per 1K tokens, 128K x 1 0.03898 -> 0.03562;
        # then the Triton forward, 0.02517 -> 0.02496 and 0.03517 -> 0.03484. The forward only
        # where FlashAttention pads the head width (80 to 96): at a multiple of 32 it pads
        # nothing, and the Triton forward is not measured against it there. The own keys'
        # backward through Triton too (dk, dv in one pass over key tiles, their dq folded into
        # the cache's kernel) since its kernel takes no register transposes: 3b e2e on one
        # H100, 8K x 16 0.02337 -> 0.02313, 32K x 4 0.02767 -> 0.02726, 128K x 1 0.02965 ->
        # 0.02939 (benchmarks/results/prefill_own_dkdv_3b_h100.md).
        pads = frozen.flash_pads_head(q.shape[-1])
        return frozen.frozen_chunk_attention(q, k, v, window, triton_forward=pads,
                                             triton_backward=pads)
    if flash.flash_window_can_run(q):
        return flash.flash_chunk_attention(q, k, v, window)
    if window is None or k.shape[1] <= window:
        return sdpa.suffix_causal_attention(q, k, v)
    if flex.flex_can_run(q) and flex.flex_chunk_allowed(q, k, window):
        return flex.flex_chunk_attention(q, k, v, window)
    return None


class AutoBackend(AttentionBackend):
    """The fastest path for the device, chosen per call:

    * sequence: a sliding window without gradient on CUDA, at a head width FlashAttention
      pads (80), the Triton window pass (:mod:`.window_sequence`); no window (or one as long
      as the sequence): SDPA with ``is_causal`` (flash on GPU); a shorter window: without a
      gradient on CUDA, two batched cuDNN pieces per sequence merged by log-sum-exp
      (:func:`~tttlm.ops.attention.pieces.cudnn_pieces_can_run`);
      else ``flex_attention`` on CUDA (head dim >= 16, a bounded number of shapes), banded
      SDPA elsewhere;
    * chunk: without an outer gradient (frozen cached keys: prefill, evaluation), kernels with
      a first-order backward (:func:`first_order_chunk`): FlashAttention's sliding window in
      fp16/bf16 on CUDA; otherwise SDPA with a lower-right causal bias while the keys fit the
      window, ``flex_attention`` with a block mask once the cache is full; chunks that
      meta-training differentiates twice, the Triton kernel on CUDA (fp16, bf16, fp32) when
      Triton is installed; the naive reference elsewhere. (Measured on one H200, 3b e2e
      prefill at 128K: 0.0490 -> 0.0410 s per 1K tokens against flex for both,
      ``benchmarks/results/prefill_flash_3b.md``.)
    * decode: two matmuls for one query, SDPA with the mask for several.
    """

    name = "auto"
    # A frozen chunk's backward computes only the cache's share of dq on CUDA (False: through
    # FlashAttention's own window backward, ``flash-window``)
    cache_dq_only = True
    # A sliding window over whole sequences without gradient through the Triton window pass
    # on CUDA where the head width is padded by the libraries (False: SDPA / cuDNN pieces,
    # ``cudnn-sequence``)
    triton_sequence = True

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        T = q.shape[1]
        if (self.triton_sequence and q.is_cuda
                and window_sequence.window_sequence_can_run(q, k, v, window)):
            assert window is not None
            return window_sequence.window_sequence_attention(q, k, v, window)
        if window is None or window >= T:
            return sdpa.causal_attention(q, k, v)
        if pieces.cudnn_pieces_can_run(q, window):
            assert window is not None
            return pieces.window_attention_pieces(*common_dtype(q, k, v), window, window)
        if flex.flex_can_run(q) and flex.flex_shape_allowed(q, window):
            return flex.flex_window_attention(q, k, v, window)
        return sdpa.banded_attention(q, k, v, window, min(block, T))

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        first = first_order_chunk(q, k, v, window, frozen_keys, self.cache_dq_only)
        if first is not None:
            return first
        return self.chunk_twice_differentiable(q, k, v, q_pos, k_pos, window, frozen_keys)

    def chunk_twice_differentiable(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   q_pos: torch.Tensor, k_pos: torch.Tensor,
                                   window: int | None, frozen_keys: int = 0) -> torch.Tensor:
        """A chunk through kernels that meta-training can differentiate twice."""
        if q.is_cuda and q.dtype in triton_path.TRITON_DTYPES and triton_can_run(q):
            return triton_path.triton_chunk(q, k, v, q_pos, k_pos, window, frozen_keys)
        return naive.naive_chunk_attention(q, k, v, q_pos, k_pos, window)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        if q.shape[2] > 1:
            return sdpa.masked_attention(q, k, v, mask)
        # One query: the matmuls read the cache once with the whole GPU (see naive).
        return naive.naive_decode_attention(q, k, v, mask)


class TritonBackend(AutoBackend):
    """As ``auto``, but every chunk takes the Triton kernel (frozen caches too, as ``auto`` did
    before it took first-order kernels there) on any tensor Triton can run: CPU tensors under
    ``TRITON_INTERPRET=1`` (the kernel's tests), fp64 there too; naive without Triton."""

    name = "triton"

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        if triton_can_run(q):
            return triton_path.triton_chunk(q, k, v, q_pos, k_pos, window, frozen_keys)
        return naive.naive_chunk_attention(q, k, v, q_pos, k_pos, window)


class BandedBackend(AutoBackend):
    """As ``auto``, but windowed whole sequences go through banded SDPA instead of
    ``flex_attention`` on every device (benchmarks, a fallback)."""

    name = "banded"

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        T = q.shape[1]
        if window is None or window >= T:
            return sdpa.causal_attention(q, k, v)
        return sdpa.banded_attention(q, k, v, window, min(block, T))


class FirstOrderBackend(AutoBackend):
    """The name under which the first-order chunk kernels were opt-in; ``auto`` takes them now
    (:func:`first_order_chunk`). Kept so that commands and scripts naming it still run."""

    name = "first-order"


class PiecesBackend(AutoBackend):
    """As ``auto``, with the pieces of :mod:`tttlm.ops.attention.pieces` wherever they apply:
    windowed whole sequences that take no gradient on any device (through FlashAttention on a
    GPU without cuDNN's attention, the CPU kernels in tests), and every frozen TTT chunk with
    a cache (full, or not yet cut by the window) as pieces with a first-order backward,
    through cuDNN where it runs and FlashAttention otherwise, in place of ``auto``'s flash
    window. With a gradient through whole sequences, or a gradient of a gradient, as
    ``auto``."""

    name = "pieces"

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        if pieces.chunk_pieces_can_run(q, k, window, frozen_keys):
            return pieces.chunk_attention_pieces(*common_dtype(q, k, v), window)
        return super().chunk(q, k, v, q_pos, k_pos, window, frozen_keys)

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        if window is not None and pieces.pieces_can_run(q, window, window):
            # blocks as long as the window: two batched pieces per sequence
            return pieces.window_attention_pieces(*common_dtype(q, k, v), window, window)
        return super().sequence(q, k, v, window, block)


class FlashWindowBackend(AutoBackend):
    """As ``auto``, but a TTT chunk over a frozen cache on CUDA takes FlashAttention's own
    window backward (dq, dk and dv for every key) instead of the cache-dq-only backward: what
    ``auto`` ran before it took that one (benchmarks, a fallback)."""

    name = "flash-window"
    cache_dq_only = False


class CudnnSequenceBackend(AutoBackend):
    """As ``auto``, but a sliding window over whole sequences without gradient keeps SDPA's
    causal attention or the cuDNN pieces instead of the Triton window pass: what ``auto`` ran
    before it took that one (benchmarks, a fallback)."""

    name = "cudnn-sequence"
    triton_sequence = False


class FrozenDqBackend(AutoBackend):
    """A TTT chunk over a frozen cache through
    :func:`~tttlm.ops.attention.frozen.frozen_chunk_attention` wherever it runs (CPU tensors
    too, under Triton's interpreter: tests): FlashAttention's window forward (a dense one on
    a CPU) and a backward that computes the cache's share of dq only (no dk, dv for keys
    whose gradient is thrown away). ``auto`` takes that backward on CUDA, after a Triton
    forward for a split head width (``triton-fwd``)."""

    name = "frozen-dq"
    triton_forward = False
    triton_backward = False

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
              frozen_keys: int = 0) -> torch.Tensor:
        if frozen.frozen_can_run(q, k, window, frozen_keys):
            return frozen.frozen_chunk_attention(*common_dtype(q, k, v), window,
                                                 triton_forward=self.triton_forward,
                                                 triton_backward=self.triton_backward)
        return super().chunk(q, k, v, q_pos, k_pos, window, frozen_keys)


class TritonForwardBackend(FrozenDqBackend):
    """As ``frozen-dq``, with the forward of those chunks through the Triton kernel of
    :mod:`tttlm.ops.triton_window_fwd` too (the head width split, not padded as
    FlashAttention pads 80 to 96), whose log-sum-exp both backward shares read: what
    ``auto`` runs on CUDA for a split head width; here for every head width and on CPU
    tensors too (under the interpreter)."""

    name = "triton-fwd"
    triton_forward = True


class FrozenTritonBackend(FrozenDqBackend):
    """As ``triton-fwd``, with the chunk's own keys' backward through Triton too
    (:mod:`tttlm.ops.triton_own_dkdv` for their dk, dv, their dq folded into the cache's dq
    kernel) instead of FlashAttention's: every kernel of a frozen chunk in Triton, for every
    head width and on CPU tensors (under the interpreter); what ``auto`` runs on CUDA where
    FlashAttention pads the head width."""

    name = "frozen-triton"
    triton_forward = True
    triton_backward = True
