"""Sessions: a saved and reloaded state continues bit-identically, and only on its own model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import GDN, MAMBA2, tiny_model, tokens
from tttlm.inference import Engine, State


@pytest.mark.parametrize("variant", ["e2e", "full", "hybrid", "ttt_kvb", GDN, MAMBA2])
def test_saved_session_continues_bit_identically(variant: str, tmp_path: Path) -> None:
    model = tiny_model(variant=variant, num_ttt_layers=2 if variant == "e2e" else None,
                       global_every=2)
    engine = Engine(model)
    x, _ = tokens(model, 2, 30)
    _, state = engine.prefill([x[0, :13], x[1, :6]])  # mid-chunk, different offsets
    state.save(tmp_path / "session")
    loaded = State.load(tmp_path / "session", model)
    assert loaded.lengths == state.lengths and loaded.chunks_done == state.chunks_done
    for t in range(13, 30):  # crosses several chunk boundaries after the reload
        a, state = engine.step(state, x[:, t])
        b, loaded = engine.step(loaded, x[:, t])
        assert torch.equal(a, b), f"step {t}"


def test_session_refuses_another_model(tmp_path: Path) -> None:
    model = tiny_model()
    _, state = Engine(model).prefill(tokens(model, 1, 9)[0])
    state.save(tmp_path / "s")
    with pytest.raises(ValueError, match="config fingerprint"):
        State.load(tmp_path / "s", tiny_model(window=16))
    other_weights = tiny_model(seed=1)
    with pytest.raises(ValueError, match="other weights"):
        State.load(tmp_path / "s", other_weights)
    State.load(tmp_path / "s", other_weights, check_weights=False)
    with pytest.raises(ValueError, match="another config"):
        Engine(tiny_model(window=16)).step(state, [3])
    with pytest.raises(FileNotFoundError, match="not a tttlm session"):
        State.load(tmp_path / "missing", model)


def test_clone_select_stack() -> None:
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 3, 12)
    _, state = engine.prefill([x[0, :7], x[1, :3], x[2, :9]])
    branch = state.clone()
    engine.step(branch, x[:, 11])
    assert branch.lengths == [8, 4, 10] and state.lengths == [7, 3, 9]
    rebuilt = State.stack([state.select([0]), state.select([1, 2])])
    a, _ = engine.step(state, x[:, 11])
    b, _ = engine.step(rebuilt, x[:, 11])
    assert torch.equal(a, b)
