"""Sessions: a decoding state kept across requests, on disk and (while hot) in memory.

A session is a :class:`~tttlm.inference.State` of one sequence plus the tokens of the
conversation it has not read yet: the last token of every request (the last one generated,
or the document's last) stays unread, so that the next request always has at least one token
to prefill and gets the logits to continue from; a session continued with an empty prompt
thus picks up exactly where the previous reply stopped.

On disk (``DIR`` is locked by the server with :class:`~tttlm.files.FolderLock`)::

    DIR/<id>/serve.json          names the current state folder, the unread tokens, counters
    DIR/<id>/state-000007/       State.save's folder (its own manifest, tensors by hash)

A save writes a new ``state-N`` folder, then replaces ``serve.json`` (written atomically),
then deletes older ``state-*`` folders, so a crash at any moment leaves the previous or the
new session whole. States are saved paged (:mod:`tttlm.inference.pages`): the new folder
hard-links the previous one's packs and adds one pack with the pages the request changed, so
a reply of a few tokens writes a few pages per cache, not the whole state. A fork hard-links
the session's files into a new folder: no copy on disk or in memory until it is continued.
Every session is saved when its request completes, before the reply ends: a ``kill -9``
loses at most the requests in flight. Hot sessions stay in an LRU of at most
``max_in_memory``; evicting one only drops it from memory (it is on disk already).

A request checks a session out (it leaves the LRU; its state is the request's until it
checks it back in); :meth:`SessionStore.claim` makes a second request for a session that is
in use fail at once (409) instead of waiting.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tttlm.errors import UserError
from tttlm.files import FolderLock, atomic_write_text, fsync_dir, link_or_copy
from tttlm.inference.engine import Engine
from tttlm.inference.state import State
from tttlm.memory.memory import ContextMemory
from tttlm.memory.recall import RecallPolicy
from tttlm.serve.api_errors import APIError, bad_request, conflict, not_found

META = "serve.json"
FORMAT = "tttlm-serve-session"
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STATE_DIR = re.compile(r"^state-(\d{6,})$")
_MEMORY_DIR = re.compile(r"^memory-(\d{6,})$")


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise bad_request(f"session_id {session_id[:80]!r} is not a valid id; use 1-64 "
                          "letters, digits, '_', '-' or '.', starting with a letter or digit",
                          "session_id")
    return session_id


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex[:20]}"


@dataclass
class Session:
    id: str
    state: State
    unread: list[int]
    created: float
    saved: int = 0  # number of the state folder on disk (0: never saved)
    # What left the window, for retrieval (servers with --rag end); None without.
    memory: ContextMemory | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the conversation: read by the state, plus the unread ones."""
        return self.state.lengths[0] + len(self.unread)

    def info(self, in_memory: bool) -> dict[str, Any]:
        return {"id": self.id, "object": "session", "created": int(self.created),
                "tokens": self.tokens, "bytes": self.state.nbytes(), "in_memory": in_memory}


