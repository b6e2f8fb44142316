"""Session files: a manifest written last names the tensor file by size and sha256, so that an
interrupted, mixed, cut or hand-edited session is refused in one line instead of continuing
from the wrong position; saves are durable, locked and never replace a foreign folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.files import FolderLock
from tttlm.inference import Engine, State
from tttlm.inference import state as state_module


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def prefilled(model: torch.nn.Module, n: int) -> State:
    return Engine(model).prefill(tokens(model, 1, 30)[0][:, :n])[1]


def tensor_file(folder: Path) -> Path:
    (path,) = folder.glob("session*.safetensors")
    return path


def test_interrupted_save_keeps_the_previous_session(model: torch.nn.Module, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "s"
    prefilled(model, 9).save(folder)
    newer = prefilled(model, 14)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # the process dies after the tensors, before the manifest

    monkeypatch.setattr(state_module, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        newer.save(folder)
    monkeypatch.undo()
    # The old manifest still names the old tensors (the new ones went to another name): the
    # previous session, whole, not the new tensors at the old position.
    assert State.load(folder, model).lengths == [9]
    newer.save(folder)  # the next save clears what the crash left
    assert State.load(folder, model).lengths == [14]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tttlm")) == [
        tensor_file(folder).name, "session.json"]


def test_mixed_cut_and_edited_sessions_are_refused(model: torch.nn.Module,
                                                   tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    prefilled(model, 9).save(a)
    prefilled(model, 14).save(b)
    # A torn save as the old format allowed: new tensors beside the old manifest.
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    tensor_file(mixed).write_bytes(tensor_file(b).read_bytes())
    with pytest.raises(UserError, match="is not the file session.json names"):
        State.load(mixed, model)
    for cut in (0, 100):  # empty, truncated
        shutil.rmtree(mixed)
        shutil.copytree(a, mixed)
        tensor_file(mixed).write_bytes(tensor_file(a).read_bytes()[:cut])
        with pytest.raises(UserError, match="cut or mixed"):
            State.load(mixed, model)
    # An edited manifest (its position moved within the chunk) disagrees with the tensors.
    meta = json.loads((a / "session.json").read_text())
    for key, value in [("lengths", [10]), ("skipped_updates", [3])]:
        (a / "session.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(UserError, match=f"does not match its tensor file \\({key}"):
            State.load(a, model)
    for edit in ({"lengths": [-1]}, {"lengths": "9"}, {"chunks_done": [1, 2]},
                 {"layers": {"fast": 3}}, {"tensors": {"file": "../x.safetensors"}},
                 {"weights_digest": 7}):
        (a / "session.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(UserError, match="session.json is damaged"):
            State.load(a, model)
    (a / "session.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        State.load(a, model)
    (a / "session.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(UserError, match="version-9"):
        State.load(a, model)


def test_damaged_session_on_the_command_line_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm import TTTConfig, TTTForCausalLM

    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", window=16, chunk_size=8, hidden_size=32)
    folder = TTTForCausalLM(config).save_pretrained(tmp_path / "m")
    session = tmp_path / "s"
    args = ["generate", "--model", str(folder), "--max-new-tokens", "2", "--seed", "0"]
    assert main([*args, "--prompt", "Hello", "--save-session", str(session)]) == 0
    meta = json.loads((session / "session.json").read_text())
    (session / "session.json").write_text(json.dumps({**meta, "lengths": [meta["lengths"][0]
                                                                          + 1]}))
    capsys.readouterr()
    assert main([*args, "--prompt", "x", "--session", str(session)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: session") and err.count("\n") == 1
    assert "does not match its tensor file" in err


def test_version_one_sessions_still_load(model: torch.nn.Module, tmp_path: Path) -> None:
    folder = tmp_path / "s"
    state = prefilled(model, 9)
    state.save(folder)
    meta = json.loads((folder / "session.json").read_text())
    del meta["tensors"], meta["skipped_updates"]
    tensor_file(folder).rename(folder / "session.safetensors")
    (folder / "session.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.warns(UserWarning, match="version-1 session"):
        loaded = State.load(folder, model)
    assert loaded.lengths == [9] and loaded.skipped_updates == [0]
    x = tokens(model, 1, 30)[0]
    engine = Engine(model)
    assert torch.equal(engine.step(loaded, x[:, 9])[0], engine.step(state, x[:, 9])[0])


def test_save_is_locked_durable_and_refuses_foreign_folders(
        model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = prefilled(model, 9)
    folder = tmp_path / "s"
    with FolderLock(folder, "generate --save-session"), pytest.raises(UserError,
                                                                       match="in use by"):
        state.save(folder)
    synced: list[str] = []
    from tttlm import files

    real_dir = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda p: (synced.append(os.fspath(p)),
                                                       real_dir(p))[1])
    monkeypatch.setattr(state_module, "fsync_dir", files.fsync_dir)
    old = os.umask(0o027)
    try:
        state.save(folder)
    finally:
        os.umask(old)
    assert os.fspath(folder) in synced
    for name in ("session.json", tensor_file(folder).name):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not part of a session"):
        state.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        state.save(tmp_path / "file")


def test_session_of_other_weights_is_taken_over_only_on_request(model: torch.nn.Module,
                                                                tmp_path: Path) -> None:
    prefilled(model, 9).save(tmp_path / "s")
    other = tiny_model(seed=1)
    with pytest.raises(UserError, match="other weights"):
        State.load(tmp_path / "s", other)
    taken = State.load(tmp_path / "s", other, check_weights=False)
    Engine(other).step(taken, [3])  # now it belongs to `other`
    with pytest.raises(UserError, match="other weights"):
        Engine(model).step(taken, [3])
