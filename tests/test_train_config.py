"""Training config: preset < file < flags < --set, value parsing, validation, shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tttlm.config import Variant
from tttlm.train.config import (
    PRESETS,
    PRESETS_NEEDING_INIT,
    Parallel,
    TrainConfig,
    parse_overrides,
    resolve_config,
)
from tttlm.ttt.inner import GradMode

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_override_parsing_types() -> None:
    parsed = parse_overrides([
        "lr=1e-3", "steps=7", "ttt=false", "compile=on", "inner_lr=none", "mode=swa",
        "model.window=256", "model.rope_theta=500000.0", "model.variant_note=abc",
        "micro-batch-size=2", "model_overrides={\"chunk_size\": 32}"])
    assert parsed["lr"] == 1e-3 and isinstance(parsed["steps"], int) and parsed["steps"] == 7
    assert parsed["ttt"] is False and parsed["compile"] is True and parsed["inner_lr"] is None
    assert parsed["mode"] == "swa" and parsed["micro_batch_size"] == 2
    # model.* keys merge with an explicit model_overrides object given in the same list.
    assert parsed["model_overrides"] == {"window": 256, "rope_theta": 500000.0,
                                         "variant_note": "abc", "chunk_size": 32}


@pytest.mark.parametrize("item, match", [
    ("lr", "key=value"), ("=3", "key=value"), ("nope=1", "unknown key"),
    ("steps=1.5", "integer"), ("lr=fast", "number"), ("ttt=maybe", "boolean"),
    ("model_overrides=[1]", "JSON object"),
])
def test_override_errors(item: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_overrides([item])


def test_resolution_order(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"_comment": "x", "lr": 1e-3, "steps": 50,
                                "model_overrides": {"window": 128, "chunk_size": 32}}))
    config = resolve_config("debug", file, {"steps": 60}, ["model.window=64", "seed=3"])
    assert config.model == PRESETS["debug"]["model"]  # from the preset
    assert config.lr == 1e-3  # the file beats the preset
    assert config.steps == 60  # flags beat the file
    assert config.model_overrides == {"window": 64, "chunk_size": 32}  # --set merges
    assert config.seed == 3
    mc = config.model_config()
    assert (mc.window, mc.chunk_size, mc.variant) == (64, 32, Variant.E2E)
    assert mc.inner_lr_warmup_steps == round(0.1 * 60)


def test_enums_and_derived_values() -> None:
    config = TrainConfig(mode="full", grad_mode="first_order", parallel="fsdp", steps=200,
                         warmup_frac=0.05, inner_lr_warmup_frac=0.1, ttt=True)
    assert config.mode is Variant.FULL and config.grad_mode is GradMode.FIRST_ORDER
    assert config.parallel is Parallel.FSDP
    assert config.ttt is False  # baselines have no inner loop
    assert (config.warmup_steps, config.inner_lr_warmup_steps) == (10, 20)
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("fields, match", [
    (dict(mode="mamba"), "mode"), (dict(steps=0), "steps"), (dict(seq_len=-1), "seq_len"),
    (dict(batch_size=8, micro_batch_size=3), "divide"), (dict(warmup_frac=1.5), "warmup"),
    (dict(lr=1e-3, end_lr=1e-2), "end_lr"), (dict(device="tpu"), "device"),
    (dict(dtype="bfloat16"), "autocast"), (dict(model="7b"), "preset"),
    (dict(model_overrides={"widht": 3}), "TTTConfig"), (dict(keep_checkpoints=0), "resume"),
    (dict(device="bogus"), "device='bogus' is not known; use auto, cpu, cuda or cuda:N"),
    (dict(device="cuda:x"), "device='cuda:x' is not known"),
    # NaN and infinity passed every range check (NaN compares False) and trained to NaN
    # (issue #10, item 3); so did an absurd inner learning rate.
    (dict(inner_lr=1e30), r"inner_lr=1e\+30 is too large: at most 1000"),
    (dict(inner_lr=float("nan")), "inner_lr=nan must be a finite number"),
    (dict(lr=float("nan")), "lr=nan must be a finite number"),
    (dict(lr=float("inf")), "lr=inf must be a finite number"),
    (dict(grad_clip=float("nan")), "grad_clip=nan must be a finite number"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0 must be >= 0"),
    (dict(weight_decay=float("nan")), "weight_decay=nan"),
    (dict(eps=0.0), "eps=0.0 must be > 0"), (dict(beta2=1.0), "beta2=1.0 must be < 1"),
    (dict(beta1=float("nan")), "beta1=nan"), (dict(warmup_frac=float("nan")), "warmup_frac=nan"),
    (dict(model_overrides={"inner_lr": float("nan")}), "model.inner_lr=nan must be a finite"),
    (dict(model_overrides={"rope_theta": float("inf")}), "model.rope_theta=inf"),
    (dict(max_nonfinite_steps=0), "max_nonfinite_steps=0 must be a positive integer"),
    # Config files are not parsed by --set: wrong types get a message, not a TypeError.
    (dict(micro_batch_size="2"), "micro_batch_size='2' must be an integer"),
    (dict(ttt="false"), "ttt='false' must be true or false"),
    (dict(lr="fast"), "lr='fast' must be a number"),
    (dict(tensorboard="maybe"), "tensorboard='maybe': use auto"),
])
def test_bad_values(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_model_overrides_reach_model_validation() -> None:
    """`--set model.rope_theta=nan` (not JSON) is parsed as a number and refused by name, and
    an absurd η in the model overrides is refused when the model config is built."""
    with pytest.raises(ValueError, match="model.rope_theta=nan must be a finite number"):
        resolve_config("debug", None, {}, ["model.rope_theta=nan"])
    config = resolve_config("debug", None, {}, ["model.inner_lr=1e30"])
    with pytest.raises(ValueError, match=r"inner_lr=1e\+30 is too large"):
        config.model_config()


def test_tensorboard_setting() -> None:
    assert TrainConfig().tensorboard == "auto"
    assert parse_overrides(["tensorboard=auto"]) == {"tensorboard": "auto"}
    assert resolve_config(None, None, {}, ["tensorboard=off"]).tensorboard is False
    assert resolve_config(None, None, {}, ["tensorboard=true"]).tensorboard is True
    assert TrainConfig.from_dict(json.loads(TrainConfig().to_json())).tensorboard == "auto"


def test_unknown_sources() -> None:
    with pytest.raises(ValueError, match="preset"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_config(config_file="/no/such/file.json")
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_bad_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{lr: 1}")
    with pytest.raises(ValueError, match="invalid JSON"):
        resolve_config(config_file=bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        resolve_config(config_file=bad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name: str) -> None:
    # (a preset that continues a model resolves once it is given one)
    config = resolve_config(name, overrides={"init_from": "runs/x"}
                            if name in PRESETS_NEEDING_INIT else None)
    if config.init_from is None and name != "books-32k":
        config.model_config()  # the model preset and overrides build a valid TTTConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_config_files_resolve(path: Path) -> None:
    config = resolve_config(config_file=path)
    assert config.model_config().variant is config.mode


def test_extension_preset_matches_the_official_recipe() -> None:
    config = resolve_config("books-32k")
    assert (config.seq_len, config.lr, config.batch_size) == (32768, 4e-4, 32)
    assert config.inner_lr_warmup_steps == 0
    assert config.model_config().inner_lr_at(0) == 1.0


def test_lean_head_reaches_the_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The memory/time switch of the output head is a training setting."""
    from tttlm.data import prepare
    from tttlm.train.trainer import Trainer

    src = tmp_path / "t.txt"
    src.write_text("Some text to train on. " * 200)
    data = tmp_path / "d"
    prepare([src], data, "bytes", progress=False)
    base = resolve_config("debug", None, {"data": str(data), "out_dir": str(tmp_path / "r")},
                          ["lean_head=false"])
    assert base.lean_head is False
    assert Trainer(base).module.lean_head is False
