"""Meta-fine-tuning a converted model: ``base_lr_scale`` (TTT weights at ``lr``, the rest slower
or frozen) and the ``ttt-finetune`` preset, which continues a model given with ``--init-from``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import prepared_corpus
from test_train_faults import error_line
from test_train_trainer import losses, tiny_config
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.cli import main
from tttlm.convert.ttt_ify import ttt_ify
from tttlm.model.model import is_ttt_parameter
from tttlm.train import checkpoint as ckpt
from tttlm.train.config import PRESETS, resolve_config
from tttlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_corpus(tmp_path_factory, docs=6, repeats=20, val_docs=1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-attention model made e2e by ``ttt_ify`` (zero prime output), as a folder."""
    torch.manual_seed(0)
    full = TTTForCausalLM(TTTConfig.from_preset("tiny", "full", vocab_size=258,
                                                bos_token_id=256, eos_token_id=257))
    model = ttt_ify(full, "e2e", window=32, chunk_size=16)
    return model.save_pretrained(tmp_path_factory.mktemp("converted") / "model")


def finetune(data_dir: Path, out: Path, init: Path, **kw: object) -> Trainer:
    kw.setdefault("steps", 3)
    return Trainer(tiny_config(data_dir, out, init_from=str(init), model="unused",
                               model_overrides={}, eval_every=0, save_every=1,
                               warmup_frac=0.0, dtype="float64", **kw))


def test_ttt_parameters_are_what_ttt_ify_adds(converted: Path) -> None:
    model = TTTForCausalLM.from_pretrained(converted)
    ttt = {n for n, _ in model.named_parameters() if is_ttt_parameter(n)}
    full_names = {n for n, _ in TTTForCausalLM(TTTConfig.from_preset(
        "tiny", "full", vocab_size=258)).named_parameters()}
    assert ttt and ttt.isdisjoint(full_names)
    assert ttt | full_names == {n for n, _ in model.named_parameters()}
    # wrappers' prefixes (DDP, torch.compile) do not hide them
    assert is_ttt_parameter("module._orig_mod.layers.3.prime.w1.weight")
    assert not is_ttt_parameter("module.layers.3.mlp.w1.weight")


def test_frozen_base_keeps_pretrained_weights(data_dir: Path, converted: Path,
                                              tmp_path: Path) -> None:
    trainer = finetune(data_dir, tmp_path / "run", converted, base_lr_scale=0.0)
    source = load_file(str(converted / "model.safetensors"))
    trainer.train()
    changed = 0
    for name, value in trainer.module.state_dict().items():
        if is_ttt_parameter(name):
            changed += not torch.equal(value, source[name].to(value.dtype))
        else:
            assert torch.equal(value, source[name].to(value.dtype)), name
    assert changed > 0  # the prime MLPs learned
    assert len(trainer.optimizer.param_groups) == 1
    assert all(is_ttt_parameter(n) == p.requires_grad for n, p in
               trainer.module.named_parameters())


def test_scaled_base_moves_by_the_scale(data_dir: Path, converted: Path, tmp_path: Path) -> None:
    """One AdamW step is linear in the LR (update and decoupled decay alike): at scale s the
    base weights move s times as far as at scale 1, the TTT weights as far."""
    source = load_file(str(converted / "model.safetensors"))
    deltas = {}
    for scale in (1.0, 0.25):
        trainer = finetune(data_dir, tmp_path / f"s{scale}", converted, base_lr_scale=scale,
                           steps=1)
        trainer.train()
        deltas[scale] = {n: v - source[n].to(v.dtype)
                         for n, v in trainer.module.state_dict().items()}
        groups = trainer.optimizer.param_groups
        assert len(groups) == (1 if scale == 1.0 else 2)
    moved = 0
    for name, full in deltas[1.0].items():
        expected = full if is_ttt_parameter(name) else 0.25 * full
        torch.testing.assert_close(deltas[0.25][name], expected, rtol=1e-9, atol=1e-15)
        moved += bool(full.abs().max() > 0)
    assert moved == len(deltas[1.0])


def test_finetune_resume_is_bit_identical(data_dir: Path, converted: Path,
                                          tmp_path: Path) -> None:
    straight = finetune(data_dir, tmp_path / "a", converted, base_lr_scale=0.1, steps=4)
    straight.train()
    first = finetune(data_dir, tmp_path / "b", converted, base_lr_scale=0.1, steps=4)
    first.train(until=2)
    torch.manual_seed(99)
    resumed = Trainer(first.config, resume=True)
    assert resumed.step == 2
    resumed.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (name, a), (_, b) in zip(straight.module.state_dict().items(),
                                 resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt.latest_checkpoint(tmp_path / "b") is not None


def test_preset_needs_a_model_to_continue(data_dir: Path, converted: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--preset", "ttt-finetune", "--data", str(data_dir), "--out",
            str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 2
    assert error_line(capsys).startswith("tttlm train: error: preset ttt-finetune continues "
                                         "a trained model; give it with --init-from")
    assert not (tmp_path / "run").exists()
    config = resolve_config("ttt-finetune", overrides={"init_from": str(converted)})
    assert config.base_lr_scale == PRESETS["ttt-finetune"]["base_lr_scale"] == 0.1
    assert config.seq_len >= 8 * 1024  # several windows of a 1K-window conversion


@pytest.mark.parametrize("kw, message", [
    (dict(mode="full"), "base_lr_scale=0.5 separates the TTT weights"),
    (dict(ttt=False), "base_lr_scale=0.5 separates the TTT weights"),
])
def test_base_lr_scale_needs_ttt(data_dir: Path, tmp_path: Path, kw: dict,
                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(data_dir, tmp_path, base_lr_scale=0.5, **kw)


def test_cli_finetune_runs(data_dir: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["train", "--preset", "ttt-finetune", "--init-from", str(converted), "--data",
                 str(data_dir), "--out", str(out), "--device", "cpu", "--steps", "2",
                 "--seq-len", "64", "--batch-size", "2", "--set", "progress=false",
                 "--set", "tensorboard=false", "--set", "eval_every=0",
                 "--set", "log_every=1"]) == 0
    assert [s for s, _ in losses(out)] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
