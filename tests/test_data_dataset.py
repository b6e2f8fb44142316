"""TokenDataset windows, the loader's determinism, resumption and rank sharding, check_vocab."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tttlm.data import DataError, SequenceSampler, TokenDataset, TokenLoader, check_vocab, prepare

SEQ = 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh \n"), size=int(n))) + "."
            for n in rng.integers(5, 60, size=40)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([root / "c.jsonl"], root / "out", "bytes", val_docs=2, shard_tokens=100,
            progress=False)
    return root / "out"


def test_windows_tile_the_stream(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=SEQ)
    full = ds.tokens(0, ds.num_tokens)
    assert len(ds) == (ds.num_tokens - 1) // SEQ
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        np.testing.assert_array_equal(ds.window(i), full[i * SEQ:i * SEQ + SEQ + 1])
    sample = ds[3]
    assert sample.input_ids.dtype == torch.int64 and sample.input_ids.shape == (SEQ,)
    assert sample.loss_mask.dtype == torch.bool
    assert torch.equal(sample.labels[:-1], sample.input_ids[1:])
    assert torch.equal(sample.labels[-1], ds[4].input_ids[0])


def test_too_long_sequence_names_the_maximum(prepared: Path) -> None:
    n = TokenDataset(prepared, "val", seq_len=1).num_tokens
    TokenDataset(prepared, "val", seq_len=n - 1)
    with pytest.raises(DataError, match=rf"split 'val' has {n} tokens: too few for "
                                        rf"seq_len={n}; the longest possible is seq_len={n - 1}"):
        TokenDataset(prepared, "val", seq_len=n)
    with pytest.raises(DataError, match=r"no 'test' split \(has: train, val\)"):
        TokenDataset(prepared, "test", seq_len=4)


def test_missing_shard_is_reported(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in prepared.iterdir():
        if f.name != "train_0001.bin":
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match=r"train_0001\.bin: missing or not 200 bytes"):
        TokenDataset(copy, "train", seq_len=4)


def _take(loader: TokenLoader, k: int) -> list[torch.Tensor]:
    return [next(loader).input_ids for _ in range(k)]


def test_loader_is_deterministic_and_batches_are_int64(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=SEQ)
    a, b = TokenLoader(ds, 4, seed=1), TokenLoader(ds, 4, seed=1)
    batch = next(TokenLoader(ds, 4, seed=1))
    assert batch.input_ids.shape == batch.labels.shape == batch.loss_mask.shape == (4, SEQ)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    assert torch.equal(batch.loss_mask, batch.labels != ds.bos_id)
    steps = 2 * len(ds) // 4 + 3
    for x, y in zip(_take(a, steps), _take(b, steps)):
        assert torch.equal(x, y)
    other = _take(TokenLoader(ds, 4, seed=2), 3)
    assert any(not torch.equal(x, y) for x, y in zip(other, _take(TokenLoader(ds, 4, seed=1), 3)))


def test_resume_gives_the_same_next_batches(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=SEQ)
    per_epoch = len(ds) // 4
    for k in (0, 5, per_epoch - 1, per_epoch + 2):
        run = TokenLoader(ds, 4, seed=7)
        _take(run, k)
        state = json.loads(json.dumps(run.state_dict()))
        expected = _take(run, per_epoch + 1)
        resumed = TokenLoader(ds, 4, seed=7)
        resumed.load_state_dict(state)
        for x, y in zip(_take(resumed, per_epoch + 1), expected):
            assert torch.equal(x, y)


def test_each_epoch_visits_each_window_once_in_a_new_order() -> None:
    sampler = SequenceSampler(10, 3, seed=0)
    epoch0 = np.concatenate([next(sampler) for _ in range(3)])
    epoch1 = np.concatenate([next(sampler) for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert epoch0.tolist() != epoch1.tolist()
    ordered = SequenceSampler(10, 3, shuffle=False, num_epochs=1)
    assert [b.tolist() for b in ordered] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_two_ranks_take_disjoint_windows_that_make_the_global_batch() -> None:
    ranks = [SequenceSampler(50, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    single = SequenceSampler(50, 6, seed=5)
    seen: list[int] = []
    for _ in range(2 * ranks[0].steps_per_epoch):
        r0, r1 = next(ranks[0]), next(ranks[1])
        assert not set(r0.tolist()) & set(r1.tolist())
        assert np.concatenate([r0, r1]).tolist() == next(single).tolist()
        seen += [*r0.tolist(), *r1.tolist()]
    assert len(set(seen[:48])) == 48


def test_state_from_another_layout_is_refused() -> None:
    state = SequenceSampler(50, 3, seed=5, world_size=2).state_dict()
    with pytest.raises(DataError, match=r"saved with world_size=2, this sampler has 1"):
        SequenceSampler(50, 3, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match=r"4 window\(s\) cannot fill one global batch of 6"):
        SequenceSampler(4, 3, world_size=2)


def test_check_vocab(prepared: Path) -> None:
    check_vocab(prepared, 258)
    meta = json.loads((prepared / "meta.json").read_text())
    check_vocab(meta, 257)
    with pytest.raises(DataError, match=r"token id 256 \(tokenizer bytes, vocab 258\) but the "
                                        r"model's vocab_size is 256; use vocab_size >= 257"):
        check_vocab(meta, 256)


def test_pickles_without_its_data(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=SEQ)
    assert ds.__getstate__()["_shards"] is None
    again = pickle.loads(pickle.dumps(ds))
    assert all(isinstance(s, np.memmap) for s in again._shards)
    np.testing.assert_array_equal(again.window(len(ds) - 1), ds.window(len(ds) - 1))
