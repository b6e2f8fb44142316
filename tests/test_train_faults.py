"""Training under faults (issue #10, training items 3, 9, 10 and 15): non-finite steps, a full
disk during a checkpoint, durable writes, devices that are not there, TensorBoard that is not
installed, progress in logs, and kill -9 at random moments (resume stays bit-identical).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import prepared_corpus
from test_train_trainer import losses, tiny_config
from tttlm.cli import main
from tttlm.devices import resolve_device
from tttlm.errors import UserError
from tttlm.model import model as model_module
from tttlm.train import checkpoint as ckpt
from tttlm.train import trainer as trainer_module
from tttlm.train.config import resolve_config
from tttlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_corpus(tmp_path_factory)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tttlm train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def fast_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny", "--mode", "full", "--data", str(data), "--out",
            str(out), "--steps", "4", "--seq-len", "64", "--batch-size", "4",
            "--set", "model.window=32", "--set", "model.chunk_size=16", "--set", "progress=false",
            "--set", "eval_every=0", "--set", "save_every=2", "--set", "log_every=1",
            "--set", "tensorboard=false", *extra]


# ---------------------------------------------------------------- item 3: NaN and infinity
@pytest.mark.parametrize("setting, message", [
    ("inner_lr=1e30", r"inner_lr=1e\+30 is too large: at most 1000"),
    ("model.inner_lr=nan", "model.inner_lr=nan must be a finite number"),
    ("model.rope_theta=nan", "model.rope_theta=nan must be a finite number"),
    ("grad_clip=nan", "grad_clip=nan must be a finite number"),
])
def test_nonfinite_settings_are_refused(setting: str, message: str, data_dir: Path,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: all four were accepted and gave a NaN loss at every step, exit 0, and an
    all-NaN final/. Now: refused before anything is written."""
    import re

    run = tmp_path / "run"
    assert main(fast_args(data_dir, run, "--set", setting)) == 2
    assert re.search(message, error_line(capsys))
    assert not run.exists()


def test_nonfinite_steps_are_skipped_then_the_run_stops(data_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """A run that goes NaN midway (η = 1e30 from step 3, past validation): before, it kept
    going and rotation deleted every finite checkpoint. Now the NaN steps are skipped
    (logged, no update) and after max_nonfinite_steps in a row the run stops, naming the last
    good checkpoint, which is still there."""
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, run, steps=8, save_every=1, keep_checkpoints=2,
                                  eval_every=0, max_nonfinite_steps=3))
    trainer.train(until=2)
    good = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.model_config.inner_lr = 1e30  # what validation now refuses, to test the guard
    with pytest.raises(UserError) as caught:
        trainer.train()
    assert str(caught.value).startswith(
        "training stopped: the loss or gradient norm was not finite at 3 steps in a row "
        "(steps 3-5, ")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002'} (step 2)" \
        in str(caught.value)
    err = capsys.readouterr().err
    assert "step 3: non-finite loss and grad_norm: update skipped (1 in a row" in err
    logged = records(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    for r in logged[2:]:
        assert r["skipped"] is True and r["loss"] is None and r["nonfinite"] == ["loss",
                                                                                 "grad_norm"]
    # No update at the skipped steps; no checkpoint after them; the finite ones are kept.
    for name, value in trainer.module.state_dict().items():
        assert torch.equal(value, good[name]), name
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 2]
    weights = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run / "final").exists()


