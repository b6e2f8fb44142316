"""SGD with (heavy-ball) momentum on the clipped inner gradient.

Per sequence: ``m ← β·m + clip(g)``, ``W ← W − η·m``, with ``m = 0`` before the first step.

Choices:

* heavy ball on the *clipped* gradient: the official global-norm clip (over all TTT layers
  together) still bounds what one chunk adds, ``‖η·clip(g)‖ ≤ η·clip``, and ``β = 0`` is the
  official step; the momentum itself is not clipped again (it carries earlier chunks' clipped
  steps, which is its purpose).
* no dampening (``m ← β·m + clip(g)``, not ``+ (1−β)·clip(g)``): the first step equals the
  official step for any β and ``η`` keeps its meaning; PyTorch's ``SGD(momentum=β)`` does the
  same.
* the update is computed as ``(W − η·s·g) − η·β·m_old`` rather than ``W − η·m_new``: the same
  step, but its first term is the official step's own expression, so ``β = 0`` (and the first
  step for any β) is bit for bit :class:`~tttlm.ttt.sgd.ClippedSGD`.

How the outer gradient treats ``m`` follows the :class:`GradMode`: ``EXACT``: ``m`` carries its
graph, so the outer gradient reaches each earlier chunk's fast weights through every later
step's ``β^k·clip(g)``; ``FIRST_ORDER``: ``clip(g)`` is a constant, so ``m`` is a constant and
``W_{i+1} = W_i − η·m`` passes the outer gradient straight through ``W`` as the first-order SGD
step does; ``NONE``: everything, the new state included, is detached.
"""

from __future__ import annotations

import contextlib

import torch

from tttlm.ttt.base import InnerOptimizer, InnerState
from tttlm.ttt.fast import FastWeights, flatten_fast, unflatten_fast
from tttlm.ttt.inner import descend, global_norm, inner_gradient, per_sequence, update_norms
from tttlm.ttt.modes import GradMode


class MomentumSGD(InnerOptimizer):
    """Heavy-ball momentum ``β`` on the clipped inner gradient; state ``{"momentum": [m, …]}``,
    one buffer per fast tensor (order of :func:`~tttlm.ttt.fast.flatten_fast`), ``[B, ...]``."""

    name = "momentum"
    takes_wrt = True

    def __init__(self, num_layers: int, beta: float = 0.9) -> None:
        super().__init__(num_layers)
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
        self.beta = beta  # a hyperparameter (config), not a buffer: no state-dict key

    def init_state(self, fast: FastWeights) -> InnerState:
        # new_zeros, not zeros_like: W₀ is often an expanded (stride-0) view; m is a real [B, ...]
        return {"momentum": [w.new_zeros(w.shape) for w in flatten_fast(fast)]}

    def step(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
             lr: float | torch.Tensor, clip: float, mode: GradMode,
             wrt: FastWeights | None = None) -> tuple[FastWeights, InnerState, torch.Tensor]:
        flat = self.flat(fast)
        momentum = state.get("momentum")
        if momentum is None or len(momentum) != len(flat):
            raise ValueError("MomentumSGD.step needs the state from init_state (or a step) for "
                             "these fast weights")
        g = inner_gradient(loss, flat, clip, mode, None if wrt is None else self.flat(wrt))
        coef = -(lr * g.scale)  # [B], as ClippedSGD
        # NONE: no graph at all (the results would be detached anyway)
        with torch.no_grad() if mode is GradMode.NONE else contextlib.nullcontext():
            new = descend(flat, g.grads, coef)  # W − η·s·g: the official step
            if self.beta:
                # − η·β·m_old, so that W ends at W − η·(β·m_old + s·g) = W − η·m_new
                new = descend(new, momentum, -(lr * g.scale.new_full(g.scale.shape, self.beta)))
                # (in the buffers' dtype, whatever the gradient's: see inner_gradient's wrt)
                m_new = [torch.addcmul(self.beta * m, gr, per_sequence(g.scale, m))
                         for m, gr in zip(momentum, g.grads)]  # β·m + s·g, each [B, ...]
            else:
                m_new = [gr * per_sequence(g.scale, m) for m, gr in zip(momentum, g.grads)]
        # ‖η·m_new‖; without momentum as ClippedSGD, bit for bit
        with torch.no_grad():
            update_norm = (global_norm(m_new).float() * lr if self.beta
                           else update_norms(g, lr))
        return unflatten_fast(new), {"momentum": m_new}, update_norm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
