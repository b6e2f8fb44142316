"""Finding lm-eval tasks for a run on a tttlm model.

lm-eval raises a ``KeyError`` deep inside its task loader for a name it does not know; the
names are checked here first, so that a typo is one line that says what to type instead.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from tttlm.errors import UserError


def task_manager(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                 | None = None, metadata: dict[str, Any] | None = None) -> TaskManager:
    """lm-eval's task index: its own tasks plus the YAML tasks under ``include_path``.
    ``metadata`` reaches every task (RULER reads ``pretrained``/``tokenizer`` and
    ``max_seq_lengths`` from it)."""
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"task folder not found: {os.fspath(path)}; give a folder of "
                            "lm-eval task YAML files")
    return TaskManager(include_path=[os.fspath(p) for p in paths] or None,
                       metadata=metadata)


def check_tasks(manager: TaskManager, names: Sequence[str]) -> None:
    """Raise :class:`UserError` for a name that is neither a task, group or tag lm-eval knows
    nor a task YAML file."""
    if not names:
        raise UserError("no tasks given; name at least one, e.g. --tasks niah_single_1")
    known = set(manager.all_tasks)
    for name in names:
        if name in known or Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown lm-eval task {name!r}; {hint}list the tasks with "
                        "`lm-eval ls tasks`, or add a folder of task YAML files with "
                        "--include-path")