def test_an_occasional_nonfinite_step_is_skipped(data_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss at step 3 and an infinite gradient at step 5: both skipped (no optimizer
    step; the schedule and the data move on), no checkpoint at those steps, and the run
    finishes."""
    real = trainer_module.forward_backward
    trainer: Trainer | None = None

    def faulty(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        result = real(model, *args, **kwargs)  # type: ignore[arg-type]
        assert trainer is not None
        if trainer.step + 1 == 3:
            result.loss = math.nan
        if trainer.step + 1 == 5:
            next(model.parameters()).grad[0, 0] = math.inf
        return result

    monkeypatch.setattr(trainer_module, "forward_backward", faulty)
    trainer = Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=6, save_every=1,
                                  keep_checkpoints=10, eval_every=0))
    updates: list[int] = []
    trainer.optimizer.register_step_post_hook(lambda *_: updates.append(trainer.step))
    summary = trainer.train()
    assert summary["step"] == 6 and math.isfinite(summary["loss"])
    assert updates == [0, 1, 3, 5]  # 0-based steps that updated: not 2 and 4
    assert trainer.scheduler.last_epoch == 6
    skipped = {r["step"]: r["nonfinite"] for r in records(tmp_path) if r.get("skipped")}
    assert skipped == {3: ["loss"], 5: ["grad_norm"]}
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 4, 6]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_nonfinite_weights_are_never_saved(data_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=4, save_every=1))
    trainer.train(until=1)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = math.nan
    with pytest.raises(UserError, match=r"the weights are not finite \(NaN or infinity\) at "
                                        r"step 1: the checkpoint of step 1 not saved; the last "
                                        r"good checkpoint is .*step_00000001 \(step 1\)"):
        trainer.save_checkpoint()
    with pytest.raises(UserError, match="the final model not saved"):
        trainer.save_final()


# ------------------------------------------------------- item 9: full disk, size limit
def _fail_at_step_4(monkeypatch: pytest.MonkeyPatch, name: str, fail: object) -> None:
    # The weights go through the model folder writer (tttlm.model.model.save_model_folder),
    # which has safetensors fill a temporary file (".model.safetensors.tmp-...") first.
    module = ckpt if name == "optimizer.pt" else model_module
    attr = "save_torch" if name == "optimizer.pt" else "save_file"
    real = getattr(module, attr)

    def wrapped(*args: object, **kwargs: object) -> None:
        path = Path(str(args[1]))
        ours = path.name == name or path.name.startswith(f".{name}.tmp-")
        if ours and "step_00000004" in str(path):
            fail(real, *args, **kwargs)  # type: ignore[operator]
        else:
            real(*args, **kwargs)  # type: ignore[operator]

    monkeypatch.setattr(module, attr, wrapped)


def test_file_size_limit_during_a_checkpoint(data_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A real RLIMIT_FSIZE while optimizer.pt of step 4 is written. Before: a cryptic
    `unexpected pos` RuntimeError. Now one line: what happened and which checkpoint was kept;
    nothing half-written stays, and --resume goes on once the limit is gone."""
    def limited(real: object, *args: object, **kwargs: object) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # Python ignores SIGXFSZ (the write fails with EFBIG instead of killing the process).
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            real(*args, **kwargs)  # type: ignore[operator]
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    _fail_at_step_4(monkeypatch, "optimizer.pt", limited)
    run = tmp_path / "run"
    assert main(fast_args(data_dir, run)) == 2
    line = error_line(capsys)
    kept = run / "checkpoints" / "step_00000002"
    assert line.startswith("tttlm train: error: could not write the checkpoint of step 4: file "
                           "size limit reached")
    assert str(run / "checkpoints" / ".tmp-step_00000004" / "optimizer.pt") in line
    assert f"the checkpoint of step 2 ({kept}) is intact" in line
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert ckpt.check_checkpoint(kept) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the staging folder is gone
    monkeypatch.undo()
    assert main(fast_args(data_dir, run, "--resume")) == 0
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]


