"""Passage indexes behind one small interface, :class:`PassageIndex` (add passages of token ids,
search with a query's token ids), embedded in the process (no service). Three implementations:

* :class:`FTS5Index` (the default): BM25 over token n-grams in SQLite's FTS5 full-text index in
  memory (Python's standard library), which adds passages in place: a recall after new context
  costs a query, not a rebuild (at 128K tokens of memory: 0.1 ms per added passage, a few ms
  per query);
* :class:`BM25Index`: BM25 over token n-grams through ``bm25s`` (the ``retrieval`` extra),
  which builds its index in one go and so rebuilds it at the first search after passages were
  added, linear in the memory (0.6 s at 128K tokens on a 2-core CPU;
  ``benchmarks/results/memory_index_cpu.md``);
* :class:`~tttlm.memory.dense.DenseIndex` (:mod:`tttlm.memory.dense`): cosine similarity of
  passage embeddings (the model's own mean hidden states, or any embedding model) through
  ``faiss`` (the ``retrieval`` extra).

The two BM25 variants differ slightly (FTS5: k1 = 1.2, b = 0.75, IDF log((N - n + .5)/(n + .5))
floored at 1e-6; bm25s: Lucene's IDF log(1 + (N - n + .5)/(n + .5))), so scores differ and
near-ties may order differently. A client of a vector database is another
:class:`PassageIndex`: ``add``, ``search`` and ``__len__``, plus :meth:`PassageIndex.empty`
(a fresh index of the same kind, for copies of a memory) and, for an index of vectors,
:meth:`PassageIndex.vectors` / :meth:`PassageIndex.add_vectors` with an
:attr:`PassageIndex.embedder_name`, so that copies and saved memories need not embed again.
"""
from __future__ import annotations

import abc
import functools
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from tttlm.errors import UserError

# The command lines' --rag-index help (here: this module imports no torch, the parsers load fast).
RAG_HORIZON_HELP = ("index passages once they are N tokens old (at most the window; default: "
                    "the window, i.e. once attention no longer sees them); shorter also quotes "
                    "text still in the window but far from the query")
RAG_INDEX_HELP = ("passage index of --rag end: fts5 (default; bm25 where SQLite lacks FTS5), "
                  "bm25 (bm25s) or dense (the model's own mean hidden states, through faiss); "
                  "bm25 and dense need the retrieval extra")
RAG_SEPARATOR_HELP = ("plain text read before each recalled passage and before the query, "
                      "encoded with the model's tokenizer; backslash escapes such as \\n "
                      "work (default: the BOS token, which joins documents in training)")


