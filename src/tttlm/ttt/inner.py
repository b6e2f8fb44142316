"""One inner (test-time) SGD step on the fast weights of every sequence of a batch.

``W ← W − η · clip(∂ℓ/∂W)`` where ℓ is each sequence's own chunk loss and the clip rescales the
gradient of each sequence to a global L2 norm (over all TTT layers' matrices together) of at most
``clip``. How the outer gradient treats the step is a :class:`GradMode`.

The pieces (:func:`inner_gradient`, :func:`descend`) are shared with the other inner optimizers
(:mod:`tttlm.ttt.optim`), so that they all clip exactly as the official step does.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch

from tttlm.ops.triton_runtime import triton_available
from tttlm.ttt.modes import GradMode  # defined apart (torch-free); imported from here too


def tensor_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sequence L2 norm of each tensor ``[B, ...]``: ``[N, B]`` (fp32, fp64 for fp64).

    One reduction per tensor, without a squared copy of gradients as large as the fast weights;
    vector_norm's derivative is defined (zero) at a zero gradient. (The model's fast-weight
    gradients are contiguous, so the flattening is a view, not a copy.)
    """
    return torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=-1,
                                                 dtype=torch.float64 if g.dtype == torch.float64
                                                 else torch.float32) for g in grads])


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sequence L2 norm ``[B]`` over all tensors ``[B, ...]`` together (fp32, fp64 for fp64)."""
    return torch.linalg.vector_norm(tensor_norms(grads), dim=0)


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


class InnerGradient(NamedTuple):
    """The raw inner gradient and its clip; ``clip(g) = scale · g`` per sequence."""

    grads: list[torch.Tensor]  # ∂ℓ/∂W, one [B, ...] per fast tensor; constants unless EXACT
    norms: torch.Tensor  # [N, B] per-tensor norms of the raw gradient
    norm: torch.Tensor  # [B] global norm over all tensors
    scale: torch.Tensor  # [B] clip factor; a constant unless EXACT


def inner_gradient(loss: torch.Tensor, fast: Sequence[torch.Tensor], clip: float,
                   mode: GradMode, wrt: Sequence[torch.Tensor] | None = None) -> InnerGradient:
    """Gradient of each sequence's ``loss [B]`` w.r.t. its own rows of ``fast`` (each
    ``[B, ...]``), its norms and the global-norm clip factor, treated as ``mode`` says:
    differentiable (``EXACT``, create_graph) or constants (``FIRST_ORDER``, ``NONE``).

    ``wrt``: the tensors the loss was computed from in place of ``fast`` (``NONE`` only):
    their low-precision copies (bf16 for fp32 weights), leaves that require grad. The gradient
    is then taken, and returned, in their dtype: the same values as with respect to ``fast``
    (whose gradient is that one cast up), without the cast pass over every fast weight, and
    read at half the width by the norms and the update."""
    exact = mode is GradMode.EXACT
    if wrt is not None and mode is not GradMode.NONE:
        raise ValueError("inner_gradient: wrt is for steps without an outer gradient "
                         "(GradMode.NONE)")
    # Sequences are independent, so ∂(Σ_b ℓ_b)/∂W[b] = ∂ℓ_b/∂W[b]: one backward for the batch.
    grads = torch.autograd.grad(loss.sum(), list(fast if wrt is None else wrt),
                                create_graph=exact, retain_graph=mode is not GradMode.NONE)
    norms = tensor_norms(grads)
    norm = torch.linalg.vector_norm(norms, dim=0)
    scale = clip_scale(grads, clip, norm)
    if not exact:
        grads = tuple(g.detach() for g in grads)
        scale = scale.detach()
    return InnerGradient(list(grads), norms, norm, scale)


def per_sequence(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``coef [B]`` shaped ``[B, 1, …]`` to broadcast over ``like [B, ...]``, in its dtype."""
    return coef.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _descend_kernels(fast: Sequence[torch.Tensor]) -> ModuleType | None:
    """:mod:`tttlm.ops.triton_descend` for CUDA tensors where Triton is available, else None
    (imported here, not at module import: it imports Triton)."""
    if fast and fast[0].is_cuda and triton_available():
        from tttlm.ops import triton_descend
        return triton_descend
    return None


