"""Durable file writes and folder ownership: nothing half-written, nothing silently shared.

Every file tttlm keeps (checkpoints, model folders, sessions, prepared data, reports) is written
to a temporary name next to its final place, flushed to disk (``fsync``), renamed into place,
and its folder is flushed, so a crash or power loss leaves either the old file or the new one,
never a torn mix. Temporary files get the usual ``0666 & ~umask`` mode (``tempfile.mkstemp``
would give ``0600``).

A folder a run owns (a training run, a dataset being prepared, a session being saved) is locked
with :class:`FolderLock`: an exclusive ``flock`` on ``DIR/.tttlm.lock``, which the kernel
releases when the process dies, so a stale lock never blocks anyone; the file names the owner
(pid, host, command, start time) for the error message of whoever is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tttlm.errors import UserError

LOCK_NAME = ".tttlm.lock"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on folders: nothing more to do
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file and folder under ``root`` (files first, then their folders)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit flush, fsync and rename it over
    ``path``, then fsync the folder. On an error the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with open(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # elsewhere os.umask can only be read by setting it
    os.umask(current)
    return current


def atomic_save(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Like :func:`atomic_write` for writers that take a path (``safetensors.save_file``):
    ``write(tmp)`` fills a temporary file, which then gets the usual ``0666 & ~umask`` mode
    (such writers may go through their own ``0600`` temporary file), is flushed and renamed
    over ``path``."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def staging_dir(final: str | os.PathLike[str]) -> Path:
    """A fresh hidden folder beside ``final`` to assemble it in (see :func:`commit_dir`)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def _old_name(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Flush the folder ``tmp`` and put it in place of ``final``.

    An existing ``final`` is first renamed to ``.old-<name>`` and deleted only after the new
    folder is in place, so that at every moment one complete version exists under one of the
    two names; :func:`recover_dir` puts the old one back after a crash between the renames.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = _old_name(final)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        fsync_dir(final.parent)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: str | os.PathLike[str]) -> None:
    """Undo a :func:`commit_dir` cut between its two renames: bring ``.old-<name>`` back when
    ``final`` is missing, drop it when both exist."""
    final = Path(final)
    old = _old_name(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, final)
        fsync_dir(final.parent)


def remove_stale_staging(parent: str | os.PathLike[str], name: str) -> None:
    """Delete staging folders of ``name`` left by crashed writers (call with the lock held)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    # Exactly the names staging_dir makes: a sibling called "<name>-2" is not ours to delete.
    ours = re.compile(rf"^\.tmp-{re.escape(name)}-\d+-[0-9a-f]{{8}}$")
    for path in parent.iterdir():
        if ours.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ locking
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_owner(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"`tttlm {info.get('command', '?')}` (pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {since})")


class FolderLock:
    """Exclusive ownership of a folder by one process (a context manager).

    Args:
        directory: the folder to own; created if missing.
        command: what owns it, for the refusal message (e.g. ``"train"``).
    """

    def __init__(self, directory: str | os.PathLike[str], command: str) -> None:
        self.directory = Path(directory)
        self.command = command
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def _read_owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._lock(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                    "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): fall back to the owner's pid
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise self._busy() from None
            except OSError as err:  # file systems without flock: fall back to the pid
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        owner = self._read_owner()
        same_host = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and (not same_host or _pid_alive(pid)):
            raise self._busy(owner)

    def _busy(self, owner: dict[str, Any] | None = None) -> UserError:
        owner = owner if owner is not None else self._read_owner()
        return UserError(f"{self.directory} is in use by {_describe_owner(owner)}; wait for it "
                         "to finish or stop it, or use another folder")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # unlocked from here on: no owner to name
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def link_or_copy(src: Path, dst: Path) -> None:
    """Put a file that is never rewritten in place (a session's packs, manifests) at ``dst``:
    a hard link where the file system allows, else a durable copy. An existing ``dst`` is
    kept: callers name such files by their content, so the same name is the same file."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        tmp = _temp_name(dst)
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
        os.replace(tmp, dst)
