"""Model folders: the weights file records its config, so that an edited or copied config.json,
a damaged weights file or a mixed save is refused in one line instead of changing results;
writes are durable and respect the umask; the Hugging Face ``labels=input_ids`` habit warns."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _helpers import tiny_model, tokens
from tttlm import TTTForCausalLM
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.model import model as model_module


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[TTTForCausalLM, Path]:
    model = tiny_model()
    return model, model.save_pretrained(tmp_path / "m")


def edit_config(folder: Path, **fields: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("field, value", [("window", 16), ("chunk_size", 6),
                                          ("rope_theta", 500000.0), ("inner_lr", 0.5)])
def test_edited_config_is_refused_naming_both_values(saved: tuple[TTTForCausalLM, Path],
                                                     field: str, value: object) -> None:
    model, folder = saved
    before = model.config.to_dict()[field]
    edit_config(folder, **{field: value})
    # What loading used to do: the same weights under the edited config compute another
    # function, silently.
    config = type(model.config).from_dict(json.loads((folder / "config.json").read_text()))
    silent = TTTForCausalLM(config).double()
    silent.load_state_dict(load_file(str(folder / "model.safetensors")))
    x, y = tokens(model, 1, 30)
    with torch.no_grad():
        assert not torch.equal(silent(x, y).token_nll, model(x, y).token_nll)
    with pytest.raises(UserError) as err:
        TTTForCausalLM.from_pretrained(folder)
    message = str(err.value)
    assert "does not match its config" in message and "restore config.json" in message
    assert f"{field}={json.dumps(value)} (saved with {json.dumps(before)})" in message
    assert "\n" not in message


def test_config_from_another_model_is_refused(tmp_path: Path) -> None:
    a = tiny_model().save_pretrained(tmp_path / "a")
    tiny_model(inner_clip=0.5).save_pretrained(tmp_path / "b")
    (a / "config.json").write_bytes((tmp_path / "b" / "config.json").read_bytes())
    with pytest.raises(UserError, match=r"inner_clip=0.5 \(saved with 1.0\)"):
        TTTForCausalLM.from_pretrained(a)


def test_non_finite_config_is_refused(saved: tuple[TTTForCausalLM, Path]) -> None:
    _, folder = saved
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"rope_theta": 10000.0',
                                                     '"rope_theta": NaN'))
    with pytest.raises(UserError, match="rope_theta"):
        TTTForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a config object"):
        TTTForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        TTTForCausalLM.from_pretrained(folder)


def test_fingerprint_only_and_unrecorded_weights(saved: tuple[TTTForCausalLM, Path]) -> None:
    model, folder = saved
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    # The trainer's checkpoints record only the fingerprint: a mismatch names both.
    save_file(state, str(weights), metadata={"format": "pt",
                                             "tttlm_config": model.config.fingerprint()})
    TTTForCausalLM.from_pretrained(folder)
    edit_config(folder, inner_lr=0.5)
    with pytest.raises(UserError, match=f"fingerprint {model.config.fingerprint()}"):
        TTTForCausalLM.from_pretrained(folder)
    # Files that record nothing (older or other tools) load, with one warning per file.
    save_file(state, str(weights), metadata={"format": "pt"})
    model_module._warned_unrecorded.discard(str(weights.resolve()))
    with pytest.warns(UserWarning, match="does not record the config"):
        loaded = TTTForCausalLM.from_pretrained(folder)
    assert loaded.config.inner_lr == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTTForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("cut", [0, 7, -100])
def test_damaged_weights_file_is_one_line(saved: tuple[TTTForCausalLM, Path], cut: int,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])  # empty, a cut header, a cut body
    with pytest.raises(UserError, match="truncated or damaged"):
        TTTForCausalLM.from_pretrained(folder)
    assert main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm generate: error: ") and "truncated" in err
    assert err.count("\n") == 1


def test_save_is_durable_and_respects_the_umask(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    from tttlm import files

    real_file, real_dir = files.fsync_file, files.fsync_dir
    monkeypatch.setattr(files, "fsync_file", lambda p: (synced.append(os.fspath(p)),
                                                        real_file(p))[1])
    monkeypatch.setattr(files, "fsync_dir", lambda p: (synced.append(os.fspath(p)),
                                                       real_dir(p))[1])
    old = os.umask(0o027)
    try:
        folder = tiny_model().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name  # mkstemp gave 0600
    assert os.fspath(folder) in synced  # the renames reached the disk
    assert any("model.safetensors" in p for p in synced)  # and the data before them


def test_labels_equal_to_input_ids_warn_once() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, labels=y)  # shifted labels: silent
        constant = torch.full_like(x, 5)
        model(constant, labels=constant)  # shifted labels of a constant text equal it
    with pytest.warns(UserWarning, match="already shifted"):
        model(x, labels=x.clone())  # the Hugging Face habit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, labels=x)  # once per model


def test_empty_batches_are_value_errors() -> None:
    model = tiny_model()
    for shape in ((0, 5), (2, 0)):
        ids = torch.zeros(shape, dtype=torch.long)
        with pytest.raises(ValueError, match="at least one sequence of at least one token"):
            model(ids, labels=ids)
