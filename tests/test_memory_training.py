"""Training with recall: quotes go before repeats from beyond the window, quoted targets are
not scored, the rest keep their mask, and a run with it trains and resumes like any run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tttlm.memory.training import find_repeats, insert_recalls
from tttlm.train.config import TrainConfig

SEP = 1


def batch_with_repeat(L: int = 200, i: int = 10, j: int = 150, n: int = 8):
    rng = np.random.default_rng(0)
    stream = rng.integers(3, 10_000, (2, L + 1))  # no accidental repeats
    stream[0, j:j + n] = stream[0, i:i + n]
    s = torch.from_numpy(stream)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, 5] = False  # a BOS target: must stay uncounted where it moves
    return s[:, :-1], s[:, 1:], mask


def test_find_repeats_needs_the_gap() -> None:
    s = np.array([5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 5, 6, 7, 8], dtype=np.int64)
    assert find_repeats(s, 4, min_gap=6) == [(0, 10)]
    assert find_repeats(s, 4, min_gap=7) == []


def test_quote_goes_before_the_repeat_and_is_not_scored() -> None:
    ids, labels, mask = batch_with_repeat()
    (new_ids, new_labels, new_mask), placed = insert_recalls(
        (ids, labels, mask), window=64, fraction=1.0, budget=20, separator=SEP, seed=(0, 0))
    assert [p.row for p in placed] == [0]  # row 1 holds no repeat: unchanged
    assert torch.equal(new_ids[1], ids[1]) and torch.equal(new_mask[1], mask[1])
    at, source, n = placed[0].at, placed[0].source, placed[0].length
    stream = torch.cat([new_ids[0], new_labels[0, -1:]])
    old = torch.cat([ids[0], labels[0, -1:]])
    assert n == 20 and source == 10 - 18 // 4
    assert stream[at] == SEP and stream[at + n - 1] == SEP
    assert torch.equal(stream[at + 1:at + n - 1], old[source:source + 18])
    assert torch.equal(stream[at + n:], old[at:len(old) - n])  # the repeat follows, cut to length
    assert torch.equal(stream[:at], old[:at])
    # targets: quote tokens not counted; the repeat's targets and everything else as before
    assert not new_mask[0, at - 1:at + n - 1].any()
    assert new_mask[0, at + n - 1:].all()
    assert not new_mask[0, 5] and new_mask[0, :at - 1].sum() == at - 2
    assert new_ids.shape == ids.shape and torch.equal(new_labels[0, :-1], new_ids[0, 1:])


def test_fraction_and_seed_decide_deterministically() -> None:
    b = batch_with_repeat()
    assert insert_recalls(b, window=64, fraction=0.0, budget=20, separator=SEP,
                          seed=(0, 0))[1] == []
    runs = [insert_recalls(b, window=64, fraction=0.5, budget=20, separator=SEP,
                           seed=(0, step))[1] for step in range(12)]
    assert runs == [insert_recalls(b, window=64, fraction=0.5, budget=20, separator=SEP,
                                   seed=(0, step))[1] for step in range(12)]
    assert 0 < sum(bool(r) for r in runs) < 12


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="recall_fraction"):
        TrainConfig(recall_fraction=1.5)
    with pytest.raises(ValueError, match="windowed model"):
        TrainConfig(mode="full", recall_fraction=0.5)
    with pytest.raises(ValueError, match="recall_budget=4"):
        TrainConfig(recall_budget=4)


def test_training_with_recall_resumes_bit_identically(tmp_path) -> None:
    from test_train_trainer import TEXT, losses
    from tttlm.data import prepare
    from tttlm.train.trainer import Trainer

    src = tmp_path / "text"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"Chapter {i}. " + TEXT * 12)
    data = tmp_path / "data"
    prepare([src], data, "bytes", val_docs=1, progress=False)

    def config(out: str, **kw: object) -> TrainConfig:
        base: dict[str, object] = dict(
            model="tiny", mode="e2e", data=str(data), out_dir=str(tmp_path / out), seq_len=160,
            batch_size=4, steps=4, lr=3e-3, log_every=1, eval_every=0, eval_sequences=1,
            save_every=2, progress=False, tensorboard=False, recall_fraction=0.5,
            model_overrides={"window": 32, "chunk_size": 16})
        base.update(kw)
        return TrainConfig(**base)  # type: ignore[arg-type]

    straight = Trainer(config("a"))
    straight.train()
    first = Trainer(config("b"))
    first.train(until=2)
    torch.manual_seed(99)
    resumed = Trainer(config("b"), resume=True)
    resumed.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (name, a), (_, b) in zip(straight.module.state_dict().items(),
                                 resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    plain = Trainer(config("c", recall_fraction=0.0))
    plain.train()
    assert losses(tmp_path / "c") != losses(tmp_path / "a")  # the quotes changed the batches
