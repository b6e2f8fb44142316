"""Config presets, validation messages, serialisation and save/load of models."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import assert_close, tiny_model, tokens
from tttlm import PRESETS, TTTConfig, TTTForCausalLM, Variant


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", list(Variant))
def test_presets_build(preset: str, variant: Variant) -> None:
    config = TTTConfig.from_preset(preset, variant)
    assert config.variant is variant
    if variant is Variant.E2E:
        assert config.num_ttt_layers == (2 if preset == "tiny" else config.num_layers // 4)
    else:
        assert config.num_ttt_layers == 0


def test_official_sizes_match_the_paper() -> None:
    c = TTTConfig.from_preset("125m")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == (12, 768, 12, 1664)
    assert (c.window, c.chunk_size, c.rope_theta, c.vocab_size) == (8192, 1024, 500000.0, 128256)
    assert TTTConfig.from_preset("3b", "full").intermediate_size == 6912
    with torch.device("meta"):
        e2e = TTTForCausalLM(TTTConfig.from_preset("125m")).num_parameters()
        full = TTTForCausalLM(TTTConfig.from_preset("125m", "full")).num_parameters()
    assert abs(e2e - full) / full < 0.02  # the reduced MLP width keeps the sizes matched


@pytest.mark.parametrize("fields, message", [
    (dict(window=16, chunk_size=32), "window=16 is smaller than chunk_size=32"),
    (dict(hidden_size=64, num_heads=5), "num_heads=5 does not divide hidden_size=64"),
    (dict(num_layers=4, num_ttt_layers=5), "num_ttt_layers=5 must be between 1 and"),
    (dict(variant="mamba"), "variant='mamba' is not known"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(inner_lr=-1.0), r"inner_lr=-1.0 must be >= 0; inner learning rates are >= 0"),
    (dict(bos_token_id=300), "bos_token_id=300 is outside the vocabulary"),
    (dict(hidden_size=12, num_heads=4), "head_dim=3"),
    # Non-finite or absurd values used to be accepted (NaN compares False with every bound)
    # and gave NaN losses at every step (issue #10, item 3).
    (dict(inner_lr=1e30), r"inner_lr=1e\+30 is too large: at most 1000"),
    (dict(inner_lr=float("nan")), "inner_lr=nan must be a finite number"),
    (dict(inner_lr_init=float("inf")), "inner_lr_init=inf must be a finite number"),
    (dict(rope_theta=float("nan")), "rope_theta=nan must be a finite number"),
    (dict(rope_theta=0.0), "rope_theta=0.0 must be > 0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan must be a finite"),
    (dict(inner_clip=float("nan")), "inner_clip=nan must be a finite"),
    (dict(initializer_range=-0.1), "initializer_range=-0.1 must be >= 0"),
    (dict(rope_theta="abc"), "rope_theta='abc' must be a number"),
    (dict(bos_token_id=1.5), "bos_token_id=1.5 must be an integer"),
    (dict(inner_lr_warmup_steps=-1), "inner_lr_warmup_steps=-1 must be an integer >= 0"),
])
def test_invalid_configs_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TTTConfig(**fields)


def test_inner_lr_bounds_are_inclusive() -> None:
    """0 (test-time training off) and the documented maximum are valid."""
    from tttlm.config import MAX_INNER_LR

    assert TTTConfig(inner_lr=0.0, inner_lr_init=0.0).inner_lr == 0.0
    assert TTTConfig(inner_lr=MAX_INNER_LR).inner_lr == MAX_INNER_LR


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="preset '7b' is not known"):
        TTTConfig.from_preset("7b")


def test_inner_lr_warmup() -> None:
    c = TTTConfig(inner_lr=1.0, inner_lr_init=0.1, inner_lr_warmup_steps=10)
    assert c.inner_lr_at(0) == pytest.approx(0.19)
    assert c.inner_lr_at(9) == pytest.approx(1.0)
    assert c.inner_lr_at(500) == 1.0
    assert TTTConfig().inner_lr_at(0) == 1.0


def test_config_json_roundtrip() -> None:
    c = TTTConfig.from_preset("350m", "swa", window=4096)
    d = json.loads(c.to_json())
    assert TTTConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown config fields"):
        TTTConfig.from_dict({**d, "n_layer": 3})


def test_save_and_load_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    loaded = TTTForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x, y = tokens(model, 2, 20)
    with torch.no_grad():
        assert_close(loaded(x, labels=y).token_nll, model(x, labels=y).token_nll, atol=0.0,
                     name="reloaded")


def test_from_pretrained_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="is not a tttlm model directory"):
        TTTForCausalLM.from_pretrained(tmp_path)
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "num_layers": 2}))
    with pytest.raises(ValueError, match="does not match its config"):
        TTTForCausalLM.from_pretrained(tmp_path)
