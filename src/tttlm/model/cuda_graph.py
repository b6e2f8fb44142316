"""CUDA graphs of what repeats with one shape: the capture helper the engine uses, and the
TTT chunks of a prefill (:class:`ChunkGraph`: the steady state, and the chunks while the
caches fill, over shared :class:`ChunkBuffers`; :class:`KeptGraph`, what a model keeps).

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

The chunks while the caches fill (8 at 3b) have a shape each, and launched they can be
host-bound at one sequence: 28-36 ms of host time for ~26 ms of GPU work each at 128K x 1
on one H100 (``benchmarks/host_gap.py``, ``prefill_fill_3b_h100.md`` section 1; on another,
they kept up: section 2). A run that repeats the last one's shapes makes a graph for each,
kept beside the steady one over the same :class:`ChunkBuffers`: a server's later prompts
replay every whole chunk but the last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tttlm.ops.cache_swap import CacheSwap
from tttlm.ops.triton_runtime import triton_available
from tttlm.ttt.base import InnerState, map_state
from tttlm.ttt.fast import FastWeights, PrimeWeights, flatten_fast

if TYPE_CHECKING:
    from tttlm.model.model import ForwardOptions, KVPair, TTTForCausalLM

Out = TypeVar("Out")
Capture = Callable[[Callable[[], Any], Callable[[], object], torch.device, Any],
                   Callable[[], Any]]


def can_capture(device: torch.device) -> bool:
    """Whether computations on ``device`` can be captured as CUDA graphs."""
    return device.type == "cuda"


def capture(run: Callable[[], Out], warm: Callable[[], object],
            device: torch.device, pool: Any = None) -> Callable[[], Out]:
    """Capture ``run`` as a CUDA graph once ``warm`` ran on a side stream (as capture
    requires: lazy initialisation must not happen inside it). The returned call replays the
    graph and returns ``run``'s outputs: static tensors that the next replay overwrites.
    ``pool``: a memory pool shared with other graphs (``torch.cuda.graph_pool_handle()``),
    for graphs that replay one at a time and whose outputs are read before the next replay."""
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
    with torch.cuda.graph(graph, pool=pool), cast:
        out = run()

    def replay() -> Out:
        graph.replay()
        return out

    return replay


def swap_caches(model: TTTForCausalLM, h: torch.Tensor) -> bool:
    """Whether a model's chunk graphs keep the caches in two buffer sets
    (:class:`ChunkBuffers`): where the operands write the next caches into the other set in
    the pass that reads the cache (Triton's, on CUDA with interleaved RoPE), and on a CPU,
    where tests run the graphs' buffers eagerly (the torch path, which reads both sets).
    Elsewhere the one set and a copy per chunk cost less than that path.
    ``TTTLM_CACHE_SWAP=0``: one set everywhere (benchmarks' baseline)."""
    if os.environ.get("TTTLM_CACHE_SWAP", "") == "0":
        return False
    if h.device.type == "cpu":
        return True
    return h.is_cuda and triton_available() and model.config.rope_layout == "interleaved"


def run_eagerly(run: Callable[[], Out], warm: Callable[[], object],
                device: torch.device, pool: Any = None) -> Callable[[], Out]:
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


class ChunkBuffers:
    """What the chunk graphs of one run shape read and write in place, shared by all of them:
    one set of fast weights (with their copies in the compute dtype, ``low``, where updates
    are written in place), the inner optimizer's state, and the caches by length. A graph of
    a chunk while the caches fill reads the caches of its length and writes those of the
    next, which the next stage's graph reads: no chunk copies another's results. The caches
    of every length are views of the full window's, so the stages hold one window of
    caches. ``pool``: the graphs' one memory pool on a GPU (they replay one at a time, and
    each one's outputs are copied before the next).

    ``swapped`` (:func:`swap_caches`): the caches in two such sets, the one that holds them
    named by ``parity`` on the device (``host_parity`` mirrors it): a graph reads one set and
    the operands write the next caches into the other
    (:class:`~tttlm.ops.cache_swap.CacheSwap`), then the graph flips the parity. Otherwise
    one set, into which each graph copies the next caches (in the steady state over the
    ones it read)."""

    def __init__(self, model: TTTForCausalLM, h: torch.Tensor, fast: FastWeights,
                 inner_state: InnerState, in_place: bool) -> None:
        self.window = model.config.window
        self.fast = [PrimeWeights(*(w.detach().clone() for w in layer)) for layer in fast]
        self.inner_state = map_state(lambda t: t.detach().clone(), inner_state)
        # The leaves the inner gradient is taken for, kept equal to the fast weights by the
        # update (None: the fast weights themselves, or no narrower compute dtype).
        self.low = model._inner_leaves(self.fast, h) if in_place else None
        self.pool = torch.cuda.graph_pool_handle() if can_capture(h.device) else None
        self._caches: dict[tuple[int, int], list[KVPair]] = {}  # (set, length) -> views
        self.swapped = swap_caches(model, h)
        self.parity = torch.zeros(1, dtype=torch.int32, device=h.device)
        self.host_parity = 0

    def caches(self, like: list[KVPair], length: int, which: int = 0) -> list[KVPair]:
        """The buffers of the caches of ``length`` rows in set ``which``, shaped as ``like``
        otherwise (the same tensors at every call): the first rows of the full window's.
        (For several sequences they are not contiguous across the batch; every reader of a
        frozen cache takes a row stride and a batch stride, as the Triton pass of
        :mod:`tttlm.ops.triton_rope` does.)"""
        full = self._caches.get((which, self.window))
        if full is None:
            full = self._caches[which, self.window] = [
                tuple(t.new_empty(t.shape[0], self.window, *t.shape[2:])  # type: ignore[misc]
                      for t in pair) for pair in like]
        found = self._caches.get((which, length))
        if found is None:
            found = self._caches[which, length] = [(k[:, :length], v[:, :length])
                                                   for k, v in full]
        return found

    def current(self, like: list[KVPair], length: int) -> list[KVPair]:
        """The buffers that hold the caches now (of ``length`` rows)."""
        return self.caches(like, length, self.host_parity if self.swapped else 0)

    def swaps(self, like: list[KVPair], past: int, following: int) -> list[CacheSwap]:
        """Per TTT block, both sets' views of the caches of ``past`` rows and of the next
        ones (``following`` rows), with the parity (``swapped`` buffers)."""
        sets = [(self.caches(like, past, i), self.caches(like, following, i)) for i in (0, 1)]
        return [CacheSwap(keys=(sets[0][0][j][0], sets[1][0][j][0]),
                          values=(sets[0][0][j][1], sets[1][0][j][1]),
                          next_keys=(sets[0][1][j][0], sets[1][1][j][0]),
                          next_values=(sets[0][1][j][1], sets[1][1][j][1]),
                          parity=self.parity) for j in range(len(like))]

    def flip(self) -> None:
        """Record that a chunk ran: the other set holds the caches now (the graph flipped
        the device's parity)."""
        self.host_parity ^= 1

    def load(self, into: list[KVPair], caches: list[KVPair], fast: FastWeights,
             inner_state: InnerState) -> None:
        """Copy a run's caches (into ``into``, buffers of their length), fast weights and
        state into these buffers, but for what already is one of them (the previous
        replay's results)."""
        for pair, mine in zip(caches, into, strict=True):
            for a, b in zip(pair, mine):
                if a is not b:
                    b.copy_(a)
        if not all(a is b for layer, mine in zip(fast, self.fast, strict=True)
                   for a, b in zip(layer, mine)):
            for layer, mine in zip(fast, self.fast, strict=True):
                for a, b in zip(layer, mine):
                    b.copy_(a)
            if self.low is not None:
                with torch.no_grad():  # (leaves that require grad)
                    for layer, mine in zip(fast, self.low, strict=True):
                        for a, b in zip(layer, mine):
                            b.copy_(a)  # cast to the compute dtype, as _inner_leaves does
        for old, new in zip(self.updated([], self.inner_state), self.updated([], inner_state),
                            strict=True):
            if old is not new:
                old.copy_(new)

    def own_copies(self, caches: list[KVPair], fast: FastWeights, inner_state: InnerState
                   ) -> tuple[list[KVPair], FastWeights, InnerState]:
        """``caches``, ``fast`` and ``inner_state`` with every tensor that is one of these
        buffers replaced by a copy: what a run returns when its graphs are kept for later
        runs, whose replays overwrite the buffers."""
        mine = {id(t) for t in self.tensors()}

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if id(t) in mine else t

        return ([(own(k), own(v)) for k, v in caches],
                [PrimeWeights(*(own(w) for w in layer)) for layer in fast],
                map_state(own, inner_state))

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer: caches of each set and length, fast weights, state."""
        return [*(x for pairs in self._caches.values() for pair in pairs for x in pair),
                *self.updated(self.fast, self.inner_state)]

    @staticmethod
    def updated(fast: FastWeights, state: InnerState) -> list[torch.Tensor]:
        """What an update writes: the fast weights' and the state's tensors, in one order."""
        return [*flatten_fast(fast), *(t for key in sorted(state) for t in state[key])]


class ChunkGraph:
    """The step of a whole TTT chunk without an outer gradient, captured once and replayed for
    every later chunk of the same shapes: once the TTT caches are full (the steady state),
    every chunk of a run of :meth:`TTTForCausalLM.run_ttt_chunks`; while they fill, a graph
    per length of the caches (kept by the model for its later runs, :class:`KeptGraph`).

    The graph reads the chunk (hidden states, labels, mask) from static buffers and updates
    the caches, fast weights and inner-optimizer state of its :class:`ChunkBuffers` in
    place: the operands write the new caches into the buffer set the chunk did not read
    (``swapped`` buffers; the graph then flips their parity), or they are copied into the
    buffers of their length (over the old ones in the steady state), and the new fast
    weights and state are written where the update is finite (the check the eager path
    defers) and the old ones kept elsewhere, as
    :class:`~tttlm.ttt.finite.FiniteGuard` does. With an inner optimizer that
    ``updates_in_place`` (the official SGD), the update itself writes them, together with
    the fast weights' copies in the compute dtype that the next chunk differentiates: one
    pass per tensor (3b on an H100 at 128K: 2.1 ms less per chunk than the select and the
    cast, ``benchmarks/results/prefill_inplace_3b_h100.md``). Otherwise a ``torch.where``
    per sequence writes the new ones over. The chunk's
    absolute start enters only the attention mask through differences of positions, which
    depend only on the caches' length: the value captured serves every chunk of that length.
    ``capture_fn``: :func:`capture` (CUDA), or :func:`run_eagerly` to run the same buffers
    without a graph. ``buffers``: those of the model's other graphs of this run shape (none:
    the graph's own).
    """

    def __init__(self, model: TTTForCausalLM, h: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor],
                 caches: list[KVPair], fast: FastWeights, inner_state: InnerState,
                 opts: ForwardOptions, keep_logits: bool,
                 capture_fn: Capture = capture, buffers: ChunkBuffers | None = None) -> None:
        self.h, self.labels, self.mask = h.clone(), labels.clone(), mask.clone()
        # (the run's RoPE tables are its own; the graph keeps the rows it reads for later runs)
        self.rope = (rope[0].clone(), rope[1].clone())
        self.in_place = model.inner_optimizer.updates_in_place
        if buffers is None:  # (made from this run's weights: only the caches to load)
            buffers = ChunkBuffers(model, h, fast, inner_state, self.in_place)
            fast, inner_state = buffers.fast, buffers.inner_state
        self.buffers = buffers
        self.past = caches[0][0].shape[1]
        # the next caches' length: the next stage's buffers, the same ones once full
        self.following = min(self.past + h.shape[1], buffers.window)
        # what the chunk reads: both sets with the parity, or the one set (and where the
        # new caches are copied)
        reads: list[Any] = (buffers.swaps(caches, self.past, self.following) if buffers.swapped
                            else buffers.caches(caches, self.past))
        out = None if buffers.swapped else buffers.caches(caches, self.following)
        self.fast, self.inner_state, self.low = buffers.fast, buffers.inner_state, buffers.low
        buffers.load(buffers.current(caches, self.past), caches, fast, inner_state)

        def run() -> tuple[Any, ...]:
            nll, chunk_loss, logits, new_caches, new_fast, new_state, norm, hidden = (
                model.ttt_chunk(self.h, self.labels, self.mask, start, self.rope, reads,
                                self.fast, self.inner_state, opts, True, keep_logits,
                                _Collect(), self.in_place, self.low))  # type: ignore[arg-type]
            with torch.no_grad():
                if out is None:  # (the operands wrote the other set)
                    buffers.parity.bitwise_xor_(1)
                else:
                    for (k, v), (new_k, new_v) in zip(out, new_caches, strict=True):
                        k.copy_(new_k)
                        v.copy_(new_v)
                if not self.in_place:
                    ok = torch.isfinite(norm)
                    for old, new in zip(buffers.updated(self.fast, self.inner_state),
                                        buffers.updated(new_fast, new_state), strict=True):
                        torch.where(ok.view(-1, *([1] * (old.dim() - 1))), new, old, out=old)
            return nll, chunk_loss, logits, norm, hidden

        # The warm-up is this first chunk's step itself, writes included (capture records
        # without running): its results are the first call's, so no chunk is computed twice.
        self._first: tuple[Any, ...] | None = None

        def warm() -> None:
            self._first = run()

        self._replay = capture_fn(run, warm, h.device, buffers.pool)
        if buffers.swapped:  # (the warm-up ran the chunk: its parity flip included)
            buffers.flip()

    def step(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             caches: list[KVPair], fast: FastWeights, inner_state: InnerState
             ) -> tuple[Any, ...]:
        """One chunk: ``ttt_chunk``'s results (update on), the caches, fast weights and state
        being the buffers, which later replays overwrite. The per-chunk outputs are copies.
        The first call is the chunk the graph was made with, computed already."""
        if self._first is not None:
            nll, chunk_loss, logits, norm, hidden = self._first
            self._first = None
        else:
            self.h.copy_(h)
            self.labels.copy_(labels)
            self.mask.copy_(mask)
            self.buffers.load(self.buffers.current(caches, self.past), caches, fast,
                              inner_state)
            nll, chunk_loss, logits, norm, hidden = self._replay()
            if self.buffers.swapped:
                self.buffers.flip()
        return (nll.clone(), chunk_loss.clone(), None if logits is None else logits.clone(),
                self.buffers.current(caches, self.following), self.fast, self.inner_state,
                norm.clone(), hidden.clone())


class KeptGraph:
    """A model's chunk graphs kept for its later runs: their :class:`ChunkBuffers`, the
    graphs by the caches' length at their chunk's start, the key of what they read when
    captured (options, dtypes, shapes but the run's length, the addresses of the parameters
    and buffers), and the constant weights' casts (:func:`~tttlm.model.model.linear_weights_in`
    into the same tensors every run, refreshed from the parameters, so that the graphs'
    reads of them stay valid). A run whose key differs makes new graphs. ``last``: the key
    of the last run that could take graphs: the graphs of chunks while the caches fill are
    made only by a run that repeats it (a one-off prompt does not pay their captures).
    Copies of a model (``copy.deepcopy``, pickling) start with none."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.graphs: dict[int, ChunkGraph] = {}
        self.buffers: ChunkBuffers | None = None
        self.last: tuple[Any, ...] | None = None
        self.casts: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}

    def find(self, key: tuple[Any, ...], past: int) -> ChunkGraph | None:
        """The graph of a chunk after ``past`` cached rows if kept under ``key``."""
        return self.graphs.get(past) if self.key == key else None

    def buffers_for(self, key: tuple[Any, ...]) -> ChunkBuffers | None:
        """The buffers a new graph of ``key`` joins; the graphs of another key are dropped
        (their memory free before the capture)."""
        if self.key != key:
            self.drop()
        return self.buffers

    def keep(self, key: tuple[Any, ...], past: int, graph: ChunkGraph) -> None:
        self.key, self.buffers = key, graph.buffers
        self.graphs[past] = graph

    def drop(self) -> None:
        """Drop the graphs and their buffers (not the casts)."""
        self.key, self.graphs, self.buffers = None, {}, None

    def release(self) -> None:
        """Drop the graphs, their buffers and the casts (their memory returns to the
        allocator's cache), and forget the last run."""
        self.drop()
        self.last = None
        self.casts.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> KeptGraph:
        return KeptGraph()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
