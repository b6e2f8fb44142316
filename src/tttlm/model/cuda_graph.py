"""CUDA graphs of what repeats with one shape: the capture helper the engine uses, and the
steady-state TTT chunk of a prefill (:class:`ChunkGraph`).

A 3b prefill at 128K runs 128 chunks one after another for one sequence; each chunk's step
(the TTT blocks forward, the head, the inner gradient, the clipped update) is about a
thousand kernel launches, and the host takes about as long to queue them as the GPU takes to
run them (``benchmarks/host_gap.py``: 34.0 ms against 33.9 ms a chunk on an H100). Once the
TTT caches are full every chunk's step has the same shapes, so it can be captured once and
replayed: one launch per chunk, and the host is free to run ahead.

The graph is kept for the model's later runs of the same shapes (:class:`KeptGraph`): its
making took 89 ms of a 3.9 s 3b step at 128K on an H100, the GPU idle while the host records
(``benchmarks/results/prefill_fold_head_3b_h100.md``, section 3), and emptied the allocator's
cache, which the next run's first chunks then allocated again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tttlm.ttt.base import InnerState, map_state
from tttlm.ttt.fast import FastWeights, PrimeWeights, flatten_fast

if TYPE_CHECKING:
    from tttlm.model.model import ForwardOptions, KVPair, TTTForCausalLM

Out = TypeVar("Out")
Capture = Callable[[Callable[[], Any], Callable[[], object], torch.device], Callable[[], Any]]


def can_capture(device: torch.device) -> bool:
    """Whether computations on ``device`` can be captured as CUDA graphs."""
    return device.type == "cuda"


def capture(run: Callable[[], Out], warm: Callable[[], object],
            device: torch.device) -> Callable[[], Out]:
    """Capture ``run`` as a CUDA graph once ``warm`` ran on a side stream (as capture
    requires: lazy initialisation must not happen inside it). The returned call replays the
    graph and returns ``run``'s outputs: static tensors that the next replay overwrites."""
    # Under autocast, its cache of cast weights must stay off: a graph would keep reading
    # the cached copies after the autocast region that made them has freed them.
    cast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                          enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), cast:
        warm()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # (torch.cuda.graph empties the allocator's cache before capturing. Capturing without
    # that, through capture_begin/end, ran a 3b prefill at 32K x 4 out of memory on an H100:
    # the cache kept what the graph's own pool then had to allocate again.)
    with torch.cuda.graph(graph), cast:
        out = run()

    def replay() -> Out:
        graph.replay()
        return out

    return replay


def run_eagerly(run: Callable[[], Out], warm: Callable[[], object],
                device: torch.device) -> Callable[[], Out]:
    """A stand-in for :func:`capture` that runs ``run`` at every call instead of replaying a
    graph: the same buffers and writes, on any device (tests of :class:`ChunkGraph` on a
    CPU)."""
    warm()
    return run


class _Collect:
    """In place of the deferred finiteness guard inside a graph: lets every update through
    and keeps its norms; :class:`ChunkGraph` selects per sequence as it writes the update
    into its buffers (one pass, where a separate selection would take another)."""

    pending = False

    def __init__(self) -> None:
        self.norm: torch.Tensor | None = None

    def watch(self, norm: torch.Tensor, old_fast: FastWeights, old_state: InnerState,
              new_fast: FastWeights, new_state: InnerState
              ) -> tuple[FastWeights, InnerState]:
        self.norm = norm
        return new_fast, new_state