class PassageIndex(abc.ABC):
    """Passages are token-id sequences, identified by their insertion order (0, 1, …)."""

    @abc.abstractmethod
    def add(self, passages: Sequence[Sequence[int]]) -> None:
        """Index further passages."""

    @abc.abstractmethod
    def search(self, query: Sequence[int], k: int) -> list[tuple[int, float]]:
        """The ``k`` best passages for the ``query`` tokens as ``(passage id, score)``, best
        first; ties go to the earlier passage; ``k`` is capped at the index's size. A lexical
        index leaves out passages that share nothing with the query."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def nbytes(self) -> int:
        """Bytes the index holds beyond the passages themselves (0 when unknown)."""
        return 0

    def empty(self) -> PassageIndex:
        """A new, empty index of the same kind and settings (a memory's copy fills it)."""
        return type(self)()

    # An index of vectors (dense) keeps what it computed from the passages, so that a copy
    # or a saved memory does not embed them again; a lexical index is rebuilt from tokens.
    @property
    def embedder_name(self) -> str | None:
        """The identity of what made :meth:`vectors` (an embedder's name), or ``None`` for
        an index that keeps no vectors."""
        return None

    def vectors(self) -> np.ndarray | None:
        """The passages' vectors ``[len, dim]`` in passage order, or ``None`` (no vectors)."""
        return None

    def add_vectors(self, vectors: np.ndarray) -> None:
        """Index further passages by the vectors :meth:`vectors` gave for them."""
        raise TypeError(f"{type(self).__name__} keeps no vectors; add passages with add()")


def ngram_terms(tokens: Sequence[int], n: int) -> list[str]:
    """The terms of a token sequence: every token and every run of up to ``n`` tokens, as
    strings (``"17"``, ``"17_4"``): bigrams make an exact phrase outrank scattered words."""
    ids = [str(int(t)) for t in tokens]
    terms = list(ids)
    for size in range(2, n + 1):
        terms += ["_".join(ids[i:i + size]) for i in range(len(ids) - size + 1)]
    return terms


def require_bm25s() -> Any:
    """The ``bm25s`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import bm25s
    except ImportError:
        raise UserError("retrieval needs bm25s; install it with pip install "
                        "'tttlm[retrieval]'") from None
    return bm25s


class BM25Index(PassageIndex):
    """BM25 (``bm25s``) over token n-grams. ``bm25s`` builds its index in one go, so the index
    is rebuilt at the first search after passages were added: one build per recall, linear in
    the memory's size."""

    def __init__(self, ngram: int = 2) -> None:
        self._bm25s = require_bm25s()
        self.ngram = ngram
        self._terms: list[list[str]] = []
        self._built: object | None = None

    def __len__(self) -> int:
        return len(self._terms)

    def empty(self) -> BM25Index:
        return BM25Index(self.ngram)

    def nbytes(self) -> int:
        """The built index's arrays and vocabulary (approximate for the vocabulary's
        strings); 0 before the first search builds it."""
        import sys

        built = self._built
        if built is None:
            return 0
        scores = getattr(built, "scores", None) or {}
        total = sum(int(getattr(v, "nbytes", 0)) for v in scores.values())
        vocab = getattr(built, "vocab_dict", None) or {}
        return total + sum(sys.getsizeof(term) + 16 for term in vocab)

    def add(self, passages: Sequence[Sequence[int]]) -> None:
        self._terms += [ngram_terms(p, self.ngram) for p in passages]
        self._built = None

    def search(self, query: Sequence[int], k: int) -> list[tuple[int, float]]:
        terms = ngram_terms(query, self.ngram)
        if not self._terms or not terms or k < 1:
            return []
        if self._built is None:
            retriever = self._bm25s.BM25()
            retriever.index(self._terms, show_progress=False)
            self._built = retriever
        k = min(k, len(self._terms))
        ids, scores = self._built.retrieve([terms], k=k, show_progress=False)  # type: ignore[attr-defined]
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        return sorted(found, key=lambda hit: (-hit[1], hit[0]))


@functools.cache
def fts5_available() -> bool:
    """Whether this Python's SQLite has the FTS5 extension (most builds do; asked once)."""
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.Error:
        return False
    return True


class FTS5Index(PassageIndex):
    """BM25 over token n-grams in an in-memory SQLite FTS5 table, updated in place.

    Terms are ``t17`` (token 17) and ``t17x4`` (the bigram 17, 4): letters and digits only,
    which FTS5's tokenizer keeps whole. A query is the OR of its distinct terms, ranked by
    FTS5's ``bm25()``; ties go to the earlier passage."""

    def __init__(self, ngram: int = 2) -> None:
        if not fts5_available():
            raise UserError("this Python's SQLite has no FTS5; use the bm25s index "
                            "(pip install 'tttlm[retrieval]', ContextMemory(index=BM25Index()))")
        self.ngram = ngram
        # One connection, used from whichever thread holds the memory (a server moves
        # sessions between threads); the lock keeps its use serial.
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE passages USING fts5(terms)")
        self._lock = threading.Lock()
        self._count = 0

    def _terms(self, tokens: Sequence[int]) -> list[str]:
        return ["t" + term.replace("_", "x") for term in ngram_terms(tokens, self.ngram)]

    def __len__(self) -> int:
        return self._count

    def empty(self) -> FTS5Index:
        return FTS5Index(self.ngram)

    def nbytes(self) -> int:
        """Pages of the in-memory database (the FTS5 index and its document copy)."""
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def add(self, passages: Sequence[Sequence[int]]) -> None:
        rows = [(self._count + i, " ".join(self._terms(p))) for i, p in enumerate(passages)]
        with self._lock:
            self._db.executemany("INSERT INTO passages(rowid, terms) VALUES (?, ?)", rows)
        self._count += len(rows)

    def search(self, query: Sequence[int], k: int) -> list[tuple[int, float]]:
        terms = sorted(set(self._terms(query)))
        if not self._count or not terms or k < 1:
            return []
        match = " OR ".join(f'"{term}"' for term in terms)
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, -bm25(passages) AS score FROM passages WHERE passages MATCH ? "
                "ORDER BY score DESC, rowid LIMIT ?", (match, int(k))).fetchall()
        return [(int(pid), float(score)) for pid, score in rows if score > 0]


def default_index() -> PassageIndex:
    """:class:`FTS5Index` where SQLite has FTS5, else :class:`BM25Index` (needs bm25s)."""
    return FTS5Index() if fts5_available() else BM25Index()


def require_index() -> None:
    """A one-line :class:`UserError` now, when no passage index can be built here (no FTS5 in
    this Python's SQLite and no bm25s), rather than at the first request."""
    if not fts5_available():
        require_bm25s()
