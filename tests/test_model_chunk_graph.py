"""The steady-state TTT chunk of a prefill as a CUDA graph (``TTTForCausalLM.graph_chunks``,
:class:`tttlm.model.cuda_graph.ChunkGraph`): the same results bit for bit as launching every
chunk's kernels, non-finite updates dropped per sequence as the eager guard drops them.

Off a GPU the graph's buffers run eagerly (``run_eagerly``), which checks everything but the
capture itself; the CUDA test captures for real."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm.model import cuda_graph
from tttlm.model.cuda_graph import ChunkGraph

SENTINEL = 7  # a label that marks the chunk whose update is made non-finite


def _spy_graphs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"graphs": 0, "steps": 0}
    init, step = ChunkGraph.__init__, ChunkGraph.step

    def counted_init(self: ChunkGraph, *a: Any, **k: Any) -> None:
        counts["graphs"] += 1
        init(self, *a, **k)

    def counted_step(self: ChunkGraph, *a: Any, **k: Any) -> Any:
        counts["steps"] += 1
        return step(self, *a, **k)

    monkeypatch.setattr(ChunkGraph, "__init__", counted_init)
    monkeypatch.setattr(ChunkGraph, "step", counted_step)
    return counts


def _swap(monkeypatch: pytest.MonkeyPatch, swapped: bool) -> dict[str, int]:
    """The graphs' caches in two buffer sets (``swapped``: the next caches written into the
    other set, a parity flipped per chunk) or in one (copied in per chunk); counts flips."""
    flips = {"flips": 0}
    flip = cuda_graph.ChunkBuffers.flip

    def counted(self: cuda_graph.ChunkBuffers) -> None:
        flips["flips"] += 1
        flip(self)

    monkeypatch.setattr(cuda_graph, "swap_caches", lambda model, h: swapped)
    monkeypatch.setattr(cuda_graph.ChunkBuffers, "flip", counted)
    return flips


def _forward(model: Any, x: torch.Tensor, y: torch.Tensor, graphed: bool) -> Any:
    model.graph_chunks = graphed
    with torch.no_grad():
        return model(x, y, return_logits=True)


def test_cache_swap_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two buffer sets on a CPU (the graphs' buffers run eagerly there); one with
    ``TTTLM_CACHE_SWAP=0``."""
    model = tiny_model(dtype=torch.float32)
    h = torch.zeros(1, 4, model.config.hidden_size)
    assert cuda_graph.swap_caches(model, h)
    monkeypatch.setenv("TTTLM_CACHE_SWAP", "0")
    assert not cuda_graph.swap_caches(model, h)


@pytest.mark.parametrize("swapped", [True, False])
@pytest.mark.parametrize(("group", "optimizer"), [(None, "sgd"), (1, "sgd"),
                                                  (None, "momentum"), (None, "learned_lr")])