class ChunkGraph:
    """The step of a TTT chunk over full caches without an outer gradient, captured once and
    replayed for every later such chunk of one run of :meth:`TTTForCausalLM.run_ttt_chunks`.

    The graph reads the chunk (hidden states, labels, mask) from static buffers and updates
    its own buffers of the caches, fast weights and inner-optimizer state in place: the new
    caches are copied over the old, and the new fast weights and state are written where the
    update is finite (the check the eager path defers) and the old ones kept elsewhere, as
    :class:`~tttlm.ttt.finite.FiniteGuard` does. With an inner optimizer that
    ``updates_in_place`` (the official SGD), the update itself writes them, together with
    the fast weights' copies in the compute dtype that the next chunk differentiates: one
    pass per tensor (3b on an H100 at 128K: 2.1 ms less per chunk than the select and the
    cast, ``benchmarks/results/prefill_inplace_3b_h100.md``). Otherwise a ``torch.where``
    per sequence writes the new ones over. The chunk's
    absolute start enters only the attention mask through differences of positions, which
    are the same for every chunk over a full cache: the value captured serves them all.
    ``capture_fn``: :func:`capture` (CUDA), or :func:`run_eagerly` to run the same buffers
    without a graph.
    """

    def __init__(self, model: TTTForCausalLM, h: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor],
                 caches: list[KVPair], fast: FastWeights, inner_state: InnerState,
                 opts: ForwardOptions, keep_logits: bool,
                 capture_fn: Capture = capture) -> None:
        self.h, self.labels, self.mask = h.clone(), labels.clone(), mask.clone()
        # (the run's RoPE tables are its own; the graph keeps the rows it reads for later runs)
        self.rope = (rope[0].clone(), rope[1].clone())
        self.caches = [(k.clone(), v.clone()) for k, v in caches]
        self.fast = [PrimeWeights(*(w.detach().clone() for w in layer)) for layer in fast]
        self.inner_state = map_state(lambda t: t.detach().clone(), inner_state)
        self.in_place = model.inner_optimizer.updates_in_place
        # The leaves the inner gradient is taken for, kept equal to the fast weights by the
        # update (None: the fast weights themselves, or no narrower compute dtype).
        self.low = model._inner_leaves(self.fast, h) if self.in_place else None

        def run() -> tuple[Any, ...]:
            nll, chunk_loss, logits, new_caches, new_fast, new_state, norm, hidden = (
                model.ttt_chunk(self.h, self.labels, self.mask, start, self.rope, self.caches,
                                self.fast, self.inner_state, opts, True, keep_logits,
                                _Collect(), self.in_place, self.low))  # type: ignore[arg-type]
            with torch.no_grad():
                for (k, v), (new_k, new_v) in zip(self.caches, new_caches, strict=True):
                    k.copy_(new_k)
                    v.copy_(new_v)
                if not self.in_place:
                    ok = torch.isfinite(norm)
                    for old, new in zip(self._updated(self.fast, self.inner_state),
                                        self._updated(new_fast, new_state), strict=True):
                        torch.where(ok.view(-1, *([1] * (old.dim() - 1))), new, old, out=old)
            return nll, chunk_loss, logits, norm, hidden

        # The warm-up is this first chunk's step itself, writes included (capture records
        # without running): its results are the first call's, so no chunk is computed twice.
        self._first: tuple[Any, ...] | None = None

        def warm() -> None:
            self._first = run()

        self._replay = capture_fn(run, warm, h.device)

    def own_copies(self, caches: list[KVPair], fast: FastWeights, inner_state: InnerState
                   ) -> tuple[list[KVPair], FastWeights, InnerState]:
        """``caches``, ``fast`` and ``inner_state`` with every tensor that is one of this
        graph's buffers replaced by a copy: what a run returns when the graph is kept for
        later runs, whose replays overwrite the buffers."""
        mine = {id(t) for t in (*(x for pair in self.caches for x in pair),
                                *self._updated(self.fast, self.inner_state))}

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if id(t) in mine else t

        return ([(own(k), own(v)) for k, v in caches],
                [PrimeWeights(*(own(w) for w in layer)) for layer in fast],
                map_state(own, inner_state))

    @staticmethod
    def _updated(fast: FastWeights, state: InnerState) -> list[torch.Tensor]:
        return [*flatten_fast(fast), *(t for key in sorted(state) for t in state[key])]

    def owns(self, caches: list[KVPair], fast: FastWeights) -> bool:
        """Whether ``caches`` and ``fast`` are this graph's buffers (the previous replay's
        results), so that nothing needs loading."""
        return (all(a is b for pair, mine in zip(caches, self.caches) for a, b in zip(pair, mine))
                and all(a is b for layer, mine in zip(fast, self.fast)
                        for a, b in zip(layer, mine)))

    def step(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             caches: list[KVPair], fast: FastWeights, inner_state: InnerState
             ) -> tuple[Any, ...]:
        """One chunk: ``ttt_chunk``'s results (update on), the caches, fast weights and state
        being this graph's buffers, which the next call overwrites. The per-chunk outputs are
        copies. The first call is the chunk the graph was made with, computed already."""
        if self._first is not None:
            nll, chunk_loss, logits, norm, hidden = self._first
            self._first = None
            return (nll.clone(), chunk_loss.clone(),
                    None if logits is None else logits.clone(), self.caches, self.fast,
                    self.inner_state, norm.clone(), hidden.clone())
        self.h.copy_(h)
        self.labels.copy_(labels)
        self.mask.copy_(mask)
        if not self.owns(caches, fast):
            for pair, mine in zip(caches, self.caches, strict=True):
                for a, b in zip(pair, mine):
                    b.copy_(a)
            for layer, mine in zip(fast, self.fast, strict=True):
                for a, b in zip(layer, mine):
                    b.copy_(a)
            if self.low is not None:
                with torch.no_grad():  # (leaves that require grad)
                    for layer, mine in zip(fast, self.low, strict=True):
                        for a, b in zip(layer, mine):
                            b.copy_(a)  # cast to the compute dtype, as _inner_leaves does
            for old, new in zip(self._updated([], self.inner_state),
                                self._updated([], inner_state), strict=True):
                old.copy_(new)
        nll, chunk_loss, logits, norm, hidden = self._replay()
        return (nll.clone(), chunk_loss.clone(), None if logits is None else logits.clone(),
                self.caches, self.fast, self.inner_state, norm.clone(), hidden.clone())


class KeptGraph:
    """A model's :class:`ChunkGraph` kept for its later runs, with the key of what the graph
    read when captured (shapes, dtypes, options, the addresses of the parameters and
    buffers), and the constant weights' casts (:func:`~tttlm.model.model.linear_weights_in`
    into the same tensors every run, refreshed from the parameters, so that the graph's
    reads of them stay valid). A run whose key differs makes a new graph. Copies of a model
    (``copy.deepcopy``, pickling) start with none."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.graph: ChunkGraph | None = None
        self.casts: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}

    def find(self, key: tuple[Any, ...], drop: bool = True) -> ChunkGraph | None:
        """The kept graph if it was made under ``key``, else none; with ``drop`` the old one
        is dropped then, so that its memory is free before the next capture."""
        if self.graph is not None and self.key == key:
            return self.graph
        if drop:
            self.key = self.graph = None
        return None

    def keep(self, key: tuple[Any, ...], graph: ChunkGraph) -> None:
        self.key, self.graph = key, graph

    def release(self) -> None:
        """Drop the graph and the casts (their memory returns to the allocator's cache)."""
        self.key = self.graph = None
        self.casts.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> KeptGraph:
        return KeptGraph()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
