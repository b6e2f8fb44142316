"""The one error type for bad input, and how the command line words errors.

Library code raises :class:`UserError` (or a subclass) for anything the caller can fix — a bad
setting, a file that is not what it should be, a folder that belongs to another run. Its message
is one line, ``<what>; <how to fix>``. The command line prints it as
``tttlm <cmd>: error: <message>`` and exits 2 (see :mod:`tttlm.cli`); a ``ValueError`` so that
callers who validate arguments generically still catch it.
"""

from __future__ import annotations

import errno
import os

# OSError numbers that mean "the disk cannot take this write", not "the code is wrong".
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


class UserError(ValueError):
    """Bad input: a setting, file or folder the caller can fix. One line, no traceback."""


def describe_os_error(err: OSError, kept: str | None = None) -> str | None:
    """One line for an ``OSError`` a user can act on (disk full, permission denied, missing
    file), or ``None`` for anything else. ``kept`` says what survived (e.g. the last
    checkpoint), for errors that interrupt a write."""
    where = err.filename if err.filename is not None else None
    at = f" ({os.fspath(where)})" if where is not None else ""
    tail = f"; {kept}" if kept else ""
    if err.errno in _NO_SPACE:
        what = ("file size limit reached" if err.errno == errno.EFBIG
                else "no space left on device")
        return f"{what}{at}{tail}; free some space (or raise the limit) and run again"
    if err.errno in _NOT_ALLOWED:
        what = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        place = f": {os.fspath(where)}" if where is not None else ""
        return f"{what}{place}{tail}; check its permissions, or choose a folder you can write to"
    if err.errno == errno.ENOENT and where is not None:
        return f"no such file or folder: {os.fspath(where)}; check the path"
    if err.errno == errno.ENOTDIR and where is not None:
        return f"not a folder: {os.fspath(where)}; check the path"
    return None
