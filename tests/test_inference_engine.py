"""Prefill + teacher-forced decoding reproduces the training forward (METHOD.md §3, §5).

Everything in float64 on CPU: the engine and the training forward compute the same function in
a different order (token by token vs chunk at once, a ring cache vs a banded mask), so they agree
to rounding, ~1e-15 per op. NLL_ATOL = 1e-9 leaves room for that rounding to grow through the
inner steps; a wrong RoPE position, a step taken one token early or late, or a stale cache
moves the NLL by > 1e-3 at this size (asserted via the TTT-off gap where it matters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import GDN, MAMBA2, assert_close, tiny_model, tokens
from tttlm import TTTForCausalLM
from tttlm.inference import Engine
from tttlm.ops.attention import attention_backend

NLL_ATOL = 1e-9
FIXTURE = Path(__file__).parent / "data" / "official-tiny"
T = 45  # window 12, chunk 4: eleven chunk boundaries, the window wraps, a final partial chunk


def training_nll(model: TTTForCausalLM, x: torch.Tensor, y: torch.Tensor, ttt: bool,
                 ignore_bos: bool = True) -> torch.Tensor:
    labels = y.masked_fill(y == model.config.bos_token_id, -100) if ignore_bos else y
    with attention_backend("naive"), torch.no_grad():
        out = model(x, labels, ttt=ttt)
    assert out.token_nll is not None
    return out.token_nll


def engine_nll(engine: Engine, x: torch.Tensor, y: torch.Tensor,
               prefill: list[int]) -> list[torch.Tensor]:
    """Prefill row r with x[r, :prefill[r]], then feed the rest one token per step (teacher
    forcing); returns each row's NLL of targets prefill[r]-1 .. T-1."""
    B, length = x.shape
    logits, state = engine.prefill([x[r, :p] for r, p in enumerate(prefill)])
    out: list[list[torch.Tensor]] = [[] for _ in range(B)]
    pos, active = list(prefill), list(range(B))
    while active:
        for r in active:
            out[r].append(-torch.log_softmax(logits[r], -1)[y[r, pos[r] - 1]])
        active = [r for r in range(B) if pos[r] < length]
        if active:
            nxt = torch.tensor([x[r, min(pos[r], length - 1)] for r in range(B)])
            logits, state = engine.step(state, nxt, active=active)
            for r in active:
                pos[r] += 1
    return [torch.stack(o) for o in out]


def check_rows(model: TTTForCausalLM, got: list[torch.Tensor], ref: torch.Tensor,
               y: torch.Tensor, prefill: list[int], ignore_bos: bool = True) -> None:
    for r, p in enumerate(prefill):
        counted = (y[r, p - 1:] != model.config.bos_token_id) | (not ignore_bos)
        assert_close(got[r][counted], ref[r, p - 1:][counted], atol=NLL_ATOL, name=f"row {r}")


@pytest.mark.parametrize("prefill", [1, 7, 45], ids=lambda p: f"P{p}")
def test_e2e_decode_matches_training(prefill: int) -> None:
    model = tiny_model()
    x, y = tokens(model, 2, T)
    ref = training_nll(model, x, y, ttt=True)
    got = engine_nll(Engine(model), x, y, [prefill, prefill])
    check_rows(model, got, ref, y, [prefill, prefill])
    # The comparison has teeth: without the inner steps the NLL is far off.
    off = training_nll(model, x, y, ttt=False)
    assert (off - ref)[:, 8:].abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["swa", "full", "hybrid", "ttt_kvb", GDN, MAMBA2])
def test_baselines_decode_matches_training(variant: str) -> None:
    prefill = 5
    model = tiny_model(variant=variant, num_ttt_layers=None, global_every=2)
    x, y = tokens(model, 2, T)
    ref = training_nll(model, x, y, ttt=False)
    check_rows(model, engine_nll(Engine(model), x, y, [prefill] * 2), ref, y, [prefill] * 2)


def test_ttt_off_matches_pretrain_mode() -> None:
    model = tiny_model()
    x, y = tokens(model, 1, T)
    ref = training_nll(model, x, y, ttt=False)
    check_rows(model, engine_nll(Engine(model, ttt=False), x, y, [6]), ref, y, [6])