def test_no_space_left_during_a_checkpoint(data_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC inside safetensors (which reports it as text) is worded the same way."""
    from safetensors import SafetensorError

    def full(real: object, *args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    _fail_at_step_4(monkeypatch, "model.safetensors", full)
    run = tmp_path / "run"
    assert main(fast_args(data_dir, run)) == 2
    line = error_line(capsys)
    assert line.startswith("tttlm train: error: could not write the checkpoint of step 4: no "
                           "space left on device")
    assert str(run / "checkpoints" / ".tmp-step_00000004" / "model.safetensors") in line
    assert "the checkpoint of step 2 (" in line
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_os_errors_are_found_behind_wrappers(tmp_path: Path) -> None:
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    err.__context__ = OSError(errno.EFBIG, "File too large")
    assert ckpt._os_error(err, tmp_path).errno == errno.EFBIG
    assert ckpt._os_error(RuntimeError("(os error 28)"), tmp_path).errno == errno.ENOSPC
    assert ckpt._os_error(RuntimeError("shape mismatch"), tmp_path) is None


# -------------------------------------------------------------- item 10: durable writes
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_checkpoints_are_flushed_before_they_are_renamed(data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Before: checkpoints and final/ were renamed into place but never fsynced, so a power
    loss could leave a complete-looking folder of empty files. Now every file is flushed while
    still in its staging folder, then the folders holding the renamed entries."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    run = tmp_path / "run"
    Trainer(tiny_config(data_dir, run, mode="full", steps=2, save_every=1,
                        eval_every=0)).train()
    staged = str(run / "checkpoints" / ".tmp-step_00000001")
    for name in ("model.safetensors", "config.json", "optimizer.pt", "train_state.pt"):
        assert f"{staged}/{name}" in synced, name
    assert str(run / "checkpoints") in synced  # the rename itself
    final_files = [p for p in synced if "/.tmp-final-" in p]
    assert any(p.endswith("/model.safetensors") for p in final_files)
    assert str(run) in synced  # final/ renamed into the run folder
    assert any(Path(p).name.startswith(".train_config.json.tmp-") for p in synced)


# ------------------------------------------------------------------ item 9: devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_cuda_is_one_line(data_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: an AssertionError traceback from torch.cuda."""
    assert main(fast_args(data_dir, tmp_path / "run", "--set", "device=cuda")) == 2
    line = error_line(capsys)
    assert line.startswith("tttlm train: error: device=cuda but ")
    assert line.endswith("use device=cpu or auto") or "install a CUDA build" in line


def test_device_names(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(fast_args(data_dir, tmp_path / "run", "--device", "bogus")) == 2
    assert error_line(capsys) == ("tttlm train: error: device='bogus' is not known; use auto, "
                                  "cpu, cuda or cuda:N")
    with pytest.raises(UserError, match="is not known"):
        resolve_device("cpu:1")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match=r"device=cuda:1 but no GPU is visible "
                                        r"\(CUDA_VISIBLE_DEVICES=''\); use device=cpu or auto"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


# --------------------------------------------------- item 15: tensorboard, progress bars
def test_missing_tensorboard_is_said_once(data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before: tensorboard=true (the default) silently did nothing when the package was
    missing. Now the default is auto (on when installed, quiet otherwise) and true says once
    that it is missing."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(trainer_module, "_TENSORBOARD_NOTE_SHOWN", False)
    note = ("tttlm train: tensorboard not installed (pip install tttlm[tensorboard]); metrics "
            "go to metrics.jsonl only")
    Trainer(tiny_config(data_dir, tmp_path / "auto", mode="full", steps=1, save_every=0,
                        eval_every=0, tensorboard="auto")).train()
    assert note not in capsys.readouterr().err
    for name in ("a", "b"):
        Trainer(tiny_config(data_dir, tmp_path / name, mode="full", steps=1, save_every=0,
                            eval_every=0, tensorboard=True)).train()
    assert capsys.readouterr().err.count(note) == 1
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_progress_in_a_log_is_plain_lines(data_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before: tqdm's carriage-return frames flooded logs. Now a plain line now and then."""
    Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=3, save_every=0, eval_every=0,
                        progress=True)).train()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 1 <= len([line for line in err.splitlines() if "step" in line]) <= 3


def test_torn_metrics_line_is_dropped_on_resume(data_dir: Path, tmp_path: Path) -> None:
    """A kill mid-line leaves half a JSON object at the end of metrics.jsonl; resume drops it
    instead of failing on it."""
    Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=4, save_every=2)).train(until=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    Trainer(tiny_config(data_dir, tmp_path, mode="full", steps=4, save_every=2),
            resume=True).train()
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]


