"""The inner optimizer: what one test-time step does to the fast weights, as an object.

An :class:`InnerOptimizer` is an ``nn.Module`` so that it can own meta-learned parameters (a
learned inner learning rate); the model owns one, and an optimizer without parameters or
buffers adds no key to the model's state dict (official checkpoints keep their exact key set).

Its per-sequence state (momentum buffers, …) is an :data:`InnerState`: a dict of lists of
tensors ``[B, ...]``, so that the engine can save it in sessions, take rows and stack batches
without knowing the optimizer (:func:`index_state`, :func:`cat_states`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from tttlm.ttt.fast import FastWeights, PrimeWeights, flatten_fast
from tttlm.ttt.modes import GradMode

# name → one tensor [B, ...] per fast tensor (or any per-sequence tensors), {} when stateless.
InnerState = dict[str, list[torch.Tensor]]


class InnerOptimizer(nn.Module):
    """One inner step on every sequence's fast weights; subclasses set ``name`` and ``step``."""

    name: ClassVar[str] = ""  # the key in tttlm.ttt.optim.INNER_OPTIMIZERS
    # Whether step() takes ``wrt``: without an outer gradient, the model differentiates the
    # low-precision copies its blocks computed with instead of the fast weights (see
    # tttlm.ttt.inner.inner_gradient). An optimizer that does not is given leaves instead.
    takes_wrt: ClassVar[bool] = False
    # Whether step_() writes a step without an outer gradient into the fast weights: those a
    # run of chunks owns (TTTForCausalLM.run_ttt_chunks) and a CUDA graph's buffers
    # (tttlm.model.cuda_graph.ChunkGraph).
    updates_in_place: ClassVar[bool] = False

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"an inner optimizer needs at least one TTT layer, got {num_layers}")
        self.num_layers = num_layers

    def init_state(self, fast: FastWeights) -> InnerState:
        """The state before the first step for fast weights ``[B, ...]`` (stateless: ``{}``)."""
        return {}

    def step(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
             lr: float | torch.Tensor, clip: float, mode: GradMode
             ) -> tuple[FastWeights, InnerState, torch.Tensor]:
        """One step from each sequence's loss ``loss [B]``.

        Returns the new fast weights, the new state and the L2 norm of each sequence's update
        ``[B]`` (fp32). ``clip`` bounds each sequence's gradient norm over all layers together
        (≤ 0: no clip). ``mode``: ``EXACT`` differentiates through the inner gradient;
        ``FIRST_ORDER`` treats it as a constant; ``NONE`` wants ``fast`` as leaves that require
        grad and returns detached weights and state. An optimizer with ``takes_wrt`` also
        takes ``wrt`` (``NONE`` only): the leaves the loss was computed from in place of
        ``fast``, low-precision copies of it; the update still applies to ``fast``.
        """
        raise NotImplementedError

    def step_(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
              lr: float | torch.Tensor, clip: float, wrt: FastWeights | None = None
              ) -> torch.Tensor:
        """:meth:`step` without an outer gradient (``NONE``), written into ``fast``, ``state``
        and ``wrt`` (the leaves, then updated to match) for the sequences whose update is
        finite; the others keep theirs. Returns the update norms ``[B]``. Only where
        ``updates_in_place``."""
        raise NotImplementedError(f"{type(self).__name__} does not update in place")

    def forward(self, loss: torch.Tensor, fast: FastWeights, state: InnerState,
                lr: float | torch.Tensor, clip: float, mode: GradMode,
                wrt: FastWeights | None = None) -> tuple[FastWeights, InnerState, torch.Tensor]:
        """Calling the module is :meth:`step` (so ``torch.func.functional_call`` works)."""
        if wrt is None:
            return self.step(loss, fast, state, lr, clip, mode)
        return self.step(loss, fast, state, lr, clip, mode, wrt=wrt)  # type: ignore[call-arg]

    def flat(self, fast: Sequence[PrimeWeights]) -> list[torch.Tensor]:
        """``fast`` as a flat list of tensors, checked to have one entry per layer."""
        if len(fast) != self.num_layers:
            raise ValueError(f"{type(self).__name__} was built for {self.num_layers} TTT "
                             f"layers, got fast weights for {len(fast)}")
        return flatten_fast(fast)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: InnerState) -> InnerState:
    """``fn`` applied to every tensor of ``state``."""
    return {key: [fn(t) for t in tensors] for key, tensors in state.items()}


def index_state(state: InnerState, idx: torch.Tensor | slice | list[int]) -> InnerState:
    """Rows ``idx`` of every tensor of ``state`` (as :func:`~tttlm.ttt.fast.index_fast`)."""
    return map_state(lambda t: t[idx], state)


def cat_states(states: Sequence[InnerState]) -> InnerState:
    """The states of several batches as one batch, rows in order (they share their keys)."""
    if not states:
        return {}
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        raise ValueError("inner states to join must have the same keys")
    return {key: [torch.cat(parts) for parts in zip(*(s[key] for s in states))] for key in keys}
