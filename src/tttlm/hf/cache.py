"""``TTTCache``: the transformers ``Cache`` of a tttlm model, holding an inference ``State``.

The state is everything a sequence needs to continue — per layer the sliding-window key/value
ring, the fast weights learned so far, the pending chunk — and tttlm's :class:`Engine` reads
tokens into it. The cache adds what ``generate`` asks of a cache: how many input columns it has
read (``get_seq_length``, padding included, as transformers counts) and the batch edits of beam
search (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from tttlm.errors import UserError
from tttlm.inference import Engine, State


class TTTCache(Cache):
    """Per-sequence TTT state for ``TTTLMForCausalLM`` (sliding-window caches, fast weights,
    pending chunk), filled by the model's forward.

    Pass one to ``generate(..., cache=cache)`` to continue a conversation (a session): the
    ``input_ids`` then hold the whole conversation and only the columns after
    :meth:`get_seq_length` are read. ``TTTCache(state)`` continues a tttlm :class:`State`
    (``State.load(folder, model)``); ``cache.state.save(folder)`` saves one.
    """

    def __init__(self, state: State | None = None, seen: int | None = None) -> None:
        super().__init__(layers=[])
        self.state = state
        self.engine: Engine | None = None
        # Input columns read, padding included (transformers' cache length); a state made by
        # tttlm has no padding, so its longest sequence is the column count.
        self.seen = seen if seen is not None else (max(state.lengths) if state else 0)

    def __repr__(self) -> str:
        return f"TTTCache(seen={self.seen}, state={self.state!r})"

    # ----------------------------------------------------------------- what generate asks
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state's size does not grow with the context (e2e, swa)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False  # the engine runs its own (optionally CUDA-graphed) decode step

    @property
    def is_croppable(self) -> bool:
        return False  # fast weights cannot be rolled back token by token

    @property
    def is_sliding(self) -> list[bool]:
        return []

    @property
    def is_linear(self) -> list[bool]:
        return []

    def crop(self, tokens_to_remove: int) -> None:
        raise UserError("a TTT cache cannot be cropped (its fast weights have learned from the "
                        "tokens); assisted and contrastive decoding are not supported")

    def reset(self) -> None:
        self.state, self.engine, self.seen = None, None, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.select([int(i) for i in torch.as_tensor(indices).tolist()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: each beam continues the fast weights of the beam it came from."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = [r for r in range(self.state.batch_size) for _ in range(repeats)]
            self.state = self.state.select(rows)

    # --------------------------------------------------------------------- reading tokens
    def read(self, engine: Engine, input_ids: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        """Read the new columns ``input_ids [B, n]`` (``mask [B, n]``: 0 marks padding, which
        is skipped) into the state; return the logits of each row's last real token ``[B, V]``.
        One new token per row is the engine's decode step; more is its prefill."""
        if self.engine is not None and self.engine.model is not engine.model:
            raise UserError("this TTTCache belongs to another model; use a new cache (or the "
                            "cache this model's generate returned)")
        self.engine = engine
        B, n = input_ids.shape
        if self.state is not None and self.state.batch_size != B:
            raise UserError(f"input_ids has {B} rows for a TTTCache of "
                            f"{self.state.batch_size} sequences; continue with the same batch")
        padded = mask is not None and not bool(mask.bool().all())
        if padded:
            assert mask is not None
            rows: Any = [row[m.bool()] for row, m in zip(input_ids, mask)]
            if any(len(r) == 0 for r in rows):
                # Only at the start: a row with nothing real yet has no state to continue.
                raise UserError("a row of this batch has no real token in the new input "
                                "(attention_mask all 0); give every row at least one token")
        else:
            rows = input_ids
        if self.state is not None and not padded and n == 1:
            logits, self.state = engine.step(self.state, input_ids[:, 0])
        else:
            logits, self.state = engine.prefill(rows, self.state)
        self.seen += n
        return logits
