"""A test-time inner update that is not finite is dropped for its sequence only — in the
multi-chunk forward (evaluation, ``Engine.prefill``), where the check is read one block into the
next chunk, exactly as if the update had been skipped on the spot."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm.inference import Engine
from tttlm.ttt.fast import PrimeWeights
from tttlm.ttt.finite import FiniteGuard, keep_finite

BAD_ROW = 1


def patch_step(model: Any, at_call: int, fill: Callable[[torch.Tensor, torch.Tensor], None]
               ) -> list[int]:
    """Make the inner step's ``at_call``-th call (0-based) write ``fill(new, old)`` into row
    ``BAD_ROW`` of every new fast weight and a NaN into its norm. Every step returns new
    weights (``updates_in_place`` off): these tests are of the guard that checks them (an
    update in place selects on the device; ``tests/test_model_chunk_graph.py``)."""
    model.inner_optimizer.updates_in_place = False
    step = model.inner_optimizer.step
    calls = [0]

    def patched(loss: torch.Tensor, fast: Any, state: Any, *args: Any) -> Any:
        new_fast, new_state, norm = step(loss, fast, state, *args)
        if calls[0] == at_call:
            new_fast = [PrimeWeights(*(n.detach().clone() for n in layer)) for layer in new_fast]
            for layer, old in zip(new_fast, fast):
                for n, o in zip(layer, old):
                    fill(n, o)
            norm = norm.clone()
            norm[BAD_ROW] = math.nan
        calls[0] += 1
        return new_fast, new_state, norm

    model.inner_optimizer.step = patched
    return calls


def nan_row(new: torch.Tensor, old: torch.Tensor) -> None:
    new[BAD_ROW] = math.nan


def old_row(new: torch.Tensor, old: torch.Tensor) -> None:
    new[BAD_ROW] = old[BAD_ROW].detach()


def run(fill: Callable[[torch.Tensor, torch.Tensor], None], at_call: int) -> Any:
    model = tiny_model()
    x, y = tokens(model, 3, 5 * model.config.chunk_size)
    calls = patch_step(model, at_call, fill)
    with torch.no_grad():
        out = model(x, labels=y, ttt=True, return_fast_weights=True)
    assert calls[0] == 5  # every chunk learned (return_fast_weights: the last one too)
    return out


@pytest.mark.parametrize("at_call", [1, 4])  # a middle chunk; the last (checked at the end)
def test_non_finite_update_in_a_forward_is_skipped_for_its_sequence(at_call: int) -> None:
    got, want = run(nan_row, at_call), run(old_row, at_call)
    assert torch.isfinite(got.token_nll).all()
    assert torch.equal(got.token_nll, want.token_nll)
    torch.testing.assert_close(got.inner_update_norms, want.inner_update_norms, rtol=0, atol=0,
                               equal_nan=True)
    assert math.isnan(got.inner_update_norms[BAD_ROW, at_call])
    for g, w in zip(got.fast_weights, want.fast_weights, strict=True):
        for name in w:
            assert torch.equal(g[name], w[name]), name
    # The skipped row kept the weights it had: the update before (or W0) is repeated.
    before = got.fast_weights[at_call - 1]
    for name, w in got.fast_weights[at_call].items():
        assert torch.equal(w[BAD_ROW], before[name][BAD_ROW])


def test_engine_prefill_skips_a_non_finite_update_and_counts_nothing_twice() -> None:
    model = tiny_model()
    b = model.config.chunk_size
    x, _ = tokens(model, 3, 4 * b + 2)
    calls = patch_step(model, 1, nan_row)
    _, state = Engine(model).prefill(x)
    assert calls[0] > 1  # the poisoned step ran
    assert all(bool(torch.isfinite(w).all()) for w in state.fast)
    reference = tiny_model()
    patch_step(reference, 1, old_row)
    _, want = Engine(reference).prefill(x)
    for w, ref in zip(state.fast, want.fast, strict=True):
        assert torch.equal(w, ref)


def test_guard_settles_now_or_later() -> None:
    old = [PrimeWeights(*(torch.zeros(2, 3) for _ in range(3)))]
    new = [PrimeWeights(*(torch.ones(2, 3) for _ in range(3)))]
    state_old, state_new = {"m": [torch.zeros(2)]}, {"m": [torch.ones(2)]}
    finite = torch.tensor([1.0, 2.0])
    bad = torch.tensor([1.0, math.inf])

    deferred = FiniteGuard(deferred=True)
    assert deferred.watch(finite, old, state_old, new, state_new) == (new, state_new)
    assert deferred.pending and deferred.settle() is None and not deferred.pending
    assert deferred.watch(bad, old, state_old, new, state_new) == (new, state_new)
    fast, state = deferred.settle()
    assert fast[0].w1.tolist() == [[1.0] * 3, [0.0] * 3] and state["m"][0].tolist() == [1, 0]
    assert deferred.pop_corrected() == (fast, state) and deferred.pop_corrected() is None
    assert deferred.settle() is None  # nothing pending

    now = FiniteGuard(deferred=False)
    fast, state = now.watch(bad, old, state_old, new, state_new)
    expected = keep_finite(torch.tensor([True, False]), old, state_old, new, state_new)
    assert torch.equal(fast[0].w2, expected[0][0].w2) and not now.pending
