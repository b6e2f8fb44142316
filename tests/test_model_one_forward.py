"""One forward for training and inference, and the inner optimizers inside it (float64, CPU).

The engine's prefill of a fresh prompt *is* the training forward (the same functions on the
same tensors: bit-identical NLL and fast weights), decoding goes through the same block forward
and chunk forward, and each inner optimizer keeps prefill + decode equal to the training forward
across chunk boundaries and through a session saved mid-chunk.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, tiny_model, tokens
from test_inference_engine import NLL_ATOL, T, check_rows, engine_nll, training_nll
from tttlm.inference import Engine, State
from tttlm.model.cache import ChunkKV, RingKV, TTTRing, WholeSequence
from tttlm.ttt.fast import flatten_fast

OPTIMIZERS = ["sgd", "momentum", "learned_lr"]


def test_fresh_prefill_is_the_training_forward() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, T)
    runs = []
    original = model.run_ttt_chunks

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(original(*args, **kwargs))
        return runs[-1]

    model.run_ttt_chunks = spy  # type: ignore[method-assign]
    Engine(model).prefill(x)
    with torch.no_grad():  # BOS targets not counted, as the engine's default
        ref = model(x, y, loss_mask=y != model.config.bos_token_id, return_fast_weights=True)
    assert len(runs) == 2  # one each: the engine's prefill, the training forward
    run = runs[0]
    nll = torch.cat(run.nll, 1)
    assert ref.token_nll is not None and ref.fast_weights is not None
    # Every target but the last (the prompt's next token is not known to the prefill).
    assert torch.equal(nll[:, :-1], ref.token_nll[:, :-1])
    learned = ref.fast_weights[len(run.nll) - 2]  # the last chunk waits for its last target
    for name, w in zip(model.fast_weight_names(), flatten_fast(run.fast)):
        assert torch.equal(w, learned[name]), name


def test_every_path_goes_through_the_block_forward() -> None:
    """Training, prefill, decoding and the inner step all call Block.forward; record which
    caches each path hands it."""
    model = tiny_model()
    x, y = tokens(model, 1, 13)
    seen: list[type] = []
    for layer in model.layers:
        original = layer.forward

        def record(h, cache, *args, _f=original, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(type(cache))
            return _f(h, cache, *args, **kwargs)

        layer.forward = record  # type: ignore[method-assign]
    model(x, labels=y)
    assert set(seen) == {WholeSequence, ChunkKV}
    seen.clear()
    engine = Engine(model)
    _, state = engine.prefill(x)
    assert set(seen) == {WholeSequence, ChunkKV}
    seen.clear()
    for t in range(4):  # crosses a chunk boundary: the inner step runs
        _, state = engine.step(state, x[:, t])
    assert set(seen) == {RingKV, TTTRing, ChunkKV}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("prefill", [1, 7, 45], ids=lambda p: f"P{p}")
def test_decode_matches_training(optimizer: str, prefill: int) -> None:
    model = tiny_model(inner_optimizer=optimizer)
    x, y = tokens(model, 2, T)
    ref = training_nll(model, x, y, ttt=True)
    got = engine_nll(Engine(model), x, y, [prefill, prefill])
    check_rows(model, got, ref, y, [prefill, prefill])


@pytest.mark.parametrize("optimizer", ["momentum", "learned_lr"])
def test_ragged_batch_matches_training(optimizer: str) -> None:
    model = tiny_model(inner_optimizer=optimizer)
    x, y = tokens(model, 3, 30, seed=5)
    prefill = [3, 10, 17]
    ref = training_nll(model, x, y, ttt=True)
    check_rows(model, engine_nll(Engine(model), x, y, prefill), ref, y, prefill)


@pytest.mark.parametrize("optimizer", ["momentum", "learned_lr"])
def test_optimizers_change_the_predictions(optimizer: str) -> None:
    """The equivalence tests above have teeth: each optimizer learns differently from SGD."""
    model = tiny_model(inner_optimizer=optimizer)
    sgd = tiny_model()
    sgd.load_state_dict(model.state_dict(), strict=False)
    x, y = tokens(model, 1, T)
    a, b = training_nll(model, x, y, ttt=True), training_nll(sgd, x, y, ttt=True)
    # Momentum's first step is SGD's; a learned scale changes the first step already.
    same = model.config.chunk_size * (2 if optimizer == "momentum" else 1)
    assert_close(a[:, :same], b[:, :same], atol=1e-12, name="before the optimizers differ")
    assert (a - b)[:, same + model.config.chunk_size:].abs().max() > 1e-4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_session_saved_mid_chunk_continues_exactly(optimizer: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(inner_optimizer=optimizer)
    x, _ = tokens(model, 2, 30)
    engine = Engine(model)
    _, state = engine.prefill(x[:, :10])  # chunk 4: two tokens into the third chunk
    if optimizer == "momentum":
        assert state.inner["momentum"] and any(t.abs().max() > 0 for t in
                                               state.inner["momentum"])
    state.save(tmp_path / "s")
    loaded = State.load(tmp_path / "s", model)
    for t in range(10, 30):
        a, state = engine.step(state, x[:, t])
        b, loaded = engine.step(loaded, x[:, t])
        assert torch.equal(a, b), t
    assert loaded.chunks_done == state.chunks_done
    for key in state.inner:
        for p, q in zip(state.inner[key], loaded.inner[key]):
            assert torch.equal(p, q)


def test_learned_lr_is_meta_learned() -> None:
    model = tiny_model(inner_optimizer="learned_lr")
    assert "inner_optimizer.log_lr_scale" in model.state_dict()
    assert not any(k.startswith("inner_optimizer") for k in tiny_model().state_dict())
    x, y = tokens(model, 2, 24)
    model(x, labels=y).loss.backward()
    grad = model.inner_optimizer.log_lr_scale.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().min() > 0


def test_session_of_another_optimizer_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    momentum = tiny_model(inner_optimizer="momentum")
    x, _ = tokens(momentum, 1, 9)
    _, state = Engine(momentum).prefill(x)
    state.save(tmp_path / "s")
    with pytest.raises(ValueError, match="another config|config fingerprint"):
        State.load(tmp_path / "s", tiny_model())


def test_nll_tolerance_is_meaningful() -> None:
    assert NLL_ATOL <= 1e-9


def test_bf16_caches_without_an_outer_gradient_change_no_bit() -> None:
    """Under bf16 autocast, a fresh prefill keeps its TTT caches in bf16 (the projections'
    own values) instead of fp32 copies; every result is the same to the last bit as with the
    fp32 caches (the keys are rotated in fp32 and rounded once either way), and training
    keeps fp32 caches (their gradients accumulate there)."""
    model = tiny_model(dtype=torch.float32)
    x, y = tokens(model, 2, T)
    h_seen: list[torch.Tensor] = []
    original = model.run_ttt_chunks

    def spy(h, *args, **kwargs):  # type: ignore[no-untyped-def]
        h_seen.append(h)
        return original(h, *args, **kwargs)

    model.run_ttt_chunks = spy  # type: ignore[method-assign]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, y)
    model.run_ttt_chunks = original  # type: ignore[method-assign]
    h = h_seen[0]
    B, n = h.shape[0], model.config.num_kv_heads
    mask = torch.ones_like(y, dtype=torch.bool)
    runs = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        opts = model.options(ttt=True)
        for dtype in (None, torch.float32):
            caches = None if dtype is None else [
                (h.new_zeros(B, 0, n, model.config.head_dim),) * 2 for _ in model.ttt_layers]
            runs[dtype] = original(h, y, mask, opts, caches=caches, return_logits=True)
    new, old = runs[None], runs[torch.float32]
    assert new.caches[0][0].dtype == torch.bfloat16 and old.caches[0][0].dtype == torch.float32
    for name in ("nll", "logits", "norms"):
        for a, e in zip(getattr(new, name), getattr(old, name), strict=True):
            assert torch.equal(a, e), name
    for a, e in zip(flatten_fast(new.fast), flatten_fast(old.fast), strict=True):
        assert torch.equal(a, e)
    for (k, v), (k0, v0) in zip(new.caches, old.caches, strict=True):
        assert torch.equal(k.float(), k0) and torch.equal(v.float(), v0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = original(h.detach(), y, mask, model.options(ttt=True, grad_mode="first_order"))
    assert train.caches[0][0].dtype == torch.float32
