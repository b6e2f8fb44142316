"""Paged session saves (``State.save(paged=True)``): a save writes only the pages that changed,
a reloaded state continues bit-identically, packs of a base session are hard-linked, and a
cut, replaced or missing pack is refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import GDN, MAMBA2, tiny_model, tokens
from tttlm import files
from tttlm.errors import UserError
from tttlm.inference import Engine, State, pages
from tttlm.inference import state as state_module


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model's caches are a few KiB: pages of 4 slots (2 sequences x 2 heads x 8 wide
    # x 8 bytes = 256 bytes a slot) make a step change one page of each cache, not all of it.
    monkeypatch.setattr(pages, "PAGE_BYTES", 1024)


def packs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("session-*.safetensors")}


def new_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(size for name, size in after.items() if name not in before)


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state._tensors().values())


def assert_same(a: State, b: State) -> None:
    ta, tb = a._tensors(), b._tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert (a.lengths, a.chunks_done, a.skipped_updates) == (b.lengths, b.chunks_done,
                                                             b.skipped_updates)


def saved_after_9_tokens(tmp_path: Path) -> tuple[Any, Engine, torch.Tensor, State, Path]:
    """The tiny model, its engine, a token sequence, the state after its first 9 tokens and
    the folder that state was saved to (paged)."""
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 1, 30)
    _, state = engine.prefill(x[:, :9])
    folder = tmp_path / "s"
    state.save(folder, paged=True)
    return model, engine, x, state, folder


@pytest.mark.parametrize("variant", ["e2e", "full", "hybrid", "ttt_kvb", GDN, MAMBA2])
def test_paged_saves_after_every_step_reload_bit_identically(variant: str,
                                                            tmp_path: Path) -> None:
    model = tiny_model(variant=variant, num_ttt_layers=2 if variant == "e2e" else None,
                       global_every=2)
    engine = Engine(model)
    x, _ = tokens(model, 2, 30)
    _, state = engine.prefill([x[0, :13], x[1, :6]])
    folder = tmp_path / "session"
    state.save(folder, paged=True)
    for t in range(13, 30):  # past several chunk boundaries and the window
        a, state = engine.step(state, x[:, t])
        state.save(folder, paged=True)
        loaded = State.load(folder, model)
        assert_same(state, loaded)
        b, _ = engine.step(loaded.clone(), x[:, min(t + 1, 29)])
        c, _ = engine.step(state.clone(), x[:, min(t + 1, 29)])
        assert torch.equal(b, c), f"step {t}"
    # Whatever the saves replaced is gone: only the packs the manifest names, and together
    # at most twice the state (the compaction bound) plus a page.
    meta = json.loads((folder / "session.json").read_text())
    assert set(packs(folder)) == set(meta["packs"])
    assert sum(packs(folder).values()) <= 2 * state_bytes(state) + 2 * pages.PAGE_BYTES + 4096


def test_a_step_writes_only_the_pages_it_changed(tmp_path: Path) -> None:
    model = tiny_model(window=64, chunk_size=16, num_layers=2, num_ttt_layers=1)
    engine = Engine(model)
    x, _ = tokens(model, 2, 80)
    _, state = engine.prefill(x[:, :40])
    folder = tmp_path / "s"
    state.save(folder, paged=True)
    full = packs(folder)
    # The first save writes every distinct page (the empty slots' pages are one page).
    _, cut = pages.cut_pages(state._tensors(), pages.PAGE_BYTES)
    distinct = {p.key: p.data.numel() * p.data.element_size() for p in cut}
    assert len(distinct) < len(cut) and new_bytes({}, full) >= sum(distinct.values())
    engine.step(state, x[:, 40])  # mid-chunk: one slot of each cache, no inner step
    state.save(folder, paged=True)
    after = packs(folder)
    written = new_bytes(full, after)
    # One 1 KiB page of each of the 4 caches (keys, values of the prefix and TTT blocks) and
    # the pending chunk; the fast weights, most of every cache, stay where they were.
    assert 0 < written < state_bytes(state) / 4, (written, state_bytes(state))
    assert set(full) <= set(after)  # the first pack still holds the unchanged pages
    assert_same(state, State.load(folder, model))
    # Saving an unchanged state writes no page (a pack of counters only).
    before = packs(folder)
    state.save(folder, paged=True)
    assert new_bytes(before, packs(folder)) < 1024
    assert_same(state, State.load(folder, model))


def test_a_base_session_shares_its_packs_by_hard_link(tmp_path: Path) -> None:
    model = tiny_model()
    engine = Engine(model)
    x, _ = tokens(model, 2, 30)
    _, state = engine.prefill(x[:, :17])
    state.save(tmp_path / "a", paged=True)
    fork = state.clone()
    engine.step(fork, x[:, 17])
    fork.save(tmp_path / "b", paged=True, base=tmp_path / "a")
    a, b = packs(tmp_path / "a"), packs(tmp_path / "b")
    shared = set(a) & set(b)
    assert shared, "the fork reuses the base's pages"
    for name in shared:
        assert (tmp_path / "a" / name).stat().st_ino == (tmp_path / "b" / name).stat().st_ino
    assert_same(fork, State.load(tmp_path / "b", model))
    assert_same(state, State.load(tmp_path / "a", model))  # the base is untouched
    (tmp_path / "a" / "session.json").unlink()  # b stands alone: it needs nothing of a
    for name in a:
        (tmp_path / "a" / name).unlink()
    assert_same(fork, State.load(tmp_path / "b", model))


def test_cut_replaced_missing_and_edited_packs_are_refused(tmp_path: Path) -> None:
    model, engine, x, state, folder = saved_after_9_tokens(tmp_path)
    first = set(packs(folder))
    engine.step(state, x[:, 9])
    state.save(folder, paged=True)
    meta = json.loads((folder / "session.json").read_text())
    (old,) = first & set(packs(folder))  # a pack of the first save that the second reuses
    head = meta["tensors"]["file"]
    data = (folder / old).read_bytes()

    def damaged(match: str) -> None:
        with pytest.raises(UserError, match=match):
            State.load(folder, model)

    (folder / old).write_bytes(data[:-8])
    damaged("missing or not the size")
    # Same size, other bytes (a flipped byte in the last tensor's data): the page hash shows.
    (folder / old).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    damaged("is not the page session.json names")
    (folder / old).unlink()
    damaged("missing or not the size")
    (folder / old).write_bytes(data)
    assert_same(state, State.load(folder, model))
    head_data = (folder / head).read_bytes()
    (folder / head).write_bytes(head_data[:-1] + b" ")
    damaged("cut or mixed")
    (folder / head).write_bytes(head_data)
    for edit in ({"packs": {"../x": 3}}, {"pages": {"fast.0": {"pages": [["nope", "0"]]}}},
                 {"pages": {**meta["pages"], "fast.0": {**meta["pages"]["fast.0"],
                                                        "dtype": "no_such_dtype"}}}):
        (folder / "session.json").write_text(json.dumps({**meta, **edit}))
        damaged("session.json is damaged")
    (folder / "session.json").write_text(json.dumps({**meta, "lengths": [11]}))
    damaged("does not match its tensor file")


def test_an_interrupted_paged_save_keeps_the_previous_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, engine, x, state, folder = saved_after_9_tokens(tmp_path)
    engine.step(state, x[:, 9])

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # the new pack is written, the manifest is not

    monkeypatch.setattr(state_module, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        state.save(folder, paged=True)
    monkeypatch.undo()
    assert State.load(folder, model).lengths == [9]
    state.save(folder, paged=True)  # the next save clears what the crash left
    assert_same(state, State.load(folder, model))
    meta = json.loads((folder / "session.json").read_text())
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tttlm")) == sorted(
        [*meta["packs"], "session.json"])
    # A whole-state save over a paged one, and back, each leave only their own files.
    state.save(folder)
    assert json.loads((folder / "session.json").read_text())["version"] == 2
    assert len(packs(folder)) == 1
    state.save(folder, paged=True)
    assert_same(state, State.load(folder, model))


def test_page_hashes_name_dtype_shape_and_bytes() -> None:
    zeros = torch.zeros(8, dtype=torch.float32)
    assert pages.page_key(zeros) != pages.page_key(torch.zeros(16, dtype=torch.bfloat16))
    assert pages.page_key(zeros) != pages.page_key(zeros.reshape(2, 4))
    assert pages.page_key(zeros) == pages.page_key(torch.zeros(8))
    bumped = zeros.clone()
    bumped[3] = 1e-30
    assert pages.page_key(zeros) != pages.page_key(bumped)
    assert pages.page_key(torch.zeros(0, 3)) != pages.page_key(torch.zeros(3, 0))


def test_link_or_copy_falls_back_to_a_copy(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"pack")

    def no_links(*args: object) -> None:
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    files.link_or_copy(src, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"pack"
    assert (tmp_path / "b.bin").stat().st_ino != src.stat().st_ino


def test_a_save_does_not_build_on_a_damaged_pack(tmp_path: Path) -> None:
    model, engine, x, state, folder = saved_after_9_tokens(tmp_path)
    (pack,) = packs(folder)
    (folder / pack).write_bytes((folder / pack).read_bytes()[:-8])  # cut on disk
    engine.step(state, x[:, 9])
    state.save(folder, paged=True)  # the pages of the cut pack are written again
    assert pack not in packs(folder)
    assert_same(state, State.load(folder, model))


def test_generate_continues_a_session_with_paged_saves(tmp_path: Path) -> None:
    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.cli import main

    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=64, chunk_size=32, hidden_size=32)
    model = TTTForCausalLM(config)
    folder = model.save_pretrained(tmp_path / "m")
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["generate", "--model", str(folder), "--max-new-tokens", "3", "--seed", "0"]
    assert main([*args, "--prompt", "Once upon a time", "--save-session", str(a)]) == 0
    first = packs(a)
    assert main([*args, "--prompt", " there", "--session", str(a), "--save-session",
                 str(a)]) == 0
    state = State.load(a, model)
    assert new_bytes(first, packs(a)) < state_bytes(state) / 2  # a few pages, not the state
    assert main([*args, "--prompt", " was", "--session", str(a), "--save-session",
                 str(b)]) == 0
    shared = set(packs(a)) & set(packs(b))  # b hard-links what it shares with a
    assert shared and all((a / n).stat().st_ino == (b / n).stat().st_ino for n in shared)
    assert State.load(b, model).lengths[0] > state.lengths[0]