@pytest.mark.parametrize("variant", ["e2e", "full", "hybrid", "ttt_kvb", GDN, MAMBA2])
def test_ragged_batch_matches_training(variant: str) -> None:
    """Prompts of different lengths: chunk boundaries fall at different steps per sequence."""
    model = tiny_model(variant=variant, num_ttt_layers=2 if variant == "e2e" else None,
                       global_every=2)
    x, y = tokens(model, 3, 30, seed=5)
    prefill = [3, 10, 17]
    ref = training_nll(model, x, y, ttt=variant == "e2e")
    check_rows(model, engine_nll(Engine(model), x, y, prefill), ref, y, prefill)


def test_bos_targets_counted_when_asked() -> None:
    model = tiny_model()
    x, y = tokens(model, 1, T, seed=2)
    x[:, ::5] = model.config.bos_token_id  # many BOS targets, so the masking rule matters
    y[:, :-1] = x[:, 1:]
    for ignore in (True, False):
        ref = training_nll(model, x, y, ttt=True, ignore_bos=ignore)
        got = engine_nll(Engine(model, ignore_bos_targets=ignore), x, y, [2])
        check_rows(model, got, ref, y, [2], ignore_bos=ignore)


def test_prefill_in_pieces_equals_stepping() -> None:
    """A session extended by a second prompt (mid-chunk) equals reading it token by token."""
    model = tiny_model()
    x, _ = tokens(model, 1, 30)
    engine = Engine(model)
    a, state = engine.prefill(x[:, :10])
    a, state = engine.prefill(x[:, 10:30], state)
    b, other = engine.prefill(x[:, :1])
    for t in range(1, 30):
        b, other = engine.step(other, x[:, t])
    assert_close(a, b, atol=NLL_ATOL, name="logits")
    assert state.lengths == other.lengths == [30]
    assert state.chunks_done == other.chunks_done


def test_works_under_every_grad_context() -> None:
    """The inner step takes its own gradient whatever the caller's autograd mode."""
    model = tiny_model()
    x, _ = tokens(model, 2, 14)
    engine = Engine(model)
    results = {}
    for name, manager in [("plain", torch.enable_grad), ("no_grad", torch.no_grad),
                          ("inference_mode", torch.inference_mode)]:
        with manager():
            logits, state = engine.prefill(x[:, :5])
            for t in range(5, 14):
                logits, state = engine.step(state, x[:, t])
        assert state.chunks_done == [3, 3]
        assert not logits.requires_grad
        results[name] = logits
    assert not results["plain"].is_inference()
    assert torch.equal(results["plain"], results["no_grad"])
    assert torch.equal(results["plain"], results["inference_mode"])


@pytest.mark.parametrize("variant", ["e2e", "swa", "full", "hybrid", "ttt_kvb", GDN, MAMBA2])
def test_memory_constant_in_context(variant: str) -> None:
    """Reading 10x the window leaves an e2e/swa state the size it had after one token."""
    model = tiny_model(variant=variant, num_ttt_layers=2 if variant == "e2e" else None,
                       window=4, chunk_size=2, global_every=2)
    engine = Engine(model)
    window = model.config.window
    x, _ = tokens(model, 1, 10 * window)
    _, state = engine.prefill(x[:, :1])
    sizes = {state.nbytes()}
    for t in range(1, 10 * window):
        _, state = engine.step(state, x[:, t])
        sizes.add(state.nbytes())
    if variant in ("full", "hybrid"):
        assert len(sizes) > 1  # the full-attention cache grows, by doubling
    else:
        assert sizes == {state.nbytes()}, sizes


@pytest.mark.parametrize("source", ["orbax", "parity.npz"])
@pytest.mark.parametrize("ignore_bos,key", [(True, "officialmask/meta/token_nll"),
                                            (False, "meta/token_nll")])