def test_graphed_chunks_equal_launched_chunks_bit_for_bit(
        group: int | None, optimizer: str, swapped: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 12, chunks of 4, 40 tokens: chunks 3-8 have full caches and an update (the
    last chunk, 9, runs as it always does); one graph for them in every run of chunks (the
    second group replays the first's, kept by the model). The second group repeats the
    first's shapes, so its chunks 0-2, while the caches fill, are graphs too, one per length
    of the caches. Inner optimizers with a state (momentum) or parameters (learned_lr)
    alike; the caches in two buffer sets (a flip per chunk) or one."""
    flips = _swap(monkeypatch, swapped)
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32, inner_optimizer=optimizer)
    model.ttt_group = group
    x, y = tokens(model, 2, 40)
    ref = _forward(model, x, y, graphed=False)
    assert counts == {"graphs": 0, "steps": 0}
    got = _forward(model, x, y, graphed=True)
    expected = ({"graphs": 1, "steps": 6} if group is None
                else {"graphs": 1 + 3, "steps": 6 + 3 + 6})
    assert counts == expected
    assert flips["flips"] == (expected["steps"] if swapped else 0)
    for name in ("loss", "token_nll", "chunk_losses", "logits", "inner_update_norms"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_graph_chunks_none_takes_graphs_where_they_win(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``graph_chunks = None`` (the default): no graph off a GPU; where one can be captured,
    a graph for one sequence with at least ``GRAPH_AUTO_MIN_CHUNKS`` chunks to replay, whose
    first chunk is its warm-up (no chunk computed twice); none for two sequences at a time;
    a kept graph for any number of chunks."""
    from tttlm.model import model as model_module

    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32)
    assert model.graph_chunks is None
    model.ttt_group = None
    calls = {"chunks": 0}
    chunk = model.ttt_chunk

    def counted_chunk(*a: Any, **k: Any) -> Any:
        calls["chunks"] += 1
        return chunk(*a, **k)

    monkeypatch.setattr(model, "ttt_chunk", counted_chunk)

    def run(batch: int, graphed: bool | None) -> tuple[Any, int]:
        x, y = tokens(model, batch, 40, seed=batch)
        calls["chunks"] = 0
        out = _forward(model, x, y, graphed)  # type: ignore[arg-type]
        return out, calls["chunks"]

    ref, launched = run(1, False)
    assert launched == 10
    with torch.no_grad():
        model.graph_chunks = None
        assert model.options().graph_chunks is None
    assert run(1, None)[1] == launched and counts["graphs"] == 0  # a CPU: no graph
    monkeypatch.setattr(model_module, "can_capture", lambda device: True)
    monkeypatch.setattr(model_module, "capture", cuda_graph.run_eagerly)
    run(1, None)
    assert counts["graphs"] == 0  # 6 chunks to replay: fewer than GRAPH_AUTO_MIN_CHUNKS
    monkeypatch.setattr(model_module, "GRAPH_AUTO_MIN_CHUNKS", 6)
    run(2, None)
    assert counts["graphs"] == 0  # two sequences at a time
    # the steady graph; and since this run repeats the last one-sequence run's shapes, a
    # graph for each of chunks 0-2 while the caches fill
    got, computed = run(1, None)
    assert counts == {"graphs": 1 + 3, "steps": 3 + 6} and computed == launched
    for name in ("loss", "token_nll", "chunk_losses", "logits", "inner_update_norms"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    # too few chunks to pay for a capture, but the graphs kept from the last run serve them
    monkeypatch.setattr(model_module, "GRAPH_AUTO_MIN_CHUNKS", 32)
    got, computed = run(1, None)
    assert counts == {"graphs": 4, "steps": 18} and computed == launched
    for name in ("loss", "token_nll", "chunk_losses", "logits", "inner_update_norms"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    model.release_chunk_graph()
    run(1, None)
    assert counts == {"graphs": 4, "steps": 18}  # none kept: launched again


@pytest.mark.parametrize("autocast", [False, True])
def test_updates_in_place_equal_new_weights_bit_for_bit(
        autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The official SGD writes its updates into the run's own weights (a copy of W0, views
    of the parameters, made before the first update) and, under bf16 autocast, into the
    bf16 leaves the next chunk differentiates, in one pass (``step_``), launched or in a
    graph's buffers: the same bits as new weights each chunk (``updates_in_place`` off),
    which cast the weights afresh at every chunk. Window 12, chunks of 4, 40 tokens: 9
    updates, all in place; chunks 3-8 graphed. The parameters stay as they were."""
    model = tiny_model(dtype=torch.float32)
    params = [p.clone() for p in model.parameters()]
    calls: list[bool] = []
    step_ = model.inner_optimizer.step_

    def spy(*a: Any, **k: Any) -> Any:
        wrt = k["wrt"]
        calls.append(wrt is not None and all(w.dtype == torch.bfloat16 for l in wrt for w in l))
        return step_(*a, **k)

    monkeypatch.setattr(model.inner_optimizer, "step_", spy)
    x, y = tokens(model, 2, 40)
    outs = []
    for in_place, graphed in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(model.inner_optimizer, "updates_in_place", in_place)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append(_forward(model, x, y, graphed=graphed))
        assert len(calls) == (9 if in_place else 0)
        assert calls == [autocast] * len(calls)  # bf16 leaves exactly under autocast
    for got in outs[1:]:
        for name in ("token_nll", "logits", "inner_update_norms"):
            assert torch.equal(getattr(got, name), getattr(outs[0], name)), name
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params, strict=True))


def test_an_in_place_run_leaves_the_callers_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run given fast weights (an engine session's) writes its updates into its own copies
    of them, from the first update on: the caller's tensors keep their values, and the run
    gives what new weights each chunk give (``updates_in_place`` off), bit for bit."""
    model = tiny_model(dtype=torch.float32)
    assert model.inner_optimizer.updates_in_place
    x, y = tokens(model, 2, 36)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h = model.run_blocks(model.embed(x), model.prefix_layers)
        mask = torch.ones_like(y, dtype=torch.bool)
        fast = [type(layer)(*(w + 0.01 * torch.randn(w.shape, generator=gen) for w in layer))
                for layer in model.initial_fast_weights(2)]
        state = model.inner_optimizer.init_state(fast)
        for tensors in state.values():
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=gen))
        kept_fast = [[w.clone() for w in layer] for layer in fast]
        kept_state = {k: [t.clone() for t in v] for k, v in state.items()}
        runs = []
        for in_place in (True, False):
            monkeypatch.setattr(model.inner_optimizer, "updates_in_place", in_place)
            runs.append(model.run_ttt_chunks(h, y, mask, model.options(), fast=fast,
                                             inner_state=state, learn_last=True))
            for a, b in zip(fast, kept_fast, strict=True):
                assert all(torch.equal(u, v) for u, v in zip(a, b))
            for key, tensors in state.items():
                assert all(torch.equal(u, v) for u, v in zip(tensors, kept_state[key]))
    got, ref = runs
    assert any(not torch.equal(u, v) for a, b in zip(got.fast, fast) for u, v in zip(a, b))
    for a, b in zip(got.fast, ref.fast, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for a, b in zip(got.nll + got.norms, ref.nll + ref.norms, strict=True):
        assert torch.equal(a, b)


def test_graphed_run_returns_the_same_state() -> None:
    """What the engine keeps after a prefill: caches (after the last chunk and at its start),
    fast weights, the last chunk's output; with ``learn_last`` too."""
    model = tiny_model(dtype=torch.float32)
    x, y = tokens(model, 2, 36)
    with torch.no_grad():
        h = model.run_blocks(model.embed(x), model.prefix_layers)
        mask = torch.ones_like(y, dtype=torch.bool)
        runs = []
        for graphed in (False, True):
            model.graph_chunks = graphed
            opts = model.options()
            assert opts.graph_chunks is graphed
            runs.append(model.run_ttt_chunks(h, y, mask, opts, learn_last=True))
    ref, got = runs
    for a, b in zip(got.caches + got.start_caches, ref.caches + ref.start_caches, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(got.fast, ref.fast, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(got.hidden, ref.hidden)
    for a, b in zip(got.nll + got.norms, ref.nll + ref.norms, strict=True):
        assert torch.equal(a, b)


def test_a_kept_graph_serves_later_runs_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model keeps its chunk graphs for later runs of the same shapes, whatever their
    length: each gives the launched chunks' results bit for bit. The first run makes the
    steady graph (chunks over full caches: 6 of 40 tokens, 7 of 44); the second, repeating
    its shapes, a graph per length of the filling caches (chunks 0-2), which later runs
    replay too. A parameter changed in place is read anew; a parameter replaced, another
    option, or ``release_chunk_graph`` make new graphs."""
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32)
    inputs = [tokens(model, 2, 40, seed=1), tokens(model, 2, 44, seed=2),
              tokens(model, 2, 40, seed=3)]

    def same(graphs: int, steps: int) -> None:
        before = dict(counts)
        for x, y in inputs:
            ref = _forward(model, x, y, graphed=False)
            got = _forward(model, x, y, graphed=True)
            for name in ("token_nll", "logits", "inner_update_norms"):
                assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert counts == {"graphs": before["graphs"] + graphs,
                          "steps": before["steps"] + steps}

    made = {"graphs": 1 + 3, "steps": 6 + (3 + 7) + (3 + 6)}
    same(**made)
    with torch.no_grad():  # in place: the same tensors, new values
        model.ttt_layers[0].attn.wq.weight.mul_(1.5)
    same(graphs=0, steps=(3 + 6) + (3 + 7) + (3 + 6))
    model.ttt_layers[1].mlp.w2.weight = torch.nn.Parameter(
        model.ttt_layers[1].mlp.w2.weight.detach() * 0.5)
    same(**made)
    model.config.inner_clip = 0.5
    same(**made)
    model.release_chunk_graph()
    same(**made)
    model.keep_chunk_graph = False  # a steady graph per run, none while the caches fill
    same(graphs=3, steps=19)


def test_a_run_keeps_its_state_when_a_later_run_replays_the_graph() -> None:
    """A run's caches, fast weights and inner state (what a session keeps) are its own, not
    the kept graph's buffers, which the next run's replays overwrite."""
    model = tiny_model(dtype=torch.float32, inner_optimizer="momentum")
    model.graph_chunks = True
    with torch.no_grad():
        runs, copies = [], []
        for seed in (1, 2):
            x, y = tokens(model, 1, 40, seed=seed)
            h = model.run_blocks(model.embed(x), model.prefix_layers)
            run = model.run_ttt_chunks(h, y, torch.ones_like(y, dtype=torch.bool),
                                       model.options())
            runs.append(run)
            copies.append([t.clone() for t in _state_tensors(run)])
    kept = model._kept_graph.buffers
    assert kept is not None and len(model._kept_graph.graphs) == 1 + 3  # steady, filling
    first = _state_tensors(runs[0])
    buffers = {id(t) for t in kept.tensors()}
    assert not buffers & {id(t) for run in runs for t in _state_tensors(run)}
    assert all(torch.equal(a, b) for a, b in zip(first, copies[0], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, copies[1], strict=True))


def _state_tensors(run: Any) -> list[torch.Tensor]:
    return [*(t for pair in run.caches + run.start_caches for t in pair),
            *(w for layer in run.fast for w in layer),
            *(t for name in sorted(run.inner_state) for t in run.inner_state[name])]


def test_a_copied_model_keeps_no_graph() -> None:
    import copy
    import pickle

    model = tiny_model(dtype=torch.float32)
    x, y = tokens(model, 1, 40)
    _forward(model, x, y, graphed=True)
    assert model._kept_graph.graphs
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not twin._kept_graph.graphs and not twin._kept_graph.casts
        got, ref = _forward(twin, x, y, graphed=True), _forward(model, x, y, graphed=True)
        assert torch.equal(got.token_nll, ref.token_nll)


def test_an_outer_gradient_never_takes_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float64)
    model.graph_chunks = True
    assert not model.options().graph_chunks  # gradients on: an outer gradient
    x, y = tokens(model, 1, 40)
    model(x, y).loss.backward()
    assert counts["graphs"] == 0


def _poison_marked_chunks(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner update of sequence 0 is NaN in every chunk whose first label is SENTINEL
    (marked by data, so that a graph's warm-up and replay of that chunk agree): its loss
    enters the inner optimizer times NaN, whether the step returns new weights (``step``)
    or writes them in place (``step_``, a graph's buffers)."""
    chunk = model.ttt_chunk
    optimizer = model.inner_optimizer
    steps = {name: getattr(optimizer, name) for name in ("step", "step_")}

    def poisoned(step: Any) -> Any:
        def poisoned_step(loss: torch.Tensor, *a: Any, **k: Any) -> Any:
            nan = torch.ones_like(loss)
            nan[0] = float("nan")
            return step(loss * nan, *a, **k)
        return poisoned_step

    def marked_chunk(h: torch.Tensor, labels: torch.Tensor, *a: Any) -> Any:
        if int(labels[0, 0]) != SENTINEL:
            return chunk(h, labels, *a)
        for name, step in steps.items():
            monkeypatch.setattr(optimizer, name, poisoned(step))
        try:
            return chunk(h, labels, *a)
        finally:
            for name, step in steps.items():
                monkeypatch.setattr(optimizer, name, step)

    monkeypatch.setattr(model, "ttt_chunk", marked_chunk)


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("in_place", [True, False])
def test_a_non_finite_update_is_dropped_for_its_sequence_as_eagerly(
        in_place: bool, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequence 0's update of the run's first chunk (launched), or of chunk 5 (a graphed
    one), is NaN: it keeps its fast weights there, as the eager guard keeps them (the
    reference: new weights each chunk, launched); sequence 1 is untouched; the norm shows
    the NaN. Updates written in place (the official SGD; launched, and in the graph's
    buffers), or selected after them."""
    model = tiny_model(dtype=torch.float32)
    x, y = tokens(model, 2, 40)
    y = y.clone()
    c = model.config.chunk_size
    y[0, ::c] = torch.where(y[0, ::c] == SENTINEL, SENTINEL + 1, y[0, ::c])
    y[0, chunk * c] = SENTINEL
    monkeypatch.setattr(model.inner_optimizer, "updates_in_place", False)
    clean = _forward(model, x, y, graphed=False)
    _poison_marked_chunks(model, monkeypatch)
    ref = _forward(model, x, y, graphed=False)
    monkeypatch.setattr(model.inner_optimizer, "updates_in_place", in_place)
    assert torch.isnan(ref.inner_update_norms[0, chunk]) and not torch.isnan(
        ref.inner_update_norms[1]).any()
    assert not torch.equal(ref.token_nll[0], clean.token_nll[0])  # the drop mattered
    assert torch.equal(ref.token_nll[1], clean.token_nll[1])
    for got in (_forward(model, x, y, graphed=True), _forward(model, x, y, graphed=False)):
        assert torch.isfinite(got.token_nll).all()
        for name in ("token_nll", "logits"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert torch.equal(got.inner_update_norms.isnan(), ref.inner_update_norms.isnan())
        finite = ~ref.inner_update_norms.isnan()
        assert torch.equal(got.inner_update_norms[finite], ref.inner_update_norms[finite])


def test_the_engine_prefill_takes_the_graph_and_continues_alike(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tttlm.inference.engine import Engine

    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32)
    x, _ = tokens(model, 2, 38)
    outs = []
    for graphed in (False, True):
        model.graph_chunks = graphed
        engine = Engine(model)
        logits, state = engine.prefill(x)
        nxt, state = engine.step(state, logits.argmax(-1))
        outs.append((logits, nxt, [w.clone() for w in state.fast]))
    assert counts["graphs"] == 1
    for a, b in zip(outs[1][:2], outs[0][:2], strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(outs[1][2], outs[0][2], strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_captured_chunks_equal_launched_chunks_on_cuda(autocast: bool) -> None:
    assert cuda_graph.can_capture(torch.device("cuda"))
    model = tiny_model(dtype=torch.float32).cuda()
    _graphed_equals_launched_on_cuda(model, 2, 64, 1, autocast)


def _graphed_equals_launched_on_cuda(model: Any, batch: int, length: int, seed: int,
                                     autocast: bool) -> None:
    x, y = (t.cuda() for t in tokens(model, batch, length, seed=seed))
    outs = []
    for graphed in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            outs.append(_forward(model, x, y, graphed=graphed))
    for name in ("token_nll", "logits", "inner_update_norms"):
        assert torch.equal(getattr(outs[1], name), getattr(outs[0], name)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_a_kept_graph_replays_later_runs_on_cuda(autocast: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph captured by a first run replays a later one of another length, which makes
    the graphs of the chunks while the caches fill (a repeated run), all replayed again
    after weights changed in place (a TTT block's projection, the tied head: read anew,
    through their bf16 casts under autocast): launched chunks' results, four graphs."""
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32).cuda()
    _graphed_equals_launched_on_cuda(model, 1, 64, 1, autocast)
    _graphed_equals_launched_on_cuda(model, 1, 72, 2, autocast)
    with torch.no_grad():
        model.ttt_layers[0].attn.wq.weight.mul_(1.5)
        model.embed.weight.mul_(0.9)
    _graphed_equals_launched_on_cuda(model, 1, 64, 3, autocast)
    assert counts["graphs"] == 1 + 3  # steady; then, repeated, one per filling length


def test_too_few_steady_chunks_are_not_worth_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 12, chunks of 4: 28 tokens give chunks 3-5 with full caches and an update, fewer
    than GRAPH_MIN_CHUNKS; 32 tokens give four. (Each a model's first run: a repeated one
    also graphs the chunks while the caches fill.)"""
    from tttlm.model.model import GRAPH_MIN_CHUNKS

    assert GRAPH_MIN_CHUNKS == 4
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32)
    for length, graphs in ((28, 0), (32, 1)):
        model.release_chunk_graph()
        x, y = tokens(model, 1, length)
        ref = _forward(model, x, y, graphed=False)
        got = _forward(model, x, y, graphed=True)
        assert counts["graphs"] == graphs, length
        assert torch.equal(got.token_nll, ref.token_nll)


@pytest.mark.parametrize("swapped", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_chunks_while_the_caches_fill_are_graphs_in_a_repeated_run(
        batch: int, swapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that repeats the last one's shapes takes a graph for each whole chunk while the
    caches fill (window 12, chunks of 4: caches of 0, 4 and 8 rows), kept for later runs of
    any length, short prompts too: the launched chunks' results and the state a session
    keeps (caches after the last chunk and at its start, fast weights, inner state, the last
    output), bit for bit. The caches of every length are views of one window's buffers
    (across the batch not contiguous for two sequences). A continued run whose caches are
    not whole chunks long takes none. The caches in two buffer sets or one."""
    _swap(monkeypatch, swapped)
    counts = _spy_graphs(monkeypatch)
    model = tiny_model(dtype=torch.float32, inner_optimizer="momentum")
    with torch.no_grad():
        def run(length: int, graphed: bool, caches: Any = None) -> Any:
            x, y = tokens(model, batch, length, seed=length)
            h = model.run_blocks(model.embed(x), model.prefix_layers)
            model.graph_chunks = graphed
            return model.run_ttt_chunks(h, y, torch.ones_like(y, dtype=torch.bool),
                                        model.options(), caches=caches, learn_last=True)

        run(40, True)
        assert counts == {"graphs": 1, "steps": 6}  # the steady graph; nothing repeated yet
        for length, steps in ((40, 3 + 6), (16, 3), (10, 2), (44, 3 + 7)):
            before = counts["steps"]
            got, ref = run(length, True), run(length, False)
            assert counts["steps"] - before == steps, length
            for a, b in zip(_state_tensors(got), _state_tensors(ref), strict=True):
                assert torch.equal(a, b), length
            for a, b in zip(got.nll + got.norms + [got.hidden], ref.nll + ref.norms + [ref.hidden],
                            strict=True):
                assert torch.equal(a, b), length
        kept = model._kept_graph
        assert counts["graphs"] == 1 + 3 and sorted(kept.graphs) == [0, 4, 8, 12]
        assert kept.buffers is not None
        full = kept.buffers.caches(got.caches, 12)
        views = [kept.buffers.caches(got.caches, n) for n in (0, 4, 8)]
        shared = [k.untyped_storage().data_ptr() == f.untyped_storage().data_ptr()
                  for caches in views for (k, _), (f, _) in zip(caches, full)]
        assert all(shared)
        # caches of 2 rows (a session continued): 2, 6, 10 rows are no stage of a fresh run
        past = [(k[:, :2].clone(), v[:, :2].clone()) for k, v in got.caches]
        graphs = counts["graphs"]
        got, ref = run(20, True, past), run(20, False, past)
        assert counts["graphs"] == graphs
        for a, b in zip(got.nll, ref.nll, strict=True):
            assert torch.equal(a, b)
