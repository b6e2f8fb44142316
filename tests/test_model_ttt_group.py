"""``ttt_group``: without an outer gradient the TTT chunks of a few sequences run at a time.

Sequences are independent at test time, so a grouped run gives each sequence what the
whole-batch run gives it (float64, CPU: to the last bit here; the test allows 1e-12 for a
matmul library that blocks rows by batch size), and only one group's fast weights, gradients
and updates are alive at once: what bounds prefill memory at a large batch.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, grads, tiny_model, tokens
from tttlm.inference import Engine

ATOL = 1e-12
B, T = 5, 23  # window 12, chunk 4: five full chunks and a partial one


def scored(model, x, y, group):  # type: ignore[no-untyped-def]
    model.ttt_group = group
    with torch.no_grad():
        return model(x, y, return_logits=True)


def inner_step_batches(model):  # type: ignore[no-untyped-def]
    """The batch size of every inner step ``model`` takes from now on (a list it fills):
    new weights (``step``) or written in place (``step_``)."""
    batches: list[int] = []

    def spied(step):  # type: ignore[no-untyped-def]
        def spy(loss, *args, **kwargs):  # type: ignore[no-untyped-def]
            batches.append(loss.shape[0])
            return step(loss, *args, **kwargs)
        return spy

    for name in ("step", "step_"):
        setattr(model.inner_optimizer, name, spied(getattr(model.inner_optimizer, name)))
    return batches


@pytest.mark.parametrize("group", [1, 2, 4])
def test_grouped_scoring_equals_the_whole_batch(group: int) -> None:
    model = tiny_model()
    x, y = tokens(model, B, T)
    ref, got = scored(model, x, y, None), scored(model, x, y, group)
    for name in ("loss", "token_nll", "chunk_losses", "logits", "inner_update_norms"):
        assert_close(getattr(got, name), getattr(ref, name), atol=ATOL, name=name)


def test_groups_bound_the_batch_of_every_inner_step() -> None:
    model = tiny_model()
    x, y = tokens(model, B, T)
    batches = inner_step_batches(model)
    scored(model, x, y, 2)
    chunks = len(model.chunks(T)) - 1  # the last chunk is predicted, not learned from
    assert batches == [2] * chunks + [2] * chunks + [1] * chunks


def test_an_outer_gradient_ignores_groups() -> None:
    """Training keeps the whole batch in one graph (micro-batches bound its memory)."""
    model = tiny_model()
    x, y = tokens(model, 3, T)
    outs, grad_sets = [], []
    for group in (None, 1):
        model.ttt_group = group
        out = model(x, y)
        out.loss.backward()
        outs.append(out.loss.detach())
        grad_sets.append(grads(model))
    assert torch.equal(outs[0], outs[1])
    for name, g in grad_sets[0].items():
        assert torch.equal(g, grad_sets[1][name]), name


@pytest.mark.parametrize("group", [1, 3])
def test_grouped_engine_prefill_and_decode_equal_the_whole_batch(group: int) -> None:
    model = tiny_model()
    x, _ = tokens(model, B, T)
    results = []
    for g in (None, group):
        model.ttt_group = g
        engine = Engine(model)
        first, state = engine.prefill(x)
        later = []
        logits = first
        for _ in range(7):  # across a chunk boundary
            logits, state = engine.step(state, logits.argmax(-1))
            later.append(logits)
        results.append((first, later, state))
    (ref_first, ref_later, ref_state), (first, later, state) = results
    assert_close(first, ref_first, atol=ATOL, name="prefill logits")
    for i, (a, b) in enumerate(zip(later, ref_later)):
        assert_close(a, b, atol=ATOL, name=f"step {i}")
    for a, b in zip(state.fast, ref_state.fast):
        assert_close(a, b, atol=ATOL, name="fast weights")
    for a, b in zip(state.ttt_keys + state.ttt_values, ref_state.ttt_keys + ref_state.ttt_values):
        assert_close(a, b, atol=ATOL, name="TTT caches")


def test_return_fast_weights_runs_the_whole_batch() -> None:
    model = tiny_model()
    x, y = tokens(model, 3, T)
    outs = []
    for group in (None, 1):
        model.ttt_group = group
        with torch.no_grad():
            outs.append(model(x, y, return_fast_weights=True))
    assert torch.equal(outs[0].token_nll, outs[1].token_nll)
    for a, b in zip(outs[0].fast_weights, outs[1].fast_weights):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_auto_groups_by_the_fast_weights_working_set() -> None:
    """``"auto"`` (the default) keeps a group's fast weights under a byte budget: the presets'
    groups, a tiny budget's groups of one, and at least one sequence however large the model."""
    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.model.model import AUTO_GROUP_BYTES, FAST_BYTES_PER_PARAMETER

    groups = {}
    for preset in ("125m", "760m", "3b"):
        with torch.device("meta"):
            model = TTTForCausalLM(TTTConfig.from_preset(preset, variant="e2e"))
        assert model.ttt_group == "auto"
        per_sequence = FAST_BYTES_PER_PARAMETER * sum(
            w.numel() for layer in model.ttt_layers for w in layer.prime.weights())
        groups[preset] = model.resolved_ttt_group()
        assert groups[preset] == AUTO_GROUP_BYTES // per_sequence
        assert model.auto_ttt_group(budget=1) == 1
    assert groups == {"125m": 137, "760m": 17, "3b": 4}


def test_auto_groups_leave_room_on_smaller_gpus() -> None:
    """On a GPU the budget is at most a third of its memory: 3b reads 4 sequences together on
    80 GB and 141 GB cards (the measured peak at 8K x 16: 34 GiB), 2 on a 40 GB card, 1 on
    24 GB, instead of running a 40 GB card out of memory."""
    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.model.model import AUTO_GROUP_BYTES, auto_group_budget

    assert auto_group_budget(None) == AUTO_GROUP_BYTES
    assert auto_group_budget(10**15) == AUTO_GROUP_BYTES
    assert auto_group_budget(42 * 10**9) == 14 * 10**9
    with torch.device("meta"):
        model = TTTForCausalLM(TTTConfig.from_preset("3b", variant="e2e"))
    # total_memory as torch reports it for an H200, an H100 80GB, an A100 40GB, a 24 GB card
    groups = [model.auto_ttt_group(budget=auto_group_budget(b)) for b in
              (150_109_003_776, 85_029_158_912, 42_298_834_944, 25_386_352_640)]
    assert groups == [4, 4, 2, 1]
    with torch.device("meta"):
        full = TTTForCausalLM(TTTConfig.from_preset("125m", variant="full"))
    assert full.resolved_ttt_group() is None


def test_auto_with_a_small_budget_runs_groups_with_the_same_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    x, y = tokens(model, B, T)
    ref = scored(model, x, y, None)
    monkeypatch.setattr(type(model), "auto_ttt_group", lambda self: 2)
    batches = inner_step_batches(model)
    got = scored(model, x, y, "auto")
    assert max(batches) == 2
    for name in ("loss", "token_nll", "chunk_losses", "logits", "inner_update_norms"):
        assert_close(getattr(got, name), getattr(ref, name), atol=ATOL, name=name)


@pytest.mark.parametrize("bad", [0, -1, "some", 2.0])
def test_a_bad_ttt_group_is_refused(bad: object) -> None:
    model = tiny_model()
    x, y = tokens(model, 2, T)
    model.ttt_group = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="ttt_group="), torch.no_grad():
        model(x, y)
