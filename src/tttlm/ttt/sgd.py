"""The official inner step: SGD on the globally clipped gradient (the default)."""

from __future__ import annotations

import torch

from tttlm.ttt.base import InnerOptimizer, InnerState
from tttlm.ttt.fast import FastWeights, unflatten_fast
from tttlm.ttt.inner import inner_step, inner_step_
from tttlm.ttt.modes import GradMode


class ClippedSGD(InnerOptimizer):
    """``W ← W − η · clip(∂ℓ/∂W)`` per sequence: :func:`~tttlm.ttt.inner.inner_step` itself, so
    bit for bit the official step. Stateless, no parameters (no state-dict keys)."""

    name = "sgd"
    takes_wrt = True
    updates_in_place = True

    def step(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
             lr: float | torch.Tensor, clip: float, mode: GradMode,
             wrt: FastWeights | None = None) -> tuple[FastWeights, InnerState, torch.Tensor]:
        new, update_norm = inner_step(loss, self.flat(fast), lr, clip, mode,
                                      None if wrt is None else self.flat(wrt))
        return unflatten_fast(new), {}, update_norm

    def step_(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
              lr: float | torch.Tensor, clip: float, wrt: FastWeights | None = None
              ) -> torch.Tensor:
        return inner_step_(loss, self.flat(fast), lr, clip,
                           None if wrt is None else self.flat(wrt))
