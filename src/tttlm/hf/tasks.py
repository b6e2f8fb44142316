"""Finding lm-eval tasks for a run on a tttlm model, and keeping a run offline when asked.

lm-eval raises a ``KeyError`` deep inside its task loader for a name it does not know; the
names are checked here first, so that a typo is one line that says what to type instead.

Offline mode (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``) keeps the Hub and datasets
off the network, but not NLTK: lm-eval's RULER module asks NLTK to download ``punkt_tab``
when it is imported, for every RULER task, although only the essay-haystack tasks split
sentences. :func:`offline_nltk` refuses that download while offline. The tasks that make
their own haystacks never use it; an essay task fails on its dataset download first (and
would otherwise fail with NLTK's own "Resource punkt_tab not found").
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from tttlm.errors import UserError

log = logging.getLogger(__name__)


def task_manager(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                 | None = None, metadata: dict[str, Any] | None = None,
                 include_defaults: bool = True) -> TaskManager:
    """lm-eval's task index: its own tasks (unless ``include_defaults`` is false: indexing
    them reads some 13,000 YAML files, seconds) plus the YAML tasks under ``include_path``.
    ``metadata`` reaches every task (RULER reads ``pretrained``/``tokenizer`` and
    ``max_seq_lengths`` from it)."""
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"task folder not found: {os.fspath(path)}; give a folder of "
                            "lm-eval task YAML files")
    return TaskManager(include_path=[os.fspath(p) for p in paths] or None,
                       include_defaults=include_defaults, metadata=metadata)


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


def offline() -> bool:
    """Whether the Hub or datasets were told to stay offline (read as they read it)."""
    import datasets.config
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode() or datasets.config.HF_DATASETS_OFFLINE)


@contextlib.contextmanager
def offline_nltk() -> Iterator[None]:
    """While offline, ``nltk.download`` returns ``False`` (its own failure value) without
    reaching the network; otherwise nothing changes."""
    if not offline():
        yield
        return
    try:
        import nltk
    except ImportError:  # no RULER without NLTK: nothing would download
        yield
        return

    def refuse(info_or_id: object = None, *args: object, **kwargs: object) -> bool:
        log.warning("offline: NLTK data %r not downloaded (only RULER's essay-haystack tasks "
                    "use it)", info_or_id)
        return False

    original = nltk.download
    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original
