"""The engine's captured computations (``cuda_graphs=True``) equal its eager ones.

On a GPU the real CUDA graphs run. On the CPU a stand-in capture runs the same code path: the
static buffers a graph reads, its warm-up (which must leave the state as it found it, or as the
replay will write it), which computations are captured and when. The stand-in runs the
warm-up, then replays by calling the captured function, as a replayed graph does its kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from _helpers import GDN, MAMBA2, stand_in_cuda_graphs, tiny_model, tokens
from tttlm import TTTForCausalLM
from tttlm.inference import Engine, State


def session(model: TTTForCausalLM, graphs: bool, turns: list[torch.Tensor],
            new_tokens: int, eager_first: bool = False
            ) -> tuple[list[torch.Tensor], State, Engine]:
    """Read ``turns`` one after the other into one state (a session), then decode greedily;
    returns every prefill's logits and every decoded step's logits. ``eager_first``: the first
    turn (a fresh state's read) without graphs."""
    engine = Engine(model, cuda_graphs=graphs)
    first = Engine(model) if eager_first else engine
    logits, state = first.prefill(turns[0])
    seen = [logits]
    for turn in turns[1:]:
        logits, state = engine.prefill(turn, state)
        seen.append(logits)
    for _ in range(new_tokens):
        logits, state = engine.step(state, logits.argmax(-1))
        seen.append(logits)
    return seen, state, engine


def assert_same(a: tuple[list[torch.Tensor], State, Engine],
                b: tuple[list[torch.Tensor], State, Engine], atol: float = 0.0) -> None:
    """Bit for bit by default. Where full-attention blocks decode, a graph attends over all of
    a cache's slots (the unused ones masked), the eager step over the used ones only, so the
    softmax sums differ in rounding (~1e-15 in fp64; a state advanced twice is off by O(1))."""
    atol = max(atol, 1e-12 if a[2].grows else 0.0)
    assert len(a[0]) == len(b[0])
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert torch.allclose(x, y, rtol=0, atol=atol), (
            f"logits {i} differ by {(x - y).abs().max():.3g}")
    sa, sb = a[1]._tensors(), b[1]._tensors()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], rtol=0, atol=atol), (
            f"state tensor {name} differs")
    assert (a[1].lengths, a[1].chunks_done) == (b[1].lengths, b[1].chunks_done)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Capture on the CPU (:func:`_helpers.stand_in_cuda_graphs`); returns the captures'
    keys."""
    captured = stand_in_cuda_graphs(monkeypatch)
    real_graph = Engine._graph

    def graph(self: Engine, state: State, key: tuple, make: Callable[[], Any]) -> Any:
        before = self._graphs.get(key)
        out = real_graph(self, state, key, make)
        if out is not None and out is not before:  # captured now (again, for new buffers)
            captured[-1] = key
        return out

    monkeypatch.setattr(Engine, "_graph", graph)
    return captured


def test_session_chunks_and_inner_steps_are_captured_and_exact(stand_in: list[tuple]) -> None:
    """A prompt (read eagerly), then two more turns of whole chunks (the second once the TTT
    caches are full), then decoding across chunk boundaries: the same logits and state, bit
    for bit, with the chunk forward, the inner step and the decoding step captured."""
    model = tiny_model()
    b = model.config.chunk_size
    x, _ = tokens(model, 2, 60, seed=3)
    turns = [x[:, :12], x[:, 12:28], x[:, 28:44]]  # window 12, chunk 4
    eager = session(model, False, turns, 11)
    graphed = session(model, True, turns, 11, eager_first=True)
    assert_same(graphed, eager)
    assert set(stand_in) == {("forward", b, False), ("forward", b, True), ("forward", 1, True),
                             ("learn",)}
    # Every computation was captured once: the state's buffers never moved.
    assert len(stand_in) == 4


def test_other_lengths_are_read_as_powers_of_two(stand_in: list[tuple]) -> None:
    """Turns that start and end inside chunks: the pieces of other lengths are read as pieces
    whose lengths are powers of two (3 = 2 + 1 here), each a reusable graph. The same function
    of the tokens in another order of sums: equal to rounding (fp64)."""
    model = tiny_model(chunk_size=8, window=16)
    x, _ = tokens(model, 2, 90, seed=3)
    turns = [x[:, :9], x[:, 9:30], x[:, 30:51], x[:, 51:74]]
    eager = session(model, False, turns, 11)
    graphed = session(model, True, turns, 11)
    assert_same(graphed, eager, atol=1e-12)
    sizes = {key[1] for key in stand_in if key[0] == "forward"}
    assert sizes and all(n & (n - 1) == 0 for n in sizes) and sizes - {1, 8}


@pytest.mark.parametrize("length", [44, 47])
def test_a_fresh_prompt_learns_chunk_by_chunk_with_graphs(stand_in: list[tuple],
                                                          length: int) -> None:
    """A fresh state's prompt: with graphs its chunks are learned as decoding learns them
    (the inner step captured once the caches are full) instead of the training forward's
    chunk loop: equal to rounding, then decoding continues alike. A prompt ending on a chunk
    boundary (44) keeps its last chunk pending, as the training forward's read does."""
    model = tiny_model()
    x, _ = tokens(model, 2, 60, seed=8)
    turns = [x[:, :length]]
    graphed = session(model, True, turns, 9)
    assert ("learn",) in stand_in
    assert_same(graphed, session(model, False, turns, 9), atol=1e-12)


