"""The Llama-family options of TTTConfig (issue 15): grouped-query attention, no QK-norm,
pre-norms only, half-split RoPE, RoPE scaling, untied head, biases, a free head width.

The official layout stays the default (its parity tests are in test_model_parity.py); here:
the defaults keep the fingerprints of models saved before these options existed, the options
reach the state dict, and the engine (prefill + teacher-forced decoding, sessions) computes
the training forward's function with them, in float64 (the tolerance of
test_inference_engine.py). Exactness against transformers is in test_convert_hf.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import tiny_model, tokens
from test_inference_engine import NLL_ATOL, check_rows, engine_nll, training_nll
from tttlm import TTTForCausalLM
from tttlm.config import TTTConfig
from tttlm.inference import Engine, State
from tttlm.ops.rope import apply_rope, rope_angles, rope_inv_freq

# Fingerprints of configs saved before the options existed (computed with the config.py of
# the commit before them): the defaults must not change them, or saved models stop loading.
OLD_FINGERPRINTS = {("tiny", "e2e"): "a3a204d1a6636b2f", ("125m", "e2e"): "f50444c3a45e998e",
                    ("1b", "full"): "300799cad45e706c"}

# Everything at once, with T = 45 > window 12 so that the window wraps: a wrong KV-head
# mapping, RoPE layout or missing bias moves the NLL far more than NLL_ATOL.
LLAMA_LIKE = dict(num_heads=4, num_kv_heads=2, head_dim=6, qk_norm=False, post_norms=False,
                  rope_layout="half", tie_embeddings=False, qkv_bias=True, attn_out_bias=True,
                  mlp_bias=True,
                  rope_freq_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
T = 45


@pytest.mark.parametrize("key", sorted(OLD_FINGERPRINTS))
def test_defaults_keep_old_fingerprints(key: tuple[str, str]) -> None:
    config = TTTConfig() if key[0] == "tiny" else TTTConfig.from_preset(*key)
    assert config.fingerprint() == OLD_FINGERPRINTS[key]


def test_options_change_fingerprint_and_round_trip() -> None:
    config = TTTConfig(**LLAMA_LIKE)  # type: ignore[arg-type]
    assert config.fingerprint() != TTTConfig().fingerprint()
    assert TTTConfig.from_dict(config.to_dict()) == config
    # Derived widths are written as null, so that a config.json edited to another width
    # follows it (and the Hugging Face config's defaults do not pin them).
    data = TTTConfig().to_dict()
    assert data["num_kv_heads"] is None and data["head_dim"] is None
    assert TTTConfig.from_dict({**data, "hidden_size": 128}).head_dim == 32


@pytest.mark.parametrize("bad, match", [
    (dict(num_kv_heads=3), "num_kv_heads=3 does not divide"),
    (dict(head_dim=5), "head_dim=5 must be even"),
    (dict(rope_layout="neox"), "rope_layout='neox' is not known"),
    (dict(rope_freq_scaling={"rope_type": "yarn", "factor": 2.0}), "not supported"),
    (dict(rope_freq_scaling={"rope_type": "linear"}), "rope_freq_scaling\\['factor'\\]"),
    (dict(qk_norm=1), "qk_norm=1 must be true or false"),
])
def test_bad_options_are_refused(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TTTConfig(**bad)  # type: ignore[arg-type]


def test_state_dict_follows_options() -> None:
    model = TTTForCausalLM(TTTConfig(**LLAMA_LIKE))  # type: ignore[arg-type]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.0.attn.wq.weight"] == (24, 64)
    assert shapes["layers.0.attn.wk.weight"] == (12, 64)
    assert shapes["layers.0.attn.wo.weight"] == (64, 24)
    assert shapes["layers.0.attn.wq.bias"] == (24,)
    assert shapes["layers.0.mlp.w2.bias"] == (64,)
    assert shapes["lm_head.weight"] == (256, 64)
    assert not any("q_norm" in k or "post_norm" in k for k in shapes)
    assert not any(k.startswith("layers.3.prime") and k.endswith("bias") for k in shapes)


def test_half_rope_is_rotate_half() -> None:
    """The half layout against transformers' formula written out: q*cos + rotate_half(q)*sin."""
    x = torch.randn(7, 3, 8, dtype=torch.float64)
    cos, sin = rope_angles(torch.arange(7), 8, 500.0, torch.float64, layout="half")
    x1, x2 = x[..., :4], x[..., 4:]
    expected = x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=0)
    # Same pairs as the interleaved layout after moving x[i + d/2] next to x[i].
    perm = torch.stack((torch.arange(4), torch.arange(4, 8)), -1).flatten()
    ci, si = rope_angles(torch.arange(7), 8, 500.0, torch.float64)
    torch.testing.assert_close(apply_rope(x[..., perm], ci, si), expected[..., perm])


