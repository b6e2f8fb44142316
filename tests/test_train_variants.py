"""The baselines added to the harness train and resume like every run: 3 steps straight equal
2 steps, a stop and a resume, bit for bit (losses and weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import GDN, MAMBA2
from test_train_trainer import TEXT, losses, tiny_config
from tttlm.data import prepare
from tttlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("text")
    for i in range(4):
        (src / f"d{i}.txt").write_text(f"Part {i}. " + TEXT * 20)
    out = tmp_path_factory.mktemp("prepared")
    prepare([src], out, "bytes", val_docs=1, progress=False)
    return out


@pytest.mark.parametrize("variant", ["hybrid", "ttt_kvb", GDN, MAMBA2])
def test_train_and_resume(variant: str, data: Path, tmp_path: Path) -> None:
    overrides = {"window": 16, "chunk_size": 8, "global_every": 2}

    def config(out: str) -> object:
        return tiny_config(data, tmp_path / out, mode=variant, steps=3, save_every=1,
                           eval_every=0, model_overrides=overrides)

    straight = Trainer(config("a"))
    straight.train()
    first = Trainer(config("b"))
    first.train(until=2)
    resumed = Trainer(config("b"), resume=True)
    resumed.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (name, a), (_, b) in zip(straight.module.state_dict().items(),
                                 resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    if variant == "hybrid":
        assert straight.model_config.full_attention_layers == [1, 3]
