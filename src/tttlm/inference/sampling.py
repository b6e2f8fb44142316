"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from tttlm.errors import UserError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that would sample garbage or fail deep in torch: a temperature that is
    negative or not finite, a negative ``top_k``, a ``top_p`` outside (0, 1]."""
    if (isinstance(temperature, bool) or not isinstance(temperature, Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise UserError(f"temperature={temperature!r} must be a finite number >= 0 (0 is "
                        "greedy, 1 samples from the model's distribution)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral)
                              or top_k < 0):
        raise UserError(f"top_k={top_k!r} must be an integer >= 0 (0 or None disables it)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                              or not 0 < top_p <= 1):
        raise UserError(f"top_p={top_p!r} must be in (0, 1] (1 or None disables it)")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (returns ``[B]`` int64).

    ``temperature == 0`` picks the argmax. Otherwise logits are divided by the temperature,
    restricted to the ``top_k`` most likely tokens (``0``: no limit) and to the smallest set
    whose probability reaches ``top_p`` (the most likely token always stays), and sampled with
    ``generator``. Bad settings raise :class:`~tttlm.errors.UserError` (see
    :func:`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
