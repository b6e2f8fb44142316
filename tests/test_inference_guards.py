"""Engine guards: a state continues only on the weights that made it, the inner learning rate
and sampling settings are validated, a non-finite inner update is skipped (and counted) instead
of turning a sequence's fast weights into NaN, and empty batches are one-line errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm.errors import UserError
from tttlm.inference import Engine, generate, sample


def test_state_of_other_weights_is_refused() -> None:
    model, other = tiny_model(), tiny_model(seed=1)  # same config, other weights
    x, _ = tokens(model, 1, 10)
    _, state = Engine(model).prefill(x)
    # It used to continue silently, mixing one model's caches and fast weights into another.
    with pytest.raises(UserError, match="other weights"):
        Engine(other).step(state, [3])
    with pytest.raises(UserError, match="other weights"):
        Engine(other).prefill(x[:, :2], state)
    assert state.lengths == [10]  # untouched
    Engine(model).step(state, [3])  # a new engine of the same model is fine


@pytest.mark.parametrize("lr", [1e30, math.nan, math.inf, -1.0, True, "1"])
def test_inner_lr_is_validated(lr: object) -> None:
    with pytest.raises(UserError, match="inner_lr="):
        Engine(tiny_model(), inner_lr=lr)  # type: ignore[arg-type]


def test_inner_lr_zero_and_config_value_are_accepted() -> None:
    model = tiny_model()
    assert Engine(model, inner_lr=0).inner_lr == 0.0
    assert Engine(model).inner_lr == model.config.inner_lr


def test_non_finite_inner_update_is_skipped_and_counted() -> None:
    model = tiny_model()
    b = model.config.chunk_size
    x, _ = tokens(model, 2, 3 * b)
    engine = Engine(model)
    _, state = engine.prefill(x[:, :b])  # one full chunk waits for its last target
    clean = state.clone()
    before = [w.clone() for w in state.fast]
    # Row 1's chunk went bad (a NaN activation): its inner loss, gradient and update are NaN.
    with torch.inference_mode():
        state.pending_hidden[1, 0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        engine.step(state, x[:, b])
    assert state.skipped_updates == [0, 1] and state.chunks_done == [1, 1]
    for w, w0 in zip(state.fast, before):
        assert torch.equal(w[1], w0[1])  # kept, not NaN
        assert not torch.equal(w[0], w0[0])  # row 0 learned
    engine.step(clean, x[:, b])
    for w, ref in zip(state.fast, clean.fast):
        assert torch.equal(w[0], ref[0])  # row 0 exactly as without the bad row
    # Warned once per engine; the count goes on (the bad chunk's keys poisoned row 1's cache).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(b + 1, 2 * b + 1):
            engine.step(state, x[:, t])
    assert state.skipped_updates == [0, 2]
    assert all(bool(torch.isfinite(w).all()) for w in state.fast)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=math.nan), "top_p=nan"),
])
def test_bad_sampling_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    model = tiny_model()
    x, _ = tokens(model, 1, 5)
    with pytest.raises(UserError, match=match):
        Engine(model).generate(x, 3, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=match):
        sample(torch.zeros(1, 4), **{"temperature": 1.0, **kwargs})  # type: ignore[arg-type]


def test_top_k_zero_means_no_limit() -> None:
    model = tiny_model()
    x, _ = tokens(model, 1, 5)
    a = Engine(model).generate(x, 4, top_k=0, seed=3, stop=())
    b = Engine(model).generate(x, 4, top_k=None, seed=3, stop=())
    assert a.tokens == b.tokens


def test_empty_batches_are_user_errors() -> None:
    model = tiny_model()
    engine = Engine(model)
    with pytest.raises(UserError, match="no prompts given"):
        engine.prefill(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(UserError, match="no prompts given"):
        engine.generate([], 3)
    with pytest.raises(UserError, match="prompt 0 is empty"):
        engine.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(UserError, match="no prompts given"):
        generate(model, torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, torch.ones(2, 3, dtype=torch.long),
                 torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(UserError, match="batch=0"):
        engine.new_state(0)
