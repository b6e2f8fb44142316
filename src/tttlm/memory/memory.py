"""A memory of the context that has left the attention window: its tokens, cut into passages
and indexed, so that a later query can quote them back exactly.

TTT-E2E compresses what leaves the window into fast weights, which keeps its gist but not its
exact strings (on needle-in-a-haystack it scores like sliding-window attention). The memory keeps
the strings: every token a sequence reads is recorded, and once a passage (``passage_len``
tokens, by default the model's chunk) lies wholly outside the window it is indexed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tttlm.errors import UserError
from tttlm.files import FolderLock, atomic_write_bytes, atomic_write_text
from tttlm.memory.index import PassageIndex, default_index

MEMORY_FORMAT = "tttlm-memory"
MEMORY_VERSION = 1
TOKENS_FILE = "memory-tokens.npy"
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
        window: the model's attention window: the last ``window`` recorded tokens are still
            visible to attention and are not indexed.
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
        """An independent copy with a new index of the same kind (built from the tokens)."""
        twin = ContextMemory(self.window, self.passage_len, type(self.index)())
        twin.extend(self.tokens)
        return twin

    def nbytes(self) -> int:
        """Bytes of the recorded tokens as saved (int32) and of the built index."""
        return 4 * len(self.tokens) + self.index.nbytes()

    # ------------------------------------------------------------------------- files
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the tokens, then the manifest (last, durably); the index is rebuilt on load
        from the tokens, so a saved memory never disagrees with its index."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        with FolderLock(out, "memory save"):
            import io

            buffer = io.BytesIO()
            np.save(buffer, np.asarray(self.tokens, dtype=np.int32))
            atomic_write_bytes(out / TOKENS_FILE, buffer.getvalue())
            meta = {"format": MEMORY_FORMAT, "version": MEMORY_VERSION, "window": self.window,
                    "passage_len": self.passage_len, "tokens": len(self.tokens)}
            atomic_write_text(out / MANIFEST, json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str],
             index: PassageIndex | None = None) -> ContextMemory:
        """Read a memory written by :meth:`save`."""
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
        memory.extend(tokens)
        return memory
