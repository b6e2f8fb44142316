"""Passage indexes behind one small interface: lexical BM25 over token n-grams (``bm25s``,
embedded, no service) by default. A dense index, or a client of a vector database, is another
:class:`PassageIndex`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from tttlm.errors import UserError


class PassageIndex(abc.ABC):
    """Passages are token-id sequences, identified by their insertion order (0, 1, …)."""

    @abc.abstractmethod
    def add(self, passages: Sequence[Sequence[int]]) -> None:
        """Index further passages."""

    @abc.abstractmethod
    def search(self, query: Sequence[int], k: int) -> list[tuple[int, float]]:
        """The ``k`` best passages for the ``query`` tokens as ``(passage id, score)``, best
        first; ties go to the earlier passage. Passages that share nothing with the query
        are left out."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def nbytes(self) -> int:
        """Bytes the index holds beyond the passages themselves (0 when unknown)."""
        return 0


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