def test_llama3_scaling_bands() -> None:
    """High frequencies kept, low ones divided by the factor, the middle blended."""
    plain = rope_inv_freq(16, 10000.0, dtype=torch.float64)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    scaled = rope_inv_freq(16, 10000.0, llama3, torch.float64)
    assert scaled[0] == plain[0]
    assert torch.allclose(scaled[-1], plain[-1] / 8)
    assert ((scaled < plain) & (scaled > plain / 8)).any()
    linear = rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}, torch.float64)
    torch.testing.assert_close(linear, plain / 4)


@pytest.mark.parametrize("variant, prefill", [("e2e", 7), ("e2e", 45), ("swa", 5),
                                              ("full", 5)])
def test_engine_decode_matches_training(variant: str, prefill: int) -> None:
    model = tiny_model(variant=variant, num_ttt_layers=2 if variant == "e2e" else None,
                       **LLAMA_LIKE)
    x, y = tokens(model, 2, T)
    ttt = variant == "e2e"
    ref = training_nll(model, x, y, ttt=ttt)
    check_rows(model, engine_nll(Engine(model), x, y, [prefill, prefill]), ref, y,
               [prefill, prefill])
    assert NLL_ATOL < 1e-6
    if ttt:  # the comparison has teeth: the inner steps matter
        assert (training_nll(model, x, y, ttt=False) - ref)[:, 8:].abs().max() > 1e-3


def test_session_round_trip(tmp_path: Path) -> None:
    """A saved session (caches of the KV heads only) continues as the unsaved one."""
    model = tiny_model(**LLAMA_LIKE)
    x, _ = tokens(model, 1, 30)
    engine = Engine(model)
    _, state = engine.prefill(x[:, :21])
    assert state.prefix_keys[0].shape[1] == 2  # KV heads, not query heads
    state.save(tmp_path / "s")
    a, _ = engine.prefill(x[:, 21:], state)
    b, _ = engine.prefill(x[:, 21:], State.load(tmp_path / "s", model))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hf_config_round_trip() -> None:
    """transformers' view of the options (``model_type="tttlm"``) gives them back unchanged;
    derived widths follow the width given there."""
    hf_config = pytest.importorskip("tttlm.hf.config")
    config = TTTConfig(**LLAMA_LIKE)  # type: ignore[arg-type]
    assert hf_config.TTTLMConfig.from_ttt_config(config).ttt_config == config
    assert hf_config.TTTLMConfig(hidden_size=128).ttt_config.head_dim == 32


def test_official_conversion_refuses_the_options() -> None:
    """The official checkpoint layout has no GQA, biases, untied head...: converting such a
    model to or from official tensors is refused by name, not failed on a shape."""
    from tttlm.convert import official_shapes
    from tttlm.errors import UserError

    official_shapes(TTTConfig())  # the official layout converts
    with pytest.raises(UserError, match="num_kv_heads=2.*tie_embeddings=False"):
        official_shapes(TTTConfig(**LLAMA_LIKE))  # type: ignore[arg-type]


def test_hf_generate_with_the_options(tmp_path: Path) -> None:
    """transformers' generate over a model with the options is the engine's, token for token
    (left-padded ragged prompts, several chunk boundaries)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import tttlm.hf  # noqa: F401  (registers model_type "tttlm")

    tiny_model(vocab_size=258, bos_token_id=256, eos_token_id=257,
               **LLAMA_LIKE).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (9,), generator=g), torch.randint(3, 250, (14,), generator=g)]
    x, mask = torch.full((2, 14), 257), torch.zeros(2, 14, dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, 14 - len(p):], mask[r, 14 - len(p):] = p, 1
    out = hf.generate(x, attention_mask=mask, max_new_tokens=25, do_sample=False)
    assert out[:, 14:].tolist() == Engine(hf.tttlm).generate(prompts, 25, temperature=0.0).tokens


def test_training_gradients_with_the_options() -> None:
    """The meta-gradient reaches every weight of a model with the options (untied head,
    biases, KV heads), and the lean head (logits recomputed in backward) gives the same."""
    model = tiny_model(**LLAMA_LIKE)
    x, y = tokens(model, 2, 20)
    got = {}
    for lean in (True, False):
        model.lean_head = lean
        model(x, y).loss.backward()
        got[lean] = {k: p.grad.clone() for k, p in model.named_parameters()
                     if p.grad is not None}
        model.zero_grad(set_to_none=True)
    assert set(got[True]) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert got[True]["lm_head.weight"].abs().max() > 0
    assert got[True]["layers.0.attn.wk.bias"].abs().max() > 0
    for name, grad in got[False].items():
        torch.testing.assert_close(got[True][name], grad, rtol=1e-9, atol=1e-12)