# ---------------------------------------------------- kill -9 at random moments
DRIVER = textwrap.dedent('''
    """`tttlm train` with an optional pause inside a checkpoint write, to be killed there."""
    import os
    import sys
    import time
    from pathlib import Path

    from tttlm import files
    from tttlm.train import checkpoint as ckpt

    pause, marker = os.environ.get("PAUSE", ""), Path(os.environ["MARKER"])

    def hold(where):
        marker.write_text(str(where))
        time.sleep(120)

    if pause == "staging":  # model and optimizer written, train_state.pt not yet
        real_state = ckpt.write_rank_state

        def write_rank_state(tmp, rank, state):
            hold(tmp)
            real_state(tmp, rank, state)

        ckpt.write_rank_state = write_rank_state
    elif pause == "commit":  # staging folder complete, not yet renamed into place
        real_commit = files.commit_dir

        def commit_dir(tmp, final):
            if final.parent.name == "checkpoints":
                hold(final)
            return real_commit(tmp, final)

        files.commit_dir = commit_dir

    from tttlm.cli import main

    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bit_identically(data_dir: Path,
                                                          tmp_path: Path) -> None:
    """SIGKILL a `tttlm train --resume=auto` five times (twice inside a checkpoint write:
    staging half written, staging complete but not renamed; three times at random moments),
    rerun it each time, and finish with the losses and weights of an uninterrupted run."""
    steps = 24
    flags = {"mode": "full", "data": str(data_dir), "steps": steps, "seq_len": 64,
             "batch_size": 4}
    sets = ["model.window=32", "model.chunk_size=16", "progress=false", "eval_every=0",
            "save_every=2", "keep_checkpoints=2", "log_every=1", "tensorboard=false",
            "num_threads=1", "lr=1e-3"]
    reference = tmp_path / "reference"
    Trainer(resolve_config(None, None, {**flags, "out_dir": str(reference)}, sets)).train()

    run = tmp_path / "run"
    argv = ["train", "--resume=auto", "--out", str(run)]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for item in sets:
        argv += ["--set", item]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(0)

    def newest() -> int:
        found = ckpt.list_checkpoints(run)
        return found[-1][0] if found else 0

    def launch(pause: str) -> subprocess.Popen[bytes]:
        marker = tmp_path / f"marker-{time.monotonic_ns()}"
        log = (tmp_path / "log.txt").open("ab")
        proc = subprocess.Popen([sys.executable, str(driver), *argv], stdout=log, stderr=log,
                                env={**env, "PAUSE": pause, "MARKER": str(marker)})
        proc.marker = marker  # type: ignore[attr-defined]
        return proc

    def wait_for(proc: subprocess.Popen[bytes], ready: object) -> None:
        deadline = time.monotonic() + 180
        while not ready():  # type: ignore[operator]
            log = (tmp_path / "log.txt").read_text(errors="replace")
            assert proc.poll() is None, f"the run ended before it was killed:\n{log}"
            assert time.monotonic() < deadline, f"no progress:\n{log}"
            time.sleep(0.02)

    kills = ["staging", "random", "commit", "random", "random"]
    for pause in kills:
        start = newest()
        proc = launch(pause if pause != "random" else "")
        if pause == "random":
            # Let it save one more checkpoint (progress), then kill it anywhere.
            wait_for(proc, lambda: newest() > start)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            wait_for(proc, proc.marker.exists)  # type: ignore[attr-defined]
        assert proc.poll() is None, "finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever the moment, every visible checkpoint is whole.
        for _, path in ckpt.list_checkpoints(run):
            assert ckpt.check_checkpoint(path) is None, path

    final = launch("")
    assert final.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text(errors="replace")
    assert losses(run) == losses(reference)
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_discarding_an_old_checkpoint_never_shows_half_of_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning old checkpoints killed midway (found by the kill -9 test above: a listed
    checkpoint without its model file) leaves nothing listed that is not whole."""
    old = tmp_path / ckpt.CHECKPOINTS / "step_00000002"
    old.mkdir(parents=True)
    (old / ckpt.STATE_FILE).write_text("{}")
    (old / "model.safetensors").write_bytes(b"weights")

    def killed(path: object, ignore_errors: bool = False) -> None:
        (Path(str(path)) / "model.safetensors").unlink()  # one file gone, then the kill
        raise SystemExit("killed")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        ckpt.discard_checkpoint(old)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.recover_run_folder(tmp_path)
    assert not any((tmp_path / ckpt.CHECKPOINTS).iterdir())
