"""A dense passage index: each passage an embedding, a query's passages those of highest cosine
similarity, through ``faiss`` (``faiss-cpu``, the ``retrieval`` extra).

* :class:`Embedder`: what turns token passages into vectors: a ``name`` (its identity: a saved
  memory's vectors are reused only by an embedder of the same name), ``dim`` and ``embed``;
* :class:`ModelEmbedder`: the tttlm model's own final normed hidden states, mean-pooled over
  the passage (each passage read alone, from scratch, without inner updates);
* :class:`CallableEmbedder`: any function, e.g. a sentence-embedding model over the decoded
  text of the passages;
* :class:`DenseIndex`: the :class:`~tttlm.memory.index.PassageIndex` over them: exact inner
  product (``faiss.IndexFlatIP``) of L2-normalised vectors, i.e. cosine similarity, on the
  CPU. It scans every vector per query (linear in the memory); an approximate or GPU faiss
  index, or a client of a vector database, is a subclass that overrides :meth:`DenseIndex.
  add_vectors`, :meth:`~DenseIndex.vectors` and :meth:`~DenseIndex.search`.

Unlike BM25, cosine similarity has no "shares nothing with the query": every passage has a
score, so a search returns ``k`` passages unless ``min_score`` is set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tttlm.errors import UserError
from tttlm.memory.index import PassageIndex

if TYPE_CHECKING:
    from tttlm.model.model import TTTForCausalLM


def require_faiss() -> Any:
    """The ``faiss`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("the dense index needs faiss; install it with pip install "
                        "'tttlm[retrieval]'") from None
    return faiss


@runtime_checkable
class Embedder(Protocol):
    """Turns token passages into vectors.

    Attributes:
        name: what makes two embedders the same (a saved memory's vectors are reused on load
            only when the names match; otherwise the passages are embedded again).
        dim: the vectors' width.
    """

    name: str
    dim: int

    def embed(self, passages: Sequence[Sequence[int]]) -> np.ndarray:
        """``[len(passages), dim]`` float32 vectors, one per passage (any length, even 0)."""
        ...


def as_vectors(values: Any, count: int, dim: int, who: str) -> np.ndarray:
    """``values`` as a C-contiguous float32 ``[count, dim]`` array (a copy, so that normalising
    it in place never touches the caller's array), or a one-line :class:`UserError`."""
    array = np.array(values, dtype=np.float32, copy=True, order="C")
    if array.shape != (count, dim):
        raise UserError(f"{who} gave vectors of shape {array.shape} for {count} passages; "
                        f"it must give [{count}, {dim}]")
    if not np.isfinite(array).all():
        raise UserError(f"{who} gave non-finite values; check the embedding model")
    return array


class CallableEmbedder:
    """An :class:`Embedder` from a function of a list of token lists.

    Args:
        fn: ``fn(passages) -> [n, dim]`` (numpy, torch on any device, or nested lists).
        dim: the vectors' width.
        name: the embedder's identity (say which model, and anything that changes its
            vectors), e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``.

    A sentence-embedding model reads text, so decode the passages first, e.g. with
    ``sentence-transformers`` (not a dependency of tttlm)::

        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
        embedder = CallableEmbedder(
            lambda passages: st.encode([tokenizer.decode(p) for p in passages]),
            dim=st.get_sentence_embedding_dimension(), name="all-MiniLM-L6-v2")
        memory = ContextMemory(window, 64, index=DenseIndex(embedder))
    """

    def __init__(self, fn: Callable[[list[list[int]]], Any], dim: int, name: str) -> None:
        if int(dim) < 1:
            raise UserError(f"an embedder's dim ({dim}) must be at least 1")
        self.fn, self.dim, self.name = fn, int(dim), str(name)

    def embed(self, passages: Sequence[Sequence[int]]) -> np.ndarray:
        passages = [[int(t) for t in p] for p in passages]
        if not passages:
            return np.zeros((0, self.dim), dtype=np.float32)
        values = self.fn(passages)
        if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
            values = values.detach().float().cpu().numpy()
        return as_vectors(values, len(passages), self.dim, f"embedder {self.name!r}")


class ModelEmbedder:
    """The model's own embedding of a passage: the mean of its final normed hidden states
    (:meth:`~tttlm.model.model.TTTForCausalLM.hidden_states`), each passage read alone from
    an empty context, without inner updates, under ``torch.no_grad`` on the model's device and
    in its dtype. Passages of equal length go through the model together, ``batch_size`` at a
    time (a memory's passages all have one length, so its adds are few large batches).

    Its :attr:`name` joins the config's fingerprint, a digest of the weights and the dtype:
    a saved memory's vectors are reused only by the same model in the same precision.
    """

    def __init__(self, model: TTTForCausalLM, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1")
        self.model, self.batch_size = model, batch_size
        self.dim = int(model.config.hidden_size)

    @property
    def name(self) -> str:
        # Asked at save and load only; computed then, so that weights changed since this
        # embedder was made are not mistaken for the old ones.
        from tttlm.inference.state import weights_digest

        dtype = str(self.model.embed.weight.dtype).removeprefix("torch.")
        key = f"{self.model.config.fingerprint()}:{weights_digest(self.model)}:{dtype}"
        return f"tttlm-mean:{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def embed(self, passages: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        out = np.zeros((len(passages), self.dim), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(passages):
            if len(p):  # an empty passage has no hidden state: its row stays 0
                by_length.setdefault(len(p), []).append(i)
        device = self.model.embed.weight.device
        with torch.no_grad():
            for rows in by_length.values():
                for s in range(0, len(rows), self.batch_size):
                    part = rows[s:s + self.batch_size]
                    ids = torch.tensor([[int(t) for t in passages[i]] for i in part],
                                       dtype=torch.long, device=device)
                    pooled = self.model.hidden_states(ids).float().mean(dim=1)
                    out[part] = pooled.cpu().numpy()
        return out


class DenseIndex(PassageIndex):
    """Cosine similarity between embedded passages and the embedded query, exact, through
    ``faiss.IndexFlatIP`` over L2-normalised vectors (CPU).

    Args:
        embedder: an :class:`Embedder` (e.g. :class:`ModelEmbedder`).
        min_score: leave out passages whose cosine is below it (default: none left out).
    """

    def __init__(self, embedder: Embedder, *, min_score: float | None = None) -> None:
        self._faiss = require_faiss()
        self.embedder, self.min_score = embedder, min_score
        self.dim = int(embedder.dim)
        self._index = self._faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def nbytes(self) -> int:
        """The stored vectors (float32)."""
        return 4 * self.dim * len(self)

    def empty(self) -> DenseIndex:
        return DenseIndex(self.embedder, min_score=self.min_score)

    @property
    def embedder_name(self) -> str:
        return str(self.embedder.name)

    def vectors(self) -> np.ndarray:
        """The passages' unit vectors ``[len, dim]`` (float32), in passage order."""
        if not len(self):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._index.reconstruct_n(0, len(self)), dtype=np.float32)

    def add_vectors(self, vectors: np.ndarray) -> None:
        """Index passages by their vectors (as :meth:`vectors` returns them; rows that are not
        of unit length are normalised)."""
        array = as_vectors(vectors, len(vectors), self.dim, "the vectors")
        norms = np.linalg.norm(array, axis=1)
        # Vectors saved by vectors() are unit already: normalising them again could move their
        # last bits, and a loaded memory should rank exactly as the saved one did.
        if not np.allclose(norms[norms > 0], 1.0, rtol=0, atol=1e-5):
            self._faiss.normalize_L2(array)
        self._index.add(array)

    def add(self, passages: Sequence[Sequence[int]]) -> None:
        if passages:
            self.add_vectors(self._embed(passages))

    def _embed(self, passages: Sequence[Sequence[int]]) -> np.ndarray:
        array = as_vectors(self.embedder.embed(passages), len(passages), self.dim,
                           f"embedder {type(self.embedder).__name__}")
        self._faiss.normalize_L2(array)
        return array

    def search(self, query: Sequence[int], k: int) -> list[tuple[int, float]]:
        n = len(self)
        if not n or not len(query) or k < 1:
            return []
        k = min(k, n)
        q = self._embed([query])
        # faiss breaks ties among equal scores its own way; the contract breaks them towards
        # the earlier passage. Ask for a few more than k and re-sort: the first k are exact
        # once the k-th score is above the lowest returned one (every passage scoring at
        # least the k-th was returned); else ask for twice as many, up to all of them.
        want = min(n, k + 8)
        while True:
            scores, ids = self._index.search(q, want)
            hits = sorted(((int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0),
                          key=lambda hit: (-hit[1], hit[0]))
            if want == n or hits[k - 1][1] > hits[-1][1]:
                break
            want = min(n, 2 * want)
        floor = self.min_score
        return [hit for hit in hits[:k] if floor is None or hit[1] >= floor]