def update_norms(g: InnerGradient, lr: float | torch.Tensor) -> torch.Tensor:
    """The norm of each sequence's update ``[B]`` (fp32): ‖η·scale·g‖ = η·scale·‖g‖, no pass
    over the update itself."""
    with torch.no_grad():
        return (g.scale * g.norm).float() * lr


def descend(fast: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            coef: torch.Tensor) -> list[torch.Tensor]:
    """``W + coef·g`` for every tensor, ``coef [B]`` per sequence: one addcmul pass each, in
    W's dtype (a bf16 ``g`` is widened exactly inside the pass). On a GPU, where nothing needs
    a gradient (no outer gradient), fp32 weights take one Triton pass each instead
    (:mod:`tttlm.ops.triton_descend`: ATen's addcmul copies a bf16 gradient to fp32 first and
    cannot vectorise the broadcast factor)."""
    kernel = _descend_kernels(fast)
    return [kernel.triton_descend(w, g, coef)
            if kernel is not None and kernel.triton_descend_can_run(w, g, coef)
            else torch.addcmul(w, g, per_sequence(coef, w)) for w, g in zip(fast, grads)]


def descend_(fast: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], coef: torch.Tensor,
             ok: torch.Tensor, low: Sequence[torch.Tensor] | None = None) -> None:
    """:func:`descend` written into ``fast`` for the sequences where ``ok [B]`` (the others
    keep their weights), and ``low`` (copies of ``fast`` in a narrower dtype, if given) set
    to the new weights cast to theirs: the update of a CUDA graph's own buffers. Under no
    grad. On a GPU one Triton pass per tensor, which reads and writes nothing of a sequence
    whose update is dropped (:func:`tttlm.ops.triton_descend.triton_descend_`); elsewhere
    addcmul and two selects, the same bits."""
    kernel = _descend_kernels(fast)
    with torch.no_grad():
        for i, (w, g) in enumerate(zip(fast, grads, strict=True)):
            lo = None if low is None else low[i]
            if kernel is not None and kernel.triton_descend_in_place_can_run(w, g, coef, lo):
                kernel.triton_descend_(w, g, coef, ok, lo)
                continue
            take = ok.view(-1, *([1] * (w.dim() - 1)))
            new = torch.addcmul(w, g, per_sequence(coef, w))
            torch.where(take, new, w, out=w)
            if lo is not None:
                torch.where(take, w.to(lo.dtype), lo, out=lo)


def inner_step(loss: torch.Tensor, fast: Sequence[torch.Tensor], lr: float | torch.Tensor,
               clip: float, mode: GradMode, wrt: Sequence[torch.Tensor] | None = None
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Take one step from per-sequence losses ``loss [B]`` on ``fast`` (each ``[B, ...]``).

    Returns the new fast weights and the norm of each sequence's update ``[B]``.
    In ``NONE`` mode ``fast`` must be leaves that require grad, or ``wrt`` their
    low-precision copies that the loss was computed from (see :func:`inner_gradient`); the
    results are detached. This is :class:`tttlm.ttt.sgd.ClippedSGD` on a flat list of tensors.
    """
    g = inner_gradient(loss, fast, clip, mode, wrt)
    # W - η·scale·g in one pass per tensor (addcmul), η·scale per sequence.
    new = descend(fast, g.grads, -(lr * g.scale))
    if mode is GradMode.NONE:
        new = [w.detach() for w in new]
    return new, update_norms(g, lr)


def inner_step_(loss: torch.Tensor, fast: Sequence[torch.Tensor], lr: float | torch.Tensor,
                clip: float, wrt: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`inner_step` without an outer gradient (``NONE``), written into ``fast`` (and
    ``wrt``, their low-precision copies the loss was computed from, then updated to match)
    for the sequences whose update is finite; the others keep their weights, as the
    finiteness guard of a run of chunks has them do. Returns the update norms ``[B]``
    (non-finite where the update was dropped). The same bits as :func:`inner_step` followed
    by that guard's selection."""
    g = inner_gradient(loss, fast, clip, GradMode.NONE, wrt)
    update_norm = update_norms(g, lr)
    descend_(fast, g.grads, -(lr * g.scale), torch.isfinite(update_norm), wrt)
    return update_norm
