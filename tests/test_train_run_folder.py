"""A run folder has one owner and one run (issue #10, training items 1, 2, 4 and 9).

Each test reproduces what went wrong before (a second run into a finished run's folder, a
`--resume` with nothing to resume, two processes on one folder, a damaged newest checkpoint,
another model size on resume) and checks what happens now: a one-line refusal that names the
fix, and nothing of the old run lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import prepared_corpus
from test_train_trainer import losses, tiny_config
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.train import checkpoint as ckpt
from tttlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_corpus(tmp_path_factory)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A fast `tttlm train` command line: tiny full-attention model, 4 steps, checkpoints every
    2 steps."""
    return ["train", "--model", "tiny", "--mode", "full", "--data", str(data), "--out",
            str(out), "--steps", "4", "--seq-len", "64", "--batch-size", "4",
            "--set", "model.window=32", "--set", "model.chunk_size=16", "--set", "progress=false",
            "--set", "eval_every=0", "--set", "save_every=2", "--set", "log_every=1",
            "--set", "tensorboard=false", *extra]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tttlm train: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4, final/), copied by the tests."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(cli_args(data_dir, out)) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".tttlm.lock"}


# ------------------------------------------------------------------ item 1: a new run
def test_new_run_refuses_a_folder_holding_a_run(data_dir: Path, finished_run: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the new run deleted the old metrics.jsonl, kept its final/ and checkpoints, and
    rotation deleted each new checkpoint right after writing it (the old ones had higher
    steps); a later --resume loaded the old run's checkpoint. Now: refused, nothing touched."""
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    assert main(cli_args(data_dir, run, "--steps", "2", "--lr", "1e-3")) == 2
    line = error_line(capsys)
    assert line == (f"tttlm train: error: {run} holds a run (step 4, finished); use --resume, "
                    "or a new --out, or --overwrite to delete it")
    assert snapshot(run) == before


def test_new_run_refuses_a_run_without_checkpoint(data_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A run that stopped before its first checkpoint still has metrics worth keeping."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert main(cli_args(data_dir, run)) == 2
    assert error_line(capsys) == (f"tttlm train: error: {run} holds a run (no checkpoint, logged "
                                  "up to step 1); use a new --out, or --overwrite (or "
                                  "--resume=auto) to replace it")
    (tmp_path / "file").write_text("")
    assert main(cli_args(data_dir, tmp_path / "file")) == 2
    assert "is a file, not a folder" in error_line(capsys)


def test_overwrite_deletes_the_old_run_only(data_dir: Path, finished_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    old_final = load_file(str(run / "final" / "model.safetensors"))
    assert main(cli_args(data_dir, run, "--steps", "3", "--lr", "1e-3", "--overwrite")) == 0
    assert "deleting the run in" in capsys.readouterr().err
    # Only the new run's files: its checkpoints (rotation kept the new ones), metrics, final.
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    new_final = load_file(str(run / "final" / "model.safetensors"))
    assert not torch.equal(new_final["embed.weight"], old_final["embed.weight"])
    assert (run / "notes.txt").read_text() == "mine"  # not the run's: left alone
    assert json.loads((run / "train_config.json").read_text())["steps"] == 3


def test_overwrite_waits_until_the_new_run_checks_out(data_dir: Path, finished_run: Path,
                                                      tmp_path: Path) -> None:
    """A new run that fails to start (here: a vocabulary too small for the data) deletes
    nothing, --overwrite or not."""
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    assert main(cli_args(data_dir, run, "--overwrite", "--set", "model.vocab_size=100")) == 2
    assert snapshot(run) == before


# --------------------------------------------------------------- item 2: --resume
def test_resume_without_a_checkpoint_refuses(data_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --resume with no checkpoint (a typo in --out, or a run that stopped before its
    first save) started from scratch with exit 0 and deleted metrics.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert main(cli_args(data_dir, run, "--resume")) == 2
    line = error_line(capsys)
    assert line == (f"tttlm train: error: --resume: {run} has no checkpoint to resume from (it "
                    "holds no checkpoint, logged up to step 1); check --out, or use "
                    "--resume=auto to start a new run when there is none")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    # A typo: refused without creating the folder.
    assert main(cli_args(data_dir, tmp_path / "typo", "--resume")) == 2
    assert "has no checkpoint to resume from" in error_line(capsys)
    assert not (tmp_path / "typo").exists()


def test_resume_auto_starts_then_resumes(data_dir: Path, tmp_path: Path) -> None:
    """--resume=auto (for schedulers that requeue a job): a new run when there is no
    checkpoint, the newest checkpoint when there is one."""
    run = tmp_path / "run"
    assert main(cli_args(data_dir, run, "--resume=auto", "--stop-at", "2")) == 0
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert main(cli_args(data_dir, run, "--resume=auto")) == 0
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    assert (run / "final" / "model.safetensors").is_file()


def test_resume_checkpoint_path_still_works(data_dir: Path, finished_run: Path,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--resume CHECKPOINT: of another run into an empty --out (its config comes along), or
    an older checkpoint of this run (the later ones belong to a discarded future)."""
    branch = tmp_path / "branch"
    assert main(["train", "--out", str(branch), "--resume",
                 str(finished_run / "checkpoints" / "step_00000002")]) == 0
    assert [s for s, _ in losses(branch)] == [3, 4]
    assert load_file(str(branch / "final" / "model.safetensors")).keys()
    run = copy_run(finished_run, tmp_path)
    assert main(["train", "--out", str(run), "--resume",
                 str(run / "checkpoints" / "step_00000002"), "--stop-at", "3"]) == 0
    assert "deleting the later checkpoints (steps 4)" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    assert [s for s, _ in losses(run)] == [1, 2, 3]


# --------------------------------------------------------------- item 4: one owner
def test_two_trainers_cannot_share_a_run_folder(data_dir: Path, tmp_path: Path) -> None:
    """Before: a second `tttlm train` on the same --out ran side by side and replaced the
    first one's log, checkpoints and final model. Now the folder is locked for the run."""
    first = Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=2))
    for resume in (False, True, "auto"):
        with pytest.raises(UserError, match="belongs to another Trainer of this process; call "
                                            "its close()"):
            Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=2), resume=resume)
    first.train()  # gives the folder up when done
    second = Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=2), resume=True)
    assert second.step == 2
    second.close()


