"""A memory of the context that has left the attention window: its tokens, cut into passages
and indexed, so that a later query can quote them back exactly.

TTT-E2E compresses what leaves the window into fast weights, which keeps its gist but not its
exact strings (on needle-in-a-haystack it scores like sliding-window attention). The memory keeps
the strings: every token a sequence reads is recorded, and once a passage (``passage_len``
tokens, by default the model's chunk) lies wholly outside the window it is indexed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tttlm.errors import UserError
from tttlm.files import FolderLock, atomic_write_bytes, atomic_write_text
from tttlm.memory.index import PassageIndex, default_index

MEMORY_FORMAT = "tttlm-memory"
# Still 1: the manifest's "vectors" entry is optional (saves without it load as before, and a
# reader that does not know it rebuilds the index from the tokens, which stay the truth).
MEMORY_VERSION = 1
TOKENS_FILE = "memory-tokens.npy"
VECTORS_FILE = "memory-vectors.npy"
MANIFEST = "memory.json"


@dataclass(frozen=True)
class Passage:
    """Tokens ``[start, start + len(tokens))`` of the recorded stream."""

    start: int
    tokens: list[int]
    score: float = 0.0


class ContextMemory:
    """The recorded tokens of one sequence and an index of the passages outside the window.

    Args:
        window: the last ``window`` recorded tokens are not indexed: the model's attention
            window (they are still visible to attention), or a recall policy's shorter
            ``horizon``.
        passage_len: tokens per passage (passages tile the stream, no overlap).
        index: a :class:`PassageIndex` (default: :func:`~tttlm.memory.index.default_index`,
            BM25 over token uni- and bigrams).
    """

    def __init__(self, window: int, passage_len: int, index: PassageIndex | None = None) -> None:
        if window < 1 or passage_len < 1:
            raise UserError(f"window={window} and passage_len={passage_len} must be positive")
        self.window, self.passage_len = window, passage_len
        self.index = index if index is not None else default_index()
        self.tokens: list[int] = []
        self._indexed = 0  # passages handed to the index

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def passages(self) -> int:
        """Passages indexed so far."""
        return self._indexed

    def extend(self, tokens: list[int] | np.ndarray) -> None:
        """Record tokens the sequence read, and index the passages that left the window."""
        self.tokens += [int(t) for t in tokens]
        outside = max(0, len(self.tokens) - self.window) // self.passage_len
        if outside > self._indexed:
            L = self.passage_len
            self.index.add([self.tokens[i * L:(i + 1) * L] for i in range(self._indexed, outside)])
            self._indexed = outside

    def recall(self, query: list[int], budget: int, k: int = 8) -> list[Passage]:
        """The best passages for ``query`` that fit in ``budget`` tokens together (best first
        until the budget is spent), returned in stream order."""
        chosen: list[Passage] = []
        used = 0
        L = self.passage_len
        for pid, score in self.index.search(query, k):
            if used + L > budget:
                break
            chosen.append(Passage(pid * L, self.tokens[pid * L:(pid + 1) * L], score))
            used += L
        return sorted(chosen, key=lambda p: p.start)

    def copy(self) -> ContextMemory:
        """An independent copy with a new index of the same kind (:meth:`PassageIndex.empty`),
        given this index's vectors where it keeps any (a dense index: nothing is embedded
        again), else built from the tokens."""
        twin = ContextMemory(self.window, self.passage_len, self.index.empty())
        twin._restore(self.tokens, self.index.vectors())
        return twin

    def _restore(self, tokens: list[int] | np.ndarray, vectors: np.ndarray | None) -> None:
        """Record ``tokens`` into this empty memory; with ``vectors`` (one per passage outside
        the window) the index takes them instead of indexing the passages' tokens."""
        if vectors is None:
            self.extend(tokens)
            return
        self.tokens = [int(t) for t in tokens]
        outside = max(0, len(self.tokens) - self.window) // self.passage_len
        if len(vectors) != outside:
            raise ValueError(f"{len(vectors)} vectors for {outside} passages")
        if outside:
            self.index.add_vectors(vectors)
        self._indexed = outside

    def nbytes(self) -> int:
        """Bytes of the recorded tokens as saved (int32) and of the built index."""
        return 4 * len(self.tokens) + self.index.nbytes()

    # ------------------------------------------------------------------------- files
    def save(self, folder: str | os.PathLike[str], *, vectors: bool = True) -> Path:
        """Write the tokens, the index's vectors (an index that keeps some, with ``vectors``),
        then the manifest (last, durably). The tokens are the truth: a lexical index is
        rebuilt from them on load, and the vectors are only reused by a loading index whose
        embedder has the same name (the manifest names it and the file's hash)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        name = self.index.embedder_name if vectors else None
        array = self.index.vectors() if name is not None else None
        with FolderLock(out, "memory save"):
            atomic_write_bytes(out / TOKENS_FILE, _npy(np.asarray(self.tokens, dtype=np.int32)))
            meta: dict[str, object] = {
                "format": MEMORY_FORMAT, "version": MEMORY_VERSION, "window": self.window,
                "passage_len": self.passage_len, "tokens": len(self.tokens)}
            if array is not None:
                data = _npy(np.asarray(array, dtype=np.float32))
                atomic_write_bytes(out / VECTORS_FILE, data)
                meta["vectors"] = {"file": VECTORS_FILE, "embedder": name,
                                   "shape": list(array.shape),
                                   "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_text(out / MANIFEST, json.dumps(meta, indent=2) + "\n")
            if array is None:
                # An earlier save's vectors, which this manifest no longer names.
                (out / VECTORS_FILE).unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str],
             index: PassageIndex | None = None) -> ContextMemory:
        """Read a memory written by :meth:`save`, into ``index`` (default:
        :func:`~tttlm.memory.index.default_index`). An index of vectors takes the saved ones
        when its embedder has the name they were saved with (and the file is intact); else
        the passages are indexed again from the tokens (embedded again, for a dense index)."""
        src = Path(folder)
        try:
            meta = json.loads((src / MANIFEST).read_text())
            tokens = np.load(src / TOKENS_FILE, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{src} holds no readable tttlm memory ({err}); save one with "
                            "ContextMemory.save") from None
        if meta.get("format") != MEMORY_FORMAT or len(tokens) != meta.get("tokens"):
            raise UserError(f"{src}: {MANIFEST} does not describe {TOKENS_FILE} (a torn or "
                            "mixed save); save the memory again")
        memory = cls(int(meta["window"]), int(meta["passage_len"]), index)
        vectors = _saved_vectors(src, meta.get("vectors"), memory.index.embedder_name)
        outside = max(0, len(tokens) - memory.window) // memory.passage_len
        if vectors is not None and len(vectors) != outside:
            vectors = None  # a manifest at odds with itself: embed again from the tokens
        memory._restore(tokens, vectors)
        return memory


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _saved_vectors(src: Path, entry: object, name: str | None) -> np.ndarray | None:
    """The vectors a save kept, when ``name`` (the loading index's embedder) made them and
    their file is the one the manifest describes; else ``None`` (then the passages are
    embedded again: the vectors are a cache of the tokens, never needed)."""
    if name is None or not isinstance(entry, dict) or entry.get("embedder") != name:
        return None
    try:
        data = (src / VECTORS_FILE).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return None
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.ndim != 2 or list(array.shape) != entry.get("shape"):
        return None
    return array
