"""Training checkpoints, written atomically, and the run-folder layout.

A run folder holds::

    train_config.json           the resolved training config
    metrics.jsonl               one JSON object per logged step / evaluation
    checkpoints/step_00000100/  config.json + model.safetensors (a loadable model folder),
                                optimizer.pt, train_state.pt (step, scheduler, rank-0 RNG and
                                loader position), rank_00001.pt ... (other ranks' RNG/loader)
    final/                      config.json + model.safetensors of the last step

Every checkpoint is first written to a hidden temporary folder next to its final place and
renamed into place only when complete, so a crash (or Ctrl-C) mid-write never leaves a
half-written checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tttlm.config import TTTConfig
from tttlm.model.model import CONFIG_NAME, WEIGHTS_NAME

CHECKPOINTS = "checkpoints"
FINAL = "final"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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


def write_model_dir(directory: Path, state: dict[str, torch.Tensor], config: TTTConfig) -> None:
    """``config.json`` + ``model.safetensors`` as :meth:`TTTForCausalLM.save_pretrained`
    writes them; takes a state dict so that sharded (FSDP) models can pass a gathered one."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "tttlm_config": config.fingerprint()})
    (directory / CONFIG_NAME).write_text(config.to_json() + "\n")


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
    """The hidden folder a checkpoint is assembled in before :func:`commit_checkpoint`."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Create an empty staging folder (rank 0 only, before the other ranks write into it)."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-write: never complete, safe to drop
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, tmp / rank_file(rank))


def commit_checkpoint(run_dir: str | os.PathLike[str], step: int, keep: int) -> Path:
    """Rename the staging folder into place (rank 0, after every rank wrote), then delete all
    but the ``keep`` newest checkpoints."""
    tmp = staging_dir(run_dir, step)
    final = tmp.parent / step_dir_name(step)
    if final.exists():
        # Same step saved again (e.g. Ctrl-C right after a scheduled save): swap, then drop.
        trash = tmp.parent / f".old-{final.name}"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    path = checkpoint / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer "
                                "processes than this run has; resume with the same world size")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
