"""One inner (test-time) SGD step on the fast weights of every sequence of a batch.

``W ← W − η · clip(∂ℓ/∂W)`` where ℓ is each sequence's own chunk loss and the clip rescales the
gradient of each sequence to a global L2 norm (over all TTT layers' matrices together) of at most
``clip``. How the outer gradient treats the step is a :class:`GradMode`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch


class GradMode(str, enum.Enum):
    EXACT = "exact"  # differentiate through the inner gradient (second order), as the paper
    FIRST_ORDER = "first_order"  # treat each inner gradient as a constant: W_{i+1} = W_i - η·sg(g)
    NONE = "none"  # no outer gradient (evaluation / inference): everything is detached


def clip_scale(grads: Sequence[torch.Tensor], clip: float) -> torch.Tensor:
    """Per-sequence factor ``[B]`` that brings the global gradient norm to at most ``clip``.

    Matches ``optax.clip_by_global_norm``: the gradient is kept when its norm is below ``clip``
    and divided by ``norm / clip`` otherwise; the chosen branch is differentiated through.
    """
    sq = sum(g.float().pow(2).flatten(1).sum(-1) if g.dtype != torch.float64
             else g.pow(2).flatten(1).sum(-1) for g in grads)
    norm = torch.sqrt(sq)  # [B]
    if clip <= 0:
        return torch.ones_like(norm)
    # clamp_min has zero derivative below `clip`, so the unclipped branch carries no term
    # through the norm, exactly like the select in the official code; it also keeps a zero
    # gradient (empty loss mask) from dividing by zero.
    return clip / norm.clamp_min(clip)


def inner_step(loss: torch.Tensor, fast: Sequence[torch.Tensor], lr: float | torch.Tensor,
               clip: float, mode: GradMode) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Take one step from per-sequence losses ``loss [B]`` on ``fast`` (each ``[B, ...]``).

    Returns the new fast weights and the norm of each sequence's update ``[B]``.
    In ``NONE`` mode ``fast`` must be leaves that require grad; the results are detached.
    """
    exact = mode is GradMode.EXACT
    grads = torch.autograd.grad(loss.sum(), list(fast), create_graph=exact,
                                retain_graph=mode is not GradMode.NONE)
    scale = clip_scale(grads, clip)
    if not exact:
        grads = tuple(g.detach() for g in grads)
        scale = scale.detach()
    steps = [g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads]
    new = [w - lr * s for w, s in zip(fast, steps)]
    if mode is GradMode.NONE:
        new = [w.detach() for w in new]
    with torch.no_grad():
        update_norm = torch.sqrt(sum(s.float().pow(2).flatten(1).sum(-1) for s in steps)) * lr
    return new, update_norm
