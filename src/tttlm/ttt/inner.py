"""One inner (test-time) SGD step on the fast weights of every sequence of a batch.

``W ← W − η · clip(∂ℓ/∂W)`` where ℓ is each sequence's own chunk loss and the clip rescales the
gradient of each sequence to a global L2 norm (over all TTT layers' matrices together) of at most
``clip``. How the outer gradient treats the step is a :class:`GradMode`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tttlm.ttt.modes import GradMode  # defined apart (torch-free); imported from here too


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sequence L2 norm ``[B]`` over all tensors ``[B, ...]`` together (fp32, fp64 for fp64).

    One reduction per tensor, without a squared copy of gradients as large as the fast weights;
    vector_norm's derivative is defined (zero) at a zero gradient.
    """
    per_tensor = [torch.linalg.vector_norm(g.flatten(1), dim=-1,
                                           dtype=torch.float64 if g.dtype == torch.float64
                                           else torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)


def clip_scale(grads: Sequence[torch.Tensor], clip: float,
               norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence factor ``[B]`` that brings the global gradient norm to at most ``clip``.

    Matches ``optax.clip_by_global_norm``: the gradient is kept when its norm is below ``clip``
    and divided by ``norm / clip`` otherwise; the chosen branch is differentiated through.
    ``norm`` is :func:`global_norm` of ``grads`` when the caller has it already.
    """
    norm = global_norm(grads) if norm is None else norm
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
    norm = global_norm(grads)
    scale = clip_scale(grads, clip, norm)
    if not exact:
        grads = tuple(g.detach() for g in grads)
        scale = scale.detach()
    # W - η·scale·g in one pass per tensor (addcmul), η·scale per sequence.
    coef = -(lr * scale)
    new = [torch.addcmul(w, g, coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
           for w, g in zip(fast, grads)]
    if mode is GradMode.NONE:
        new = [w.detach() for w in new]
    with torch.no_grad():
        # ‖η·scale·g‖ = η·scale·‖g‖: no pass over the update itself
        update_norm = (scale * norm).float() * lr
    return new, update_norm
