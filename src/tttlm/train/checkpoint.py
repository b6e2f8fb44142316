"""Training checkpoints, written durably, and the run-folder layout.

A run folder holds::

    .tttlm.lock                 the owner while a run trains (tttlm.files.FolderLock)
    train_config.json           the resolved training config
    metrics.jsonl               one JSON object per logged step / evaluation
    checkpoints/step_00000100/  config.json + model.safetensors (a loadable model folder),
                                optimizer.pt, train_state.pt (step, scheduler, rank-0 RNG and
                                loader position), rank_00001.pt ... (other ranks' RNG/loader)
    final/                      config.json + model.safetensors of the last step
    tensorboard/                TensorBoard events (when enabled)

Every checkpoint (and ``final/``) is first written to a hidden staging folder next to its final
place, flushed to disk (files, then folders), and renamed into place only when complete
(:func:`tttlm.files.commit_dir`), so a crash, a kill or a power loss mid-write never leaves a
half-written checkpoint that ``--resume`` would pick up. Should one be damaged anyway (a copy
cut short, a bad disk), :func:`check_checkpoint` finds out before it is loaded and ``--resume``
falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from tttlm import files
from tttlm.config import TTTConfig
from tttlm.model.model import CONFIG_NAME, WEIGHTS_NAME, save_model_folder

CHECKPOINTS = "checkpoints"
FINAL = "final"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
TENSORBOARD_DIR = "tensorboard"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """A folder holding weights: a model folder itself, or a run's ``final/`` or its latest
    checkpoint (for ``--init-from RUN_OR_DIR``)."""
    p = Path(path)
    if is_model_dir(p):
        return p
    if is_model_dir(p / FINAL):
        return p / FINAL
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    raise FileNotFoundError(
        f"{p} holds no model: expected config.json + model.safetensors, a run folder with "
        f"{FINAL}/ or {CHECKPOINTS}/step_*/")


# ------------------------------------------------------------------------------ writing
def _os_error(err: BaseException, path: Path) -> OSError | None:
    """The ``OSError`` behind a failed write: torch's zip writer turns it into a
    ``RuntimeError("unexpected pos ...")`` with the ``OSError`` as its context, safetensors
    into text ending in ``(os error 28)``."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return cause
        cause = cause.__cause__ or cause.__context__
    match = _OS_ERROR_IN_TEXT.search(str(err))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


def _guarded_write(path: Path, write: Callable[[], None]) -> None:
    """Run ``write``; a failure caused by the disk (full, size limit, permission) is raised as
    an ``OSError`` naming ``path``, whatever wrapped it."""
    try:
        write()
    except Exception as err:
        found = _os_error(err, path)
        if found is None:
            raise
        if found is err and err.filename is not None:
            raise
        raise OSError(found.errno, found.strerror or os.strerror(found.errno or 0),
                      str(path)) from err


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as an ``OSError``."""
    def write() -> None:
        with open(path, "wb") as f:
            torch.save(obj, f)

    _guarded_write(path, write)


def write_model_dir(directory: Path, state: dict[str, torch.Tensor], config: TTTConfig) -> None:
    """A model folder (:func:`tttlm.model.model.save_model_folder`, the writer of
    ``save_pretrained``) in ``directory`` (a staging folder: :func:`commit_checkpoint` and
    :func:`commit_final` move it into place); takes a state dict so that sharded (FSDP) models
    can pass a gathered one. A failure caused by the disk names the weights file."""
    _guarded_write(directory / WEIGHTS_NAME, lambda: save_model_folder(directory, state, config))


# ---------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values so that
    the file loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load
def rank_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"rank_{rank:05d}.pt"


def staging_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The hidden folder a checkpoint is assembled in before :func:`commit_checkpoint` (one
    fixed name, so that every rank of a job writes into the same one)."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Create an empty staging folder (rank 0 only, before the other ranks write into it)."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-write: never complete, safe to drop
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    save_torch(state, tmp / rank_file(rank))


def abort_checkpoint(run_dir: str | os.PathLike[str], step: int) -> None:
    """Drop the staging folder of a checkpoint that could not be written (frees the space)."""
    shutil.rmtree(staging_dir(run_dir, step), ignore_errors=True)


def commit_checkpoint(run_dir: str | os.PathLike[str], step: int, keep: int) -> Path:
    """Flush the staging folder and rename it into place (rank 0, after every rank wrote),
    then delete all but the ``keep`` newest checkpoints — never the one just written."""
    tmp = staging_dir(run_dir, step)
    final = tmp.parent / step_dir_name(step)
    # An existing folder of the same step (Ctrl-C right after a scheduled save) is swapped out
    # and deleted only once the new one is in place.
    files.commit_dir(tmp, final)
    older = [path for s, path in list_checkpoints(run_dir) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        discard_checkpoint(old)
    return final


def discard_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no moment shows part of it: renamed out of sight first
    (one atomic step), then removed file by file. A kill while removing leaves a ``.del-``
    folder, which :func:`recover_run_folder` drops, never a listed checkpoint that lacks a
    file."""
    trash = path.parent / f".del-{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    files.fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def commit_final(run_dir: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write ``final/`` through a staging folder: ``write(folder)`` fills it, then it is flushed
    and swapped in for the previous ``final/``."""
    final = Path(run_dir) / FINAL
    tmp = files.staging_dir(final)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files.commit_dir(tmp, final)


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    path = checkpoint / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer "
                                "processes than this run has; resume with the same world size")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------ verification
def _check_zip(path: Path) -> None:
    """``torch.save`` files are zip archives whose index sits at the end: a truncated file has
    none, and every member must lie inside the file."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.header_offset + info.compress_size > size:
                raise ValueError(f"{info.filename} runs past the end of the file")


