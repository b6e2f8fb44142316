"""Training with recall: teach the model to use passages quoted back into its window.

At inference the recall policy (:mod:`tttlm.memory.recall`) reads passages from far back right
before the query. A model never trained on such quotes may ignore them. This makes training
sequences that look alike, without labels: in a fraction of the sequences, a span that repeats
an earlier span from beyond the window gets the earlier passage quoted right before it
(``separator, passage, separator``, the sequence then cut back to its length). The quoted
tokens are not scored; the repeat after them is, so copying from the quote pays.
Deterministic in ``seed`` (the trainer passes its seed and step: resumes are exact).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class RecallInsertion(NamedTuple):
    """Where a quote went: the sequence ``row``, the stream index ``at`` it was inserted
    before, the stream index ``source`` of the quoted passage, and the inserted ``length``."""

    row: int
    at: int
    source: int
    length: int


def find_repeats(stream: np.ndarray, ngram: int, min_gap: int,
                 limit: int = 64) -> list[tuple[int, int]]:
    """Up to ``limit`` pairs ``(i, j)``: ``stream[j:j+ngram]`` repeats ``stream[i:i+ngram]``
    (its first occurrence) and at least ``min_gap`` tokens lie between them."""
    first: dict[bytes, int] = {}
    found = []
    for p in range(len(stream) - ngram + 1):
        key = stream[p:p + ngram].tobytes()
        i = first.setdefault(key, p)
        if i != p and p - (i + ngram) >= min_gap:
            found.append((i, p))
            del first[key]  # one repeat per span: the next occurrence starts a new pair
            if len(found) >= limit:
                break
    return found


def insert_recalls(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, window: int,
                   fraction: float, budget: int, separator: int, seed: tuple[int, ...],
                   ngram: int = 8) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                            list[RecallInsertion]]:
    """``(input_ids, labels, mask)`` with quotes inserted in about ``fraction`` of the rows
    (those that hold a repeat from beyond ``window``), and where they went.

    The quote is ``separator``, ``budget - 2`` tokens of the earlier passage (starting a
    quarter before the repeated span, so that it leads into it), ``separator``; targets that
    are quote tokens are not counted, every other target keeps its own mask.
    """
    input_ids, labels, mask = batch
    if fraction <= 0:
        return batch, []
    P = budget - 2
    if ngram > P:
        raise ValueError(f"a recall budget of {budget} tokens cannot quote a span of {ngram}")
    streams = torch.cat([input_ids, labels[:, -1:]], dim=1)  # [B, L+1]
    counted = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # counted[u]: target u
    out_s, out_m = streams.clone(), counted.clone()
    placed = []
    L1 = streams.shape[1]
    for b in range(streams.shape[0]):
        rng = np.random.default_rng([*seed, b])
        if rng.random() >= fraction:
            continue
        s = streams[b].cpu().numpy()
        pairs = find_repeats(s, ngram, window)
        if not pairs:
            continue
        i, j = pairs[int(rng.integers(len(pairs)))]
        start = max(0, i - P // 4)
        quote = [separator, *s[start:start + P].tolist(), separator]
        new_s = np.concatenate([s[:j], quote, s[j:]])[:L1]
        c = counted[b].cpu().numpy()
        new_c = np.concatenate([c[:j], np.zeros(len(quote), dtype=c.dtype), c[j:]])[:L1]
        out_s[b] = torch.from_numpy(new_s).to(streams)
        out_m[b] = torch.from_numpy(new_c).to(counted)
        placed.append(RecallInsertion(b, j, start, len(quote)))
    return (out_s[:, :-1], out_s[:, 1:], out_m[:, 1:]), placed
