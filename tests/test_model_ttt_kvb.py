"""The ``ttt_kvb`` variant: SWA blocks with a TTT-KVB block in every ``global_every`` (the
hybrid's placement), trained by the same trainer and decoded by the same engine (the engine's
equivalence with the training forward and its sessions: test_inference_engine/_state)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.cli import main
from tttlm.inference import Engine
from tttlm.model.cache import WholeSequence
from tttlm.ops.attention import attention_backend
from tttlm.ops.ttt_kvb import ttt_kvb_naive


def model() -> TTTForCausalLM:
    return tiny_model(variant="ttt_kvb", num_ttt_layers=None, global_every=2)


def test_blocks_and_parameters() -> None:
    m = model()
    assert [layer.kvb is not None for layer in m.layers] == [False, True, False, True]
    for size in ("125m", "760m", "3b"):
        with torch.device("meta"):
            e2e, kvb = (TTTForCausalLM(TTTConfig.from_preset(size, v)).num_parameters()
                        for v in ("e2e", "ttt_kvb"))
        assert abs(kvb / e2e - 1) < 0.03, size  # within 3% of the e2e model's


def test_forward_is_swa_blocks_and_the_naive_ttt_kvb() -> None:
    """The model's loss equals one built from the blocks by hand, with the per-token
    reference of TTT-KVB in the KVB blocks (float64), and learning changes it."""
    m = model()
    x, y = tokens(m, 2, 40)
    with attention_backend("naive"), torch.no_grad():
        out = m(x, y, ttt=False)
    c = m.config
    rope = m.rope_tables(torch.arange(x.shape[1]))
    with attention_backend("naive"):
        h = m.embed(x)
        for layer in m.layers:
            if layer.kvb is None:
                h = layer(h, WholeSequence(rope, c.window, c.chunk_size))
                continue
            xn = layer.attn_norm(h)
            q, k, v = layer.attn.project(xn)
            kvb = layer.kvb
            eta = c.inner_lr * torch.sigmoid(kvb.lr(xn)) / kvb.head_dim
            z, _, _ = ttt_kvb_naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    eta.transpose(1, 2), kvb.weight, kvb.bias, kvb.ln_weight,
                                    kvb.ln_bias, c.chunk_size, c.rms_norm_eps)
            h = layer.attention_output(h, z.transpose(1, 2).detach())
        ref, _ = m.head_nll(h, y, False)
    assert out.token_nll is not None
    torch.testing.assert_close(out.token_nll, ref.detach(), rtol=0, atol=1e-10)
    # with the inner learning rate at 0 the KVB blocks read their initial weights only
    frozen = tiny_model(variant="ttt_kvb", num_ttt_layers=None, global_every=2, inner_lr=0.0)
    with attention_backend("naive"), torch.no_grad():
        assert (frozen(x, y, ttt=False).token_nll - out.token_nll).abs().max() > 1e-4


def test_generate_continues_a_session(tmp_path: Path) -> None:
    """Greedy generation from a saved session equals generation in one go (the state holds
    the KVB blocks' fast weights mid-chunk)."""
    m = model()
    engine = Engine(m)
    x, _ = tokens(m, 1, 23)
    whole = engine.generate([x[0].tolist()], 9, temperature=0.0)
    _, state = engine.prefill(x[:, :10])
    assert len(state.mixers) == 4 * 2
    assert state.mixers[0].shape == (1, *m.layers[1].kvb.weight.shape)
    state.save(tmp_path / "s")
    from tttlm.inference import State

    loaded = State.load(tmp_path / "s", m)
    rest = engine.generate([x[0, 10:].tolist()], 9, temperature=0.0, state=loaded)
    assert rest.tokens == whole.tokens


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = TTTForCausalLM(TTTConfig.from_preset(
        "tiny", "ttt_kvb", vocab_size=258, bos_token_id=256, eos_token_id=257)).save_pretrained(
        tmp_path / "m")
    assert main(["generate", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens",
                 "3", "--device", "cpu"]) == 0


def test_every_ttt_kvb_parameter_gets_a_gradient() -> None:
    m = model()
    x, y = tokens(m, 2, 20)
    m(x, y, ttt=False).loss.backward()
    names = [n for n, _ in m.named_parameters() if ".kvb." in n]
    assert len(names) == 2 * 6  # weight, bias, ln_weight, ln_bias, lr.weight, lr.bias
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_mlp_fast_weights_decode_as_they_train(tmp_path: Path) -> None:
    """``kvb_fast=mlp``: prefill + teacher-forced decoding equals the training forward
    (float64, ragged prompts, across chunks), and a saved session continues bit for bit."""
    from test_inference_engine import check_rows, engine_nll, training_nll
    from tttlm.inference import State

    m = tiny_model(variant="ttt_kvb", num_ttt_layers=None, global_every=2, kvb_fast="mlp")
    assert m.layers[1].kvb is not None and m.layers[1].kvb.fast_names == (
        "weight1", "bias1", "weight2", "bias2")
    x, y = tokens(m, 2, 30, seed=4)
    prefill = [3, 10]
    ref = training_nll(m, x, y, ttt=False)
    check_rows(m, engine_nll(Engine(m), x, y, prefill), ref, y, prefill)
    engine = Engine(m)
    _, state = engine.prefill([x[0, :13], x[1, :6]])
    state.save(tmp_path / "s")
    loaded = State.load(tmp_path / "s", m)
    for t in range(13, 22):
        a, state = engine.step(state, x[:, t])
        b, loaded = engine.step(loaded, x[:, t])
        assert torch.equal(a, b), t
    # a linear model's session does not load into an MLP one
    linear = model()
    _, other = Engine(linear).prefill(x[:, :5])
    other.save(tmp_path / "linear")
    with pytest.raises(ValueError, match="config fingerprint"):
        State.load(tmp_path / "linear", m)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_model_decodes_with_float32_state(kind: str) -> None:
    """A bf16 model (serving, benchmarks) keeps the KVB state in float32 and decodes near the
    float64 model (bf16 projections: logits within a few hundredths)."""
    m = tiny_model(variant="ttt_kvb", num_ttt_layers=None, global_every=2, kvb_fast=kind)
    x, _ = tokens(m, 2, 16)
    high, low = Engine(m), Engine(copy.deepcopy(m).to(torch.bfloat16))
    ref_logits, ref = high.prefill(x[:, :7])
    logits, state = low.prefill(x[:, :7])
    assert all(t.dtype == torch.float32 for t in state.mixers)
    for t in range(7, 16):
        assert (logits.double() - ref_logits).abs().max() < 0.25, t
        logits, state = low.step(state, x[:, t])
        ref_logits, ref = high.step(ref, x[:, t])