def check_checkpoint(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (a missing, truncated or
    unreadable file), or ``None`` when it looks whole. Reads the index of every file and the
    small ``train_state.pt`` in full; the weights and optimizer state are read by the load."""
    def bad(name: str, err: BaseException | str) -> str:
        return f"{name} is missing, truncated or unreadable ({err})"

    for name in (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_FILE, STATE_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        TTTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (OSError, ValueError, TypeError) as err:
        return bad(CONFIG_NAME, err)
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt"):
            pass
    except Exception as err:  # SafetensorError for a truncated file
        return bad(WEIGHTS_NAME, err)
    try:
        _check_zip(path / OPTIMIZER_FILE)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return bad(OPTIMIZER_FILE, err)
    try:
        state = load_rank_state(path, 0)
        world = int(state.get("world_size", 1))
        int(state["step"])
    except Exception as err:
        return bad(STATE_FILE, err)
    for rank in range(1, world):
        try:
            _check_zip(path / rank_file(rank))
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            return bad(rank_file(rank), err)
    return None


# ---------------------------------------------------------------------------- run folder
def recover_run_folder(run_dir: str | os.PathLike[str]) -> None:
    """Tidy up after a crash (call with the run's lock held): put back a checkpoint or
    ``final/`` a crash left under its ``.old-`` name mid-swap, and drop staging folders."""
    run = Path(run_dir)
    root = run / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".old-step_*"):
            files.recover_dir(root / path.name[len(".old-"):])
        for path in [*root.glob(".tmp-step_*"), *root.glob(".del-step_*")]:
            shutil.rmtree(path, ignore_errors=True)
    files.recover_dir(run / FINAL)
    files.remove_stale_staging(run, FINAL)
    legacy = run / f".tmp-{FINAL}"  # the staging name of earlier versions
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)


def run_contents(run_dir: str | os.PathLike[str]) -> list[Path]:
    """What a training run wrote into its folder (other files are left alone)."""
    run = Path(run_dir)
    names = (TRAIN_CONFIG_FILE, METRICS_FILE, CHECKPOINTS, FINAL, TENSORBOARD_DIR)
    found = [run / name for name in names if (run / name).exists()]
    if (run / CHECKPOINTS).is_dir() and not any((run / CHECKPOINTS).iterdir()):
        found.remove(run / CHECKPOINTS)  # an empty folder is no run
    return found


def last_logged_step(run_dir: str | os.PathLike[str]) -> int | None:
    """The step of the last readable line of ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    step = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return step


def describe_run(run_dir: str | os.PathLike[str]) -> str | None:
    """``"step N"`` (or what else shows a run) when ``run_dir`` holds a run, else ``None``."""
    contents = run_contents(run_dir)
    if not contents:
        return None
    found = list_checkpoints(run_dir)
    finished = (Path(run_dir) / FINAL).is_dir()
    if found:
        what = f"step {found[-1][0]}"
    else:
        logged = last_logged_step(run_dir)
        what = f"no checkpoint, logged up to step {logged}" if logged else "no checkpoint"
    return f"{what}, finished" if finished else what


def remove_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what a run wrote into ``run_dir`` (call with its lock held)."""
    removed = run_contents(run_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    files.fsync_dir(run_dir)
    return removed