def test_a_second_process_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """The lock is an flock held by the training process: another process is refused."""
    import subprocess
    import sys

    holder = Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=2))
    try:
        proc = subprocess.run([sys.executable, "-m", "tttlm.cli", *cli_args(data_dir, tmp_path,
                                                                            "--resume=auto")],
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    assert proc.returncode == 2
    assert f"{tmp_path} is in use by `tttlm train` (pid {os.getpid()}" in proc.stderr


# ----------------------------------------------------- item 9: damaged checkpoints
@pytest.mark.parametrize("name", ["optimizer.pt", "train_state.pt", "model.safetensors"])
def test_damaged_newest_checkpoint_falls_back(name: str, data_dir: Path, finished_run: Path,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a truncated newest optimizer.pt was a traceback. Now --resume says which
    checkpoint it skips and why, moves it aside and resumes from the one before."""
    run = copy_run(finished_run, tmp_path)
    damaged = run / "checkpoints" / "step_00000004" / name
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert main(cli_args(data_dir, run, "--resume", "--stop-at", "3")) == 0
    err = capsys.readouterr().err
    assert (f"skipping checkpoint {run / 'checkpoints' / 'step_00000004'}: {name} is missing, "
            "truncated or unreadable") in err
    assert "moved the damaged checkpoint aside" in err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    assert (run / "checkpoints" / ".corrupt-step_00000004" / name).is_file()
    # The run continued from step 2 exactly as before: same step-3 loss.
    assert losses(run)[2] == losses(finished_run)[2]


def test_no_good_checkpoint_is_an_error(data_dir: Path, finished_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path)
    for _, path in ckpt.list_checkpoints(run):
        (path / "optimizer.pt").write_bytes(b"")
    before = snapshot(run)
    assert main(cli_args(data_dir, run, "--resume")) == 2
    line = error_line(capsys)
    assert line.startswith(f"tttlm train: error: --resume: no checkpoint of {run} can be loaded "
                           "(step_00000004: optimizer.pt is missing, truncated or unreadable")
    assert line.endswith("restore one, or start a new run")
    assert snapshot(run) == before
    # Named explicitly: no fallback, one line.
    step2 = run / "checkpoints" / "step_00000002"
    assert main(cli_args(data_dir, run, "--resume", str(step2))) == 2
    assert error_line(capsys).startswith(f"tttlm train: error: --resume {step2}: optimizer.pt is")


# --------------------------------------------------- item 9: another model on resume
@pytest.mark.parametrize("extra, differs", [
    (["--model", "125m"], "hidden_size=64 (this config: 768), num_layers=4 (this config: 12)"),
    (["--set", "model.hidden_size=32"], "hidden_size=64 (this config: 32)"),
    (["--mode", "e2e"], "variant=full (this config: e2e)"),
])
def test_resume_with_another_model_size_is_refused(extra: list[str], differs: str,
                                                   finished_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a traceback from load_state_dict (or, for --model, silently the old size)."""
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", *extra]) == 2
    line = error_line(capsys)
    assert "the checkpoint holds another model than this config asks for: " in line
    assert differs in line and "start a new run with another --out" in line
    assert snapshot(run) == before


# ------------------------------------------------ item 9: folders we cannot write
@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system")])
def test_unwritable_out_is_one_line(code: int, words: str, data_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a traceback. (Simulated: the tests may run as root, whom chmod does not stop.)"""
    real_open = os.open

    def refusing_open(path: str | os.PathLike[str], *args: object, **kwargs: object) -> int:
        if os.fspath(path).endswith(".tttlm.lock"):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    run = tmp_path / "run"
    assert main(cli_args(data_dir, run)) == 2
    line = error_line(capsys)
    assert line.startswith(f"tttlm train: error: {words}: {run / '.tttlm.lock'}; ")
    assert line.endswith("choose a folder you can write to")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_permission_denied_out_is_one_line(data_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(cli_args(data_dir, locked / "run")) == 2
    finally:
        locked.chmod(0o755)
    assert "permission denied" in error_line(capsys)
