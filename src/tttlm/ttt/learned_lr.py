"""Clipped SGD with a meta-learned inner learning rate per TTT layer.

Per sequence: ``W_j ← W_j − η_j · clip(g)_j`` with ``η_j = η · exp(ρ_j)``, ``ρ`` a parameter
``[num_layers]`` learned by the outer loop, zero at init.

Choices:

* ``exp`` rather than ``softplus(ρ)/softplus(0)``: a learning rate lives on a log scale, and
  with ``exp`` the outer gradient of ``ρ_j`` is ``η_j · ∂L/∂η_j``, relative, so the outer
  optimizer moves ``η_j`` by ratios whatever ``η``'s magnitude; it stays positive; and
  ``exp(0) = 1`` exactly, so at init ``η_j = η`` and the step is bit for bit the official one
  (the factor multiplies the official coefficient ``−η·s`` last, and ``x · 1.0 = x`` exactly).
  The global clip bounds each step to ``η_j · clip`` even if ``ρ`` grows.
* the clip stays the official one: one factor per sequence from the raw gradient's norm over
  all layers together; only then is each layer's step scaled by its own ``exp(ρ_j)``.

``ρ`` gets an outer gradient in ``EXACT`` and ``FIRST_ORDER`` modes (it scales the update
linearly, so it needs no second-order term); in ``NONE`` the results are detached.
``exp(ρ)`` is computed in ``ρ``'s dtype, then cast to the clip factor's (fp32, fp64 for fp64).
"""

from __future__ import annotations

import torch
from torch import nn

from tttlm.ttt.base import InnerOptimizer, InnerState
from tttlm.ttt.fast import FastWeights, unflatten_fast
from tttlm.ttt.inner import inner_gradient, per_sequence
from tttlm.ttt.modes import GradMode


class LearnedLRSGD(InnerOptimizer):
    """Clipped SGD with ``η_j = η·exp(ρ_j)`` per layer; ``ρ`` is the parameter
    ``log_lr_scale [num_layers]`` (zeros: the official step). Stateless."""

    name = "learned_lr"
    takes_wrt = True

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.log_lr_scale = nn.Parameter(torch.zeros(num_layers))  # ρ [L]

    def lr_scales(self) -> torch.Tensor:
        """``η_j / η = exp(ρ_j)`` per layer ``[L]``."""
        return torch.exp(self.log_lr_scale)

    def step(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
             lr: float | torch.Tensor, clip: float, mode: GradMode,
             wrt: FastWeights | None = None) -> tuple[FastWeights, InnerState, torch.Tensor]:
        flat = self.flat(fast)
        g = inner_gradient(loss, flat, clip, mode, None if wrt is None else self.flat(wrt))
        coef = -(lr * g.scale)  # [B], as ClippedSGD
        factor = self.lr_scales().to(g.scale.dtype)  # [L]
        if mode is GradMode.NONE:
            factor = factor.detach()
        per_tensor = factor.repeat_interleave(3)  # [N]: w1, w2, w3 of each layer
        new = [torch.addcmul(w, gr, per_sequence(coef * per_tensor[i], w))
               for i, (w, gr) in enumerate(zip(flat, g.grads))]
        if mode is GradMode.NONE:
            new = [w.detach() for w in new]
        with torch.no_grad():
            # ‖update‖ = η·s·‖(exp(ρ_j)·‖g_t‖)_t‖: from the norms, no pass over the update
            norm = torch.linalg.vector_norm(g.norms * per_tensor[:, None], dim=0)  # [B]
            update_norm = (g.scale * norm).float() * lr
        return unflatten_fast(new), {}, update_norm
