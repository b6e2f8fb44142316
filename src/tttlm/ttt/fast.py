"""The fast weights: one prime SwiGLU MLP's three matrices per TTT layer, per sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class PrimeWeights(NamedTuple):
    """One TTT layer's prime MLP in nn.Linear layout, with a leading per-sequence axis ``B``
    (unbatched for the meta-learned W₀). A tuple, so the blocks take it as their ``fast``."""

    w1: torch.Tensor  # [B, F, D]
    w2: torch.Tensor  # [B, D, F]
    w3: torch.Tensor  # [B, F, D]


# One entry per TTT layer, in layer order.
FastWeights = list[PrimeWeights]


def flatten_fast(fast: Sequence[PrimeWeights]) -> list[torch.Tensor]:
    """The tensors of every layer in order (layer 0's w1, w2, w3, layer 1's w1, …): the order of
    ``TTTForCausalLM.fast_weight_names`` and of an :data:`~tttlm.ttt.optim.InnerState` list."""
    return [w for layer in fast for w in layer]


def unflatten_fast(tensors: Sequence[torch.Tensor]) -> FastWeights:
    """Inverse of :func:`flatten_fast`: groups of three tensors, one group per layer."""
    if len(tensors) % 3:
        raise ValueError(f"fast weights come three per layer, got {len(tensors)} tensors")
    return [PrimeWeights(*tensors[i:i + 3]) for i in range(0, len(tensors), 3)]


def map_fast(fn: Callable[[torch.Tensor], torch.Tensor],
             fast: Sequence[PrimeWeights]) -> FastWeights:
    """``fn`` applied to every tensor, the structure kept."""
    return [PrimeWeights(*(fn(w) for w in layer)) for layer in fast]


def index_fast(fast: Sequence[PrimeWeights], idx: torch.Tensor | slice | list[int]
               ) -> FastWeights:
    """Rows ``idx`` of the per-sequence axis of every tensor."""
    return map_fast(lambda w: w[idx], fast)


def cat_fast(parts: Sequence[Sequence[PrimeWeights]]) -> FastWeights:
    """The fast weights of several batches as one batch, rows in order."""
    return [PrimeWeights(*(torch.cat(ts) for ts in zip(*layers))) for layers in zip(*parts)]


def detach_fast(fast: Sequence[PrimeWeights]) -> FastWeights:
    return map_fast(torch.Tensor.detach, fast)


def fast_to(fast: Sequence[PrimeWeights], dtype: torch.dtype) -> FastWeights:
    return map_fast(lambda w: w.to(dtype), fast)


def expand_fast(fast: Sequence[PrimeWeights], batch: int) -> FastWeights:
    """Unbatched W₀ → one broadcast (not copied) view per sequence ``[batch, ...]``."""
    return map_fast(lambda w: w.unsqueeze(0).expand(batch, *w.shape), fast)
