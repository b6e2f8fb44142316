"""The one error type for bad input, and how the command line words errors.

Library code raises :class:`UserError` (or a subclass) for anything the caller can fix — a bad
setting, a file that is not what it should be, a folder that belongs to another run. Its message
is one line, ``<what>; <how to fix>``. The command line prints it as
``tttlm <cmd>: error: <message>`` and exits 2 (:func:`report_exception`, called by
:mod:`tttlm.cli` and by subcommands that report an error themselves); a ``ValueError`` so that
callers who validate arguments generically still catch it.
"""

from __future__ import annotations

import errno
import os
import sys

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


def one_line(message: str) -> str:
    """``message`` on one line (its whitespace runs, newlines included, become one space)."""
    return " ".join(str(message).split())


def user_error(message: str, prog: str = "tttlm") -> int:
    """Report a user error as one line on stderr (never a traceback); the exit code is 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return 2


def report_exception(err: BaseException, prog: str = "tttlm") -> int:
    """One line for an exception that ended a command; returns the exit status."""
    if isinstance(err, OSError):
        described = describe_os_error(err)
        if described is None and err.filename is not None and err.strerror:
            # A path that is not what it should be (a folder given for a file, ...).
            described = f"{err.strerror}: {os.fspath(err.filename)}; check the path"
        if described is not None:
            return user_error(described, prog)
    if isinstance(err, (UserError, ValueError, FileNotFoundError, NotADirectoryError)):
        return user_error(str(err) or type(err).__name__, prog)
    print(f"{prog}: error: {type(err).__name__}: {one_line(str(err))}; this is likely a bug in "
          "tttlm: rerun with --debug for the traceback and report it", file=sys.stderr)
    return 1
