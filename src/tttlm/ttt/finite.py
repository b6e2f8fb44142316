"""Test-time inner updates that are not finite are dropped, per sequence, without costing a
pass over the fast weights or a stall of the GPU.

At test time (no outer gradient) a sequence whose inner update is not finite (a NaN or
infinite loss, gradient or step makes its update norm non-finite) keeps its fast weights and
optimizer state; callers see the non-finite norm. Selecting on the device
(``torch.where`` over every fast weight) costs a full pass per chunk (3% of a 3b prefill on
an H200); reading the flag on the host right after the step stalls the host until the GPU
has caught up, and the GPU then idles while the host queues the next chunk (2.4% at 128K).

:class:`FiniteGuard` does neither when it can: the flag goes to the host asynchronously when
the step is queued, and the host reads it once the next chunk's first block is queued, so the
GPU has work while the host waits. When every update was finite (always, in practice)
nothing else happens; otherwise the old weights are selected for the failed sequences and the
caller redoes the first block with them. Under CUDA-graph capture or compilation, where the
host cannot look, the selection runs on the device every time.

An optimizer that updates in place (``InnerOptimizer.step_``, the official SGD on weights a run
owns) needs none of this: its one pass over the weights reads and writes only the sequences
whose update is finite.
"""

from __future__ import annotations

import torch

from tttlm.ttt.base import InnerState
from tttlm.ttt.fast import FastWeights, PrimeWeights


def keep_finite(ok: torch.Tensor, old_fast: FastWeights, old_state: InnerState,
                new_fast: FastWeights, new_state: InnerState
                ) -> tuple[FastWeights, InnerState]:
    """``new_fast`` / ``new_state`` for the sequences where ``ok [B]``, the old ones elsewhere."""

    def keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(ok.view(-1, *([1] * (new.dim() - 1))), new, old.detach())

    return ([PrimeWeights(*map(keep, n, o)) for n, o in zip(new_fast, old_fast)],
            {k: [keep(n, o) for n, o in zip(v, old_state[k])] for k, v in new_state.items()})


def host_cannot_look(t: torch.Tensor) -> bool:
    """True inside CUDA-graph capture or torch.compile, where a device value cannot be read."""
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    return capturing or torch.compiler.is_compiling()


class FiniteGuard:
    """Watches the inner updates of a run of chunks (see the module's docstring).

    ``deferred=False``: :meth:`watch` settles at once (one host read per update; for a single
    chunk, as the engine's decoding steps take). ``deferred=True``: :meth:`watch` queues the
    check and the caller calls :meth:`settle` once more work is queued, and at the end.
    """

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        # What the last failed check selected, until the caller takes it (pop_corrected).
        self.corrected: tuple[FastWeights, InnerState] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None,
                             FastWeights, InnerState, FastWeights, InnerState] | None = None

    def watch(self, norm: torch.Tensor, old_fast: FastWeights, old_state: InnerState,
              new_fast: FastWeights, new_state: InnerState
              ) -> tuple[FastWeights, InnerState]:
        """The update ``old → new`` with norms ``norm [B]``: returns what to continue with
        (``new`` unless the check ran now and failed)."""
        ok = torch.isfinite(norm)
        if host_cannot_look(norm):
            return keep_finite(ok, old_fast, old_state, new_fast, new_state)
        assert self._pending is None, "settle() the previous update first"
        all_ok = ok.all()
        event = None
        if all_ok.is_cuda:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(all_ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag = all_ok
        self._pending = (ok, flag, event, old_fast, old_state, new_fast, new_state)
        if self.deferred:
            return new_fast, new_state
        fixed = self.settle()
        return fixed if fixed is not None else (new_fast, new_state)

    @property
    def pending(self) -> bool:
        """Whether an update awaits :meth:`settle`."""
        return self._pending is not None

    def settle(self) -> tuple[FastWeights, InnerState] | None:
        """Read the pending check: ``None`` when every update was finite (or nothing is
        pending), otherwise the fast weights and inner state to use instead of the new ones."""
        if self._pending is None:
            return None
        ok, flag, event, old_fast, old_state, new_fast, new_state = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # waits for the step only, not for what was queued since
        if bool(flag):
            return None
        self.corrected = keep_finite(ok, old_fast, old_state, new_fast, new_state)
        return self.corrected

    def pop_corrected(self) -> tuple[FastWeights, InnerState] | None:
        """What the last failed :meth:`settle` selected (once), or ``None``."""
        corrected, self.corrected = self.corrected, None
        return corrected