def test_a_short_fresh_prompt_keeps_the_training_forward(stand_in: list[tuple]) -> None:
    """A fresh prompt with fewer than two chunks to learn once the caches are full (window 12
    + 2 chunks of 4 = 20 tokens) gains nothing from graphs: the training forward reads it, bit
    for bit as without them."""
    model = tiny_model()
    x, _ = tokens(model, 2, 30, seed=10)
    graphed = Engine(model, cuda_graphs=True).prefill(x[:, :20])
    eager = Engine(model).prefill(x[:, :20])
    assert stand_in == [] and torch.equal(graphed[0], eager[0])
    assert all(torch.equal(a, b) for a, b in zip(graphed[1]._tensors().values(),
                                                 eager[1]._tensors().values()))


def test_a_fresh_read_captures_at_second_use_a_session_at_once(stand_in: list[tuple]) -> None:
    """A fresh state's first prompt captures a computation at its second use (a state read
    once, like a ragged batch's row, is not worth a capture); a state that has read before (a
    session) captures at first use; another state starts over."""
    model = tiny_model()
    x, _ = tokens(model, 1, 40, seed=4)
    engine = Engine(model, cuda_graphs=True)
    _, state = engine.prefill(x[:, :20])  # inner steps at past 0, 4, 8, then one at 12: seen
    assert stand_in == []
    _, state = engine.prefill(x[:, 20:24], state)  # one more inner step, one chunk: captured
    assert stand_in == [("learn",), ("forward", 4, True)]
    engine.step(state, x[:, 24].reshape(-1))  # the decoding step, at once
    assert stand_in[-1] == ("forward", 1, True) and len(stand_in) == 3
    _, other = engine.prefill(x[:, :28])  # another state: inner steps at past 12 seen, then
    assert stand_in[-1] == ("learn",) and len(stand_in) == 4  # captured at the second


def test_a_ragged_batch_rows_are_read_once(stand_in: list[tuple]) -> None:
    """Prompts of different lengths continue a batch row by row, each row a new state read
    once: nothing is captured for a computation used once, and the result is the eager one."""
    model = tiny_model()
    x, _ = tokens(model, 2, 30, seed=9)

    def run(graphs: bool) -> tuple[torch.Tensor, State]:
        _, state = Engine(model).prefill(x[:, :14])  # 3 chunks learned, 2 tokens pending
        return Engine(model, cuda_graphs=graphs).prefill([x[0, 14:15], x[1, 14:16]], state)

    (graphed, gs), (eager, es) = run(True), run(False)
    assert stand_in == []
    assert torch.equal(graphed, eager)
    assert all(torch.equal(a, b) for a, b in zip(gs._tensors().values(),
                                                 es._tensors().values()))


@pytest.mark.parametrize("variant", ["hybrid", "ttt_kvb", GDN, MAMBA2])
def test_recurrent_blocks_advance_once(stand_in: list[tuple], variant: str) -> None:
    """A recurrent block's state is advanced from itself: a capture's warm-up must not leave
    it advanced, or the replay advances it twice."""
    model = tiny_model(variant=variant, num_ttt_layers=None, global_every=2)
    x, _ = tokens(model, 2, 40, seed=6)
    turns = [x[:, :7], x[:, 7:27]]  # pieces of other lengths: equal to rounding
    assert_same(session(model, True, turns, 9), session(model, False, turns, 9), atol=1e-12)
    assert ("forward", 1, True) in stand_in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["e2e", "hybrid", "ttt_kvb"])
def test_cuda_graphs_equal_eager_on_gpu(variant: str) -> None:
    """The real graphs, fp32 on a GPU: the same kernels replayed, except where a piece of
    another length is read as pieces of powers of two (rounding, fp32)."""
    model = tiny_model(variant=variant, dtype=torch.float32,
                       num_ttt_layers=2 if variant == "e2e" else None, global_every=2).cuda()
    x, _ = tokens(model, 2, 60, seed=3)
    x = x.cuda()
    turns = [x[:, :9], x[:, 9:30], x[:, 30:51]]
    # (fp32 rounding, ~1e-7 relative per sum, carried through ten inner steps)
    assert_same(session(model, True, turns, 11), session(model, False, turns, 11), atol=1e-4)