class SessionStore:
    """Sessions of one server, in ``folder``; every method but :meth:`claim` /
    :meth:`release` runs on the engine's worker thread."""

    def __init__(self, folder: Path, engine: Engine, max_in_memory: int,
                 policy: RecallPolicy | None = None) -> None:
        if max_in_memory < 0:
            raise UserError(f"--max-sessions-in-memory {max_in_memory} must be >= 0")
        self.folder = folder
        self.engine = engine
        self.max_in_memory = max_in_memory
        self.policy = policy  # retrieval: sessions keep a memory of what left the window
        self.hot: OrderedDict[str, Session] = OrderedDict()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._lock = FolderLock(folder, "serve")

    # ---------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--sessions {self.folder} is a file; give a folder")
        self._lock.acquire()

    def close(self) -> None:
        self.hot.clear()
        self._lock.release()

    # ----------------------------------------------------- one request per session
    def claim(self, session_id: str) -> None:
        """Mark a session in use; 409 when a request already uses it (any thread)."""
        with self._busy_lock:
            if session_id in self._busy:
                raise conflict(f"session {session_id} is busy with another request; wait for "
                               "it to finish (one request per session at a time)")
            self._busy.add(session_id)

    def release(self, session_id: str) -> None:
        with self._busy_lock:
            self._busy.discard(session_id)

    # ------------------------------------------------------------------------- queries
    def path(self, session_id: str) -> Path:
        return self.folder / session_id

    def exists(self, session_id: str) -> bool:
        return session_id in self.hot or (self.path(session_id) / META).is_file()

    def info(self, session_id: str) -> dict[str, Any]:
        if session_id in self.hot:
            return self.hot[session_id].info(in_memory=True)
        meta = self._meta(session_id)
        return {"id": session_id, "object": "session", "created": int(meta["created"]),
                "tokens": meta["tokens"], "bytes": meta.get("bytes"), "in_memory": False}

    def list(self) -> list[dict[str, Any]]:
        ids = sorted(p.name for p in self.folder.iterdir()
                     if p.is_dir() and (p / META).is_file() and SESSION_ID.match(p.name))
        return [self.info(i) for i in ids]

    # -------------------------------------------------------------------- check in/out
    def new(self, session_id: str) -> Session:
        if self.exists(session_id):
            raise APIError(409, f"session {session_id} exists already; continue it, delete "
                                "it, or choose another session_id", code="session_exists")
        leftover = self.path(session_id)
        if leftover.exists():  # a creation cut before its first save finished
            shutil.rmtree(leftover)
        return Session(session_id, self.engine.new_state(1), [], time.time(),
                       memory=self._new_memory())

    def checkout(self, session_id: str) -> Session:
        """The session, loaded from disk when it is not hot; it leaves the LRU until
        :meth:`checkin` (or :meth:`discard`)."""
        session = self.hot.pop(session_id, None)
        if session is not None:
            return session
        meta = self._meta(session_id)
        where = self.path(session_id) / meta["state"]
        model = self.engine.model
        try:
            state = State.load(where, model, device=model.embed.weight.device)
        except (UserError, FileNotFoundError) as err:
            raise APIError(409, f"session {session_id} cannot be continued: {err}",
                           code="session_unusable") from None
        memory = self._new_memory()
        if memory is not None and isinstance(meta.get("memory"), str):
            try:
                assert self.policy is not None
                memory = self.policy.load_memory(self.path(session_id) / meta["memory"],
                                                 self.engine)
            except UserError as err:
                raise APIError(409, f"session {session_id} cannot be continued: {err}",
                               code="session_unusable") from None
        return Session(session_id, state, list(meta["unread"]), meta["created"],
                       meta["saved"], memory)

    def checkin(self, session: Session) -> None:
        """Save the session, then keep it hot (evicting the least recently used)."""
        self.save(session)
        self.hot[session.id] = session
        self.hot.move_to_end(session.id)
        while len(self.hot) > self.max_in_memory:
            self.hot.popitem(last=False)  # saved already: dropping it is the eviction

    def fork(self, source: str, target: str) -> dict[str, Any]:
        """Copy a session on disk, where it is whole (a hot session was saved at check-in):
        its files are immutable and are hard-linked, so a fork costs neither a copy of the
        state nor memory until it is continued (copy-on-write: each side's later saves write
        their own new pages)."""
        meta = self._meta(source)
        if self.exists(target):
            raise APIError(409, f"session {target} exists already; continue it, delete it, "
                                "or choose another session_id", code="session_exists")
        src, dst = self.path(source), self.path(target)
        if dst.exists():  # a fork or creation cut before its manifest was written
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for name in (meta["state"], meta.get("memory")):
            if isinstance(name, str):
                (dst / name).mkdir()
                for file in (src / name).iterdir():
                    if not file.name.startswith("."):  # not the lock, not temporaries
                        link_or_copy(file, dst / name / file.name)
                fsync_dir(dst / name)
        fsync_dir(dst)
        now = time.time()
        atomic_write_text(dst / META, json.dumps({**meta, "created": now, "updated": now},
                                                 indent=2) + "\n")
        return self.info(target)

    def delete(self, session_id: str) -> None:
        if not self.exists(session_id):
            raise self._missing(session_id)
        self.hot.pop(session_id, None)
        folder = self.path(session_id)
        # The manifest goes first: from then on the folder is no session, whatever is left.
        (folder / META).unlink(missing_ok=True)
        fsync_dir(folder)
        shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------------- files
    def save(self, session: Session) -> None:
        folder = self.path(session.id)
        folder.mkdir(parents=True, exist_ok=True)
        number = session.saved + 1
        name = f"state-{number:06d}"
        previous = folder / f"state-{session.saved:06d}" if session.saved else None
        # Paged: a reply rewrites a few pages of each cache, and only those are written; the
        # unchanged packs of the previous save are hard-linked into the new folder.
        session.state.save(folder / name, command="serve", paged=True, base=previous)
        memory_name = None
        if session.memory is not None:
            memory_name = f"memory-{number:06d}"
            session.memory.save(folder / memory_name)
        meta = {"format": FORMAT, "version": 1, "state": name, "saved": number,
                "memory": memory_name,
                "unread": session.unread, "tokens": session.tokens,
                "bytes": session.state.nbytes(), "created": session.created,
                "updated": time.time()}
        atomic_write_text(folder / META, json.dumps(meta, indent=2) + "\n")
        session.saved = number
        for old in folder.iterdir():
            if old.name not in (name, memory_name) and (_STATE_DIR.match(old.name)
                                                       or _MEMORY_DIR.match(old.name)):
                shutil.rmtree(old, ignore_errors=True)

    def _new_memory(self) -> ContextMemory | None:
        return self.policy.new_memory(self.engine) if self.policy is not None else None

    def _meta(self, session_id: str) -> dict[str, Any]:
        file = self.path(session_id) / META
        if not file.is_file():
            raise self._missing(session_id)
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
            ok = (meta.get("format") == FORMAT and isinstance(meta.get("state"), str)
                  and _STATE_DIR.match(meta["state"]) and isinstance(meta.get("unread"), list)
                  and all(isinstance(t, int) for t in meta["unread"]))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise APIError(409, f"session {session_id}: {META} is damaged; delete the session",
                           code="session_unusable")
        return meta

    def _missing(self, session_id: str) -> APIError:
        return not_found(f"session {session_id} does not exist; create it with POST "
                         "/v1/sessions", code="session_not_found")

