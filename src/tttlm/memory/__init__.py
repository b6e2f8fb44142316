"""Retrieval memory beside the fast weights: the context that left the attention window, kept
as passages in an index, quoted back before a query so that exact strings (needles) return.

* :mod:`tttlm.memory.index`: :class:`PassageIndex`; BM25 over token n-grams, by default
  :class:`FTS5Index` (SQLite FTS5 of the standard library, updated in place), or
  :class:`BM25Index` (``bm25s``, the ``retrieval`` extra; rebuilt at each search after adds);
* :mod:`tttlm.memory.dense`: :class:`DenseIndex`, cosine similarity of passage embeddings
  through ``faiss`` (the ``retrieval`` extra): :class:`ModelEmbedder` (the model's own mean
  hidden states) or :class:`CallableEmbedder` (any embedding model);
* :mod:`tttlm.memory.memory`: :class:`ContextMemory`, one sequence's recorded tokens and index;
* :mod:`tttlm.memory.recall`: :class:`RecallSession`, the recall policy (``rag=off|end``) on an
  :class:`~tttlm.inference.Engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.memory.dense import CallableEmbedder, DenseIndex, Embedder, ModelEmbedder
    from tttlm.memory.index import BM25Index, FTS5Index, PassageIndex
    from tttlm.memory.memory import ContextMemory, Passage
    from tttlm.memory.recall import RAG_INDEXES, RAG_MODES, RecallSession

__all__ = ["RAG_INDEXES", "RAG_MODES", "BM25Index", "CallableEmbedder", "ContextMemory",
           "DenseIndex", "Embedder", "FTS5Index", "ModelEmbedder", "Passage", "PassageIndex",
           "RecallSession"]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["CallableEmbedder", "DenseIndex", "Embedder", "ModelEmbedder"],
                    "tttlm.memory.dense"),
    **dict.fromkeys(["BM25Index", "FTS5Index", "PassageIndex"], "tttlm.memory.index"),
    **dict.fromkeys(["ContextMemory", "Passage"], "tttlm.memory.memory"),
    **dict.fromkeys(["RAG_INDEXES", "RAG_MODES", "RecallSession"], "tttlm.memory.recall"),
})