def test_official_fixture(ignore_bos: bool, key: str, source: str) -> None:
    """The official-tiny model (window 64, chunk 32), converted from the official Orbax
    checkpoint (and from the npz), decodes the fixture sequence with the per-token NLL the
    official JAX code computed (fp32 there, so the fixture's own NLL tolerance, 1e-4)."""
    from tttlm.convert.official import from_official, infer_config, load_official_arrays

    if source == "orbax":
        pytest.importorskip("tensorstore")
    arrays = load_official_arrays(FIXTURE / source)
    config = infer_config(arrays, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)
    model = TTTForCausalLM(config)
    model.load_state_dict(from_official(arrays, config))
    model.double()
    with np.load(FIXTURE / "parity.npz") as data:
        x = torch.from_numpy(data["input/input_ids"]).long()[None]
        y = torch.from_numpy(data["input/target_tokens"]).long()[None]
        ref = torch.from_numpy(data[key]).double()[None]
    prefill = 170  # five chunks learned in prefill, two while decoding
    got = engine_nll(Engine(model, ignore_bos_targets=ignore_bos), x, y, [prefill])
    assert_close(got[0], ref[0, prefill - 1:], atol=1e-4, name=key)


def test_decoding_under_bf16_autocast_runs_and_agrees() -> None:
    """Caches keep their dtype when autocast hands them bf16 keys (the GPU configuration)."""
    import torch as _torch

    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.inference import Engine

    _torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig.from_preset("tiny"))
    engine = Engine(model)
    x = _torch.randint(0, 256, (2, 100), generator=_torch.Generator().manual_seed(0))
    with _torch.inference_mode():
        ref, state = engine.prefill(x)
        ref, state = engine.step(state, x[:, -1])
        with _torch.autocast("cpu", dtype=_torch.bfloat16):
            low, low_state = engine.prefill(x)
            low, low_state = engine.step(low_state, x[:, -1])
    assert _torch.isfinite(low.float()).all()
    # bf16 matmuls: agreement to about 1e-2 of the logit scale, not bitwise.
    assert (low.float() - ref).abs().max() < 5e-2 * ref.abs().max() + 5e-2


def test_rings_under_bf16_autocast_are_bf16_and_change_no_bit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast a new state's key/value rings are bf16 (the dtype the blocks
    compute in) instead of the fp32 weights' dtype: half the bytes, and attention reads them
    in bf16 either way, so prefill, learning while decoding and decoding give the same logits
    to the last bit as with fp32 rings. Read without autocast, such a state still runs."""
    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.inference import Engine

    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig.from_preset("tiny"))
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    runs = {}
    for ring in ("compute", torch.float32):
        engine = Engine(model)
        if ring != "compute":
            monkeypatch.setattr(engine, "_cache_dtype", lambda: torch.float32)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state = engine.prefill(x[:, :70])
            steps = [logits]
            for t in range(70, 100):  # past a chunk boundary: the inner step runs too
                logits, state = engine.step(state, x[:, t])
                steps.append(logits)
        runs[ring] = (steps, state)
    (new, new_state), (old, old_state) = runs["compute"], runs[torch.float32]
    assert new_state.prefix_keys[0].dtype == torch.bfloat16
    assert new_state.ttt_keys[0].dtype == torch.bfloat16
    assert old_state.prefix_keys[0].dtype == torch.float32
    for a, e in zip(new, old, strict=True):
        assert torch.equal(a, e)
    for a, e in zip(new_state.fast, old_state.fast, strict=True):
        assert torch.equal(a, e)
    with torch.inference_mode():  # a bf16-ring state read by an fp32 model without autocast
        logits, _ = Engine(model).step(new_state, x[:, -1])
    assert torch.isfinite(logits).all()


def test_a_session_made_under_autocast_reloads_and_continues_bit_for_bit(
        tmp_path: Path) -> None:
    """A state with bf16 rings (made under autocast) saved and loaded (its rings come back in
    the weights' dtype) continues with the same logits as the state that stayed in memory."""
    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.inference import Engine, State

    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig.from_preset("tiny"))
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(2))
    engine = Engine(model)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = engine.prefill(x[:, :70])
        assert state.prefix_keys[0].dtype == torch.bfloat16
        state.save(tmp_path / "session")
        kept, _ = engine.step(state, x[:, 70])
        loaded = State.load(tmp_path / "session", model)
        again, _ = engine.step(loaded, x[:, 70])
    assert torch.equal(kept, again)
