"""Progress bars that suit where they are written.

On a terminal: a tqdm bar redrawn in place. Written to a file or a pipe (a log, CI, ``nohup``):
one plain line every ``log_interval`` seconds instead of a stream of carriage-return frames.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 10.0


class _LineWriter:
    """Turns tqdm's ``\\r``-redrawn frames into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def progress_bar(*, file: IO[str] | None = None, log_interval: float = LOG_INTERVAL_S,
                 **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar (same arguments) on ``file`` (default stderr); see the module doc."""
    stream = file if file is not None else sys.stderr
    if kwargs.get("disable") or is_terminal(stream):
        return tqdm(file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("ncols", 100)
    return tqdm(file=_LineWriter(stream), mininterval=log_interval, maxinterval=log_interval,
                **kwargs)
