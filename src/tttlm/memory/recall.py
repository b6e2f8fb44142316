"""The recall policy: before answering, quote the passages of the memory that match the query
back into the window, right before the query, then continue.

``rag="end"`` (default): at each :meth:`RecallSession.generate` call the prompt's last
``query_len`` tokens are the query. The rest of the prompt is read first; then the best
passages outside the window (BM25 over token n-grams; passages of up to 64 tokens, at most
``budget`` tokens together, default a quarter of the window) are read, each after a
separator (default: the model's BOS id, which joins documents in training), in the order
they appeared; then the query, and generation continues. The quoted passages pass through
the model like any text (the fast weights learn from them too) but are not recorded in the
memory again. ``rag="chunk"``: as ``end``, and also while reading, before each chunk of the
text (every ``engine.chunk`` tokens of the recorded stream, once passages have left the
window) the last ``query_len`` tokens read recall passages that are quoted, each after the
separator, then a separator and the chunk: a long document is read with its matching earlier
passages in view (costs up to ``budget`` + separators more tokens per chunk). The memory counts
only recorded tokens toward the window, so with ``chunk`` some of the last window's text has
already left attention (pushed out by quotes) before it is indexed. ``rag="off"``: the engine
alone, token for token (the memory still records). Deterministic: same inputs, same passages,
same tokens. ``horizon`` (default: the window) indexes passages once they are that many tokens
old: shorter, the memory also quotes text that attention still sees but far from the query (a
small model copies a needle quoted next to the question far better than one 500 tokens back),
and quotes cannot push a not-yet-indexed needle out of the window.

The passage index (``index``, :data:`RAG_INDEXES`): ``"fts5"`` (SQLite FTS5) or ``"bm25"``
(``bm25s``), BM25 over token n-grams; ``"dense"``, cosine similarity of the model's own mean
hidden states (:class:`~tttlm.memory.dense.ModelEmbedder`, through ``faiss``). Default
(``None``): FTS5 where this Python's SQLite has it, else bm25s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tttlm.errors import UserError
from tttlm.inference import Engine, State
from tttlm.memory.dense import DenseIndex, ModelEmbedder, require_faiss
from tttlm.memory.index import (
    BM25Index,
    FTS5Index,
    PassageIndex,
    default_index,
    fts5_available,
    require_bm25s,
    require_index,
)
from tttlm.memory.memory import ContextMemory, Passage

if TYPE_CHECKING:
    from tttlm.model.model import TTTForCausalLM

RAG_MODES = ("off", "end", "chunk")
RAG_INDEXES = ("fts5", "bm25", "dense")
MAX_PASSAGE = 64


def check_index(kind: str | None) -> None:
    """A one-line :class:`UserError` now when the index ``kind`` is unknown or cannot be built
    here (a missing package, a SQLite without FTS5), rather than at the first recall."""
    if kind is None:
        require_index()
    elif kind not in RAG_INDEXES:
        raise UserError(f"rag index {kind!r} is not one of {', '.join(RAG_INDEXES)}")
    elif kind == "fts5" and not fts5_available():
        raise UserError("this Python's SQLite has no FTS5; use the bm25 or dense index "
                        "(pip install 'tttlm[retrieval]')")
    elif kind == "bm25":
        require_bm25s()
    elif kind == "dense":
        require_faiss()


def check_rag_options(rag: str, index: str | None, separator: str | None = None,
                      horizon: int | None = None) -> None:
    """The command lines' ``--rag`` / ``--rag-index`` / ``--rag-separator`` /
    ``--rag-horizon``: a one-line :class:`UserError` for any of them without ``--rag end``,
    or an index that cannot be built here (before a model loads)."""
    if separator is not None and rag == "off":
        raise UserError("--rag-separator marks the passages of --rag end; add --rag end or "
                        "drop --rag-separator")
    if horizon is not None and rag == "off":
        raise UserError(f"--rag-horizon {horizon} sets when --rag end indexes passages; add "
                        "--rag end or drop --rag-horizon")
    if index is None:
        return
    if rag == "off":
        raise UserError(f"--rag-index {index} chooses the index of --rag end; add --rag end "
                        "or drop --rag-index")
    check_index(index)


def separator_tokens(text: str | None, encode: Callable[[str], Sequence[int]]
                     ) -> tuple[int, ...] | None:
    """``--rag-separator``'s tokens (``None``: the policy's default, the BOS token). A
    pretrained model may read a plain-text marker such as ``"\\n\\n"`` better than its
    end-of-text token; the command line's backslash escapes are decoded first."""
    if text is None:
        return None
    try:
        # (non-ASCII characters pass through as their own escapes, so they survive)
        decoded = (text.encode("latin-1", "backslashreplace").decode("unicode_escape")
                   if "\\" in text else text)
    except UnicodeDecodeError as err:
        raise UserError(f"--rag-separator {text!r}: {err.reason}; write the text plainly or "
                        "with escapes such as \\n") from None
    tokens = tuple(int(t) for t in encode(decoded))
    if not tokens:
        raise UserError(f"--rag-separator {text!r} encodes to no tokens; give a non-empty text")
    return tokens


def new_index(kind: str | None, model: TTTForCausalLM) -> PassageIndex:
    """An empty passage index of ``kind`` (:data:`RAG_INDEXES`; ``None``: the default) for a
    memory of ``model``'s context; ``"dense"`` embeds with the model itself."""
    check_index(kind)
    if kind is None:
        return default_index()
    if kind == "fts5":
        return FTS5Index()
    if kind == "bm25":
        return BM25Index()
    return DenseIndex(ModelEmbedder(model))


@dataclass(frozen=True)
class RecallPolicy:
    """How a query recalls: ``budget`` tokens of passages (the best of ``k``), each read after
    ``separator``, then the separator and the query (the last ``query_len`` tokens); memories
    index their passages in an ``index`` of that kind (:data:`RAG_INDEXES`, ``None``: the
    default)."""

    budget: int
    query_len: int = 32
    k: int = 8
    separator: tuple[int, ...] = ()
    index: str | None = None
    horizon: int | None = None

    @classmethod
    def for_engine(cls, engine: Engine, *, budget: int | None = None, query_len: int = 32,
                   k: int = 8, separator: Sequence[int] | None = None,
                   index: str | None = None, horizon: int | None = None) -> RecallPolicy:
        """The defaults for ``engine``'s model: a quarter of the window, the BOS separator, the
        default index, passages indexed once they leave the window (``horizon``: once they
        are that many tokens old, at most the window). A full-attention model (no window), or
        an index that cannot be built here, is refused."""
        window = engine.window
        if window is None:
            raise UserError("retrieval recalls what left the attention window, and a full-"
                            "attention model has none; use an e2e or swa model, or rag=off")
        if query_len < 1 or k < 1:
            raise UserError(f"query_len={query_len} and k={k} must be at least 1")
        budget = window // 4 if budget is None else budget
        if budget < 1:
            raise UserError(f"the recall budget ({budget} tokens) must be at least 1")
        sep = (engine.config.bos_token_id,) if separator is None else tuple(map(int, separator))
        check_index(index)
        if horizon is not None and not 1 <= horizon <= window:
            raise UserError(f"the recall horizon ({horizon} tokens) must be between 1 and the "
                            f"window ({window}); omit it to index what leaves the window")
        return cls(budget, query_len, k, sep, index, horizon)

    def new_memory(self, engine: Engine) -> ContextMemory:
        """An empty memory for ``engine``'s model. Passages no longer than a chunk nor than
        the budget (so that one always fits), and at most 64 tokens: finer passages spend the
        budget on what matches. Passages are indexed once ``horizon`` tokens old (default:
        once they left the window)."""
        assert engine.window is not None
        return ContextMemory(self.horizon or engine.window,
                             max(1, min(engine.chunk, self.budget, MAX_PASSAGE)),
                             new_index(self.index, engine.model))

    def load_memory(self, folder: str | os.PathLike[str], engine: Engine) -> ContextMemory:
        """A memory saved by :meth:`ContextMemory.save`, in an index of this policy's kind (a
        dense one takes the saved vectors when they are the same model's)."""
        return ContextMemory.load(folder, new_index(self.index, engine.model))

    def split(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """``tokens`` as the head (read before recalling) and the query."""
        cut = max(0, len(tokens) - self.query_len)
        return tokens[:cut], tokens[cut:]

    def quote(self, memory: ContextMemory, query: list[int]) -> tuple[list[int], list[Passage]]:
        """The passages ``query`` recalls (in stream order, each after the separator) and a
        closing separator, ready to read; nothing when none is recalled."""
        passages = memory.recall(query, self.budget, self.k)
        if not passages:
            return [], []
        quoted = [t for p in passages for t in (*self.separator, *p.tokens)]
        return [*quoted, *self.separator], passages

    def cue(self, memory: ContextMemory, query: list[int]) -> tuple[list[int], list[Passage]]:
        """What to read instead of ``query``: the recalled passages (in stream order, each
        after the separator), the separator, the query; and the passages."""
        quoted, passages = self.quote(memory, query)
        return [*quoted, *query], passages

    def read(self, engine: Engine, state: State | None, memory: ContextMemory,
             tokens: list[int], *, every_chunk: bool = False) -> tuple[State, int]:
        """Read ``tokens`` into ``state`` (``None``: a new one) and record them in
        ``memory``. ``every_chunk`` (``rag="chunk"``): before each chunk of them, on the grid
        of ``engine.chunk`` recorded tokens, quote what the last ``query_len`` recorded tokens
        recall. Returns the state and the number of quoted tokens read."""
        if not every_chunk:
            _, state = engine.prefill([tokens], state)
            memory.extend(tokens)
            return state, 0
        # The memory learns each piece before the next recall; the engine reads everything
        # between two quotes in one prefill (so without a quote this is rag="off" exactly).
        quoted_total, i, step, pending = 0, 0, engine.chunk, []
        while i < len(tokens):
            piece = tokens[i:i + step - len(memory) % step]
            if len(memory) % step == 0 and memory.passages:
                quoted, _ = self.quote(memory, memory.tokens[-self.query_len:])
                if quoted and pending:
                    _, state = engine.prefill([pending], state)
                    pending = []
                pending += quoted
                quoted_total += len(quoted)
            pending += piece
            memory.extend(piece)
            i += len(piece)
        _, state = engine.prefill([pending], state)
        return state, quoted_total


class RecallSession:
    """One sequence read by ``engine``, with a :class:`ContextMemory` of what left its window.

    Args:
        engine: the :class:`~tttlm.inference.Engine` (a sliding-window model: ``e2e``/``swa``).
        rag: ``"end"``, ``"chunk"`` (also while reading, before each chunk) or ``"off"``.
        budget: tokens of quoted passages per recall (default ``window // 4``).
        query_len: prompt tokens used as the query.
        k: passages considered per recall.
        separator: tokens read before each quoted passage and before the query (default:
            ``[bos_token_id]``).
        index: the passage index of a new memory: ``"fts5"``, ``"bm25"`` or ``"dense"`` (the
            model's own hidden states through faiss); default: fts5, else bm25.
        horizon: a new memory indexes passages once they are this many tokens old (at most
            the window; default: the window, i.e. what attention no longer sees). Shorter
            also quotes what is still in the window but far from the query.
        state, memory: continue a session (default: new).
    """

    def __init__(self, engine: Engine, rag: str = "end", *, budget: int | None = None,
                 query_len: int = 32, k: int = 8, separator: Sequence[int] | None = None,
                 index: str | None = None, horizon: int | None = None,
                 state: State | None = None, memory: ContextMemory | None = None) -> None:
        if rag not in RAG_MODES:
            raise UserError(f"rag={rag!r} is not one of {', '.join(RAG_MODES)}")
        self.engine, self.rag = engine, rag
        self.policy = RecallPolicy.for_engine(engine, budget=budget, query_len=query_len, k=k,
                                              separator=separator, index=index,
                                              horizon=horizon)
        self.state = state if state is not None else engine.new_state(1)
        if self.state.batch_size != 1:
            raise UserError(f"a recall session holds one sequence, the state has "
                            f"{self.state.batch_size}; select one row (State.select)")
        self.memory = memory if memory is not None else self.policy.new_memory(engine)
        self.last_recall: list[Passage] = []
        self.last_greedy = True
        self.quoted_while_reading = 0  # tokens quoted before chunks (rag="chunk")

    def read(self, tokens: Sequence[int]) -> None:
        """Read a document (no generation): into the state and the memory; with
        ``rag="chunk"``, recalling before each chunk."""
        tokens = [int(t) for t in tokens]
        if tokens:
            self.state, quoted = self.policy.read(self.engine, self.state, self.memory, tokens,
                                                  every_chunk=self.rag == "chunk")
            self.quoted_while_reading += quoted

    def stream(self, prompt: Sequence[int], max_new_tokens: int, **sampling: Any
               ) -> RecallStream:
        """Read ``prompt`` (recalling before its query unless ``rag="off"``) now, and return
        the new tokens as they come (an iterator of one-token lists, like
        :meth:`Engine.stream`); the session takes the new state and records the new tokens in
        its memory when the iteration ends. The keyword arguments are :meth:`Engine.stream`'s
        sampling settings."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        quoted_before = self.quoted_while_reading
        fed, recorded = self._cue(prompt)
        read = (len(prompt) - len(recorded) + self.quoted_while_reading - quoted_before
                + len(fed))
        return RecallStream(self, self.engine.stream([fed], max_new_tokens, state=self.state,
                                                     **sampling), recorded, read)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **sampling: Any) -> list[int]:
        """Read ``prompt`` (recalling before its query unless ``rag="off"``) and generate; the
        keyword arguments are :meth:`Engine.generate`'s sampling settings."""
        stream = self.stream(prompt, max_new_tokens, **sampling)
        for _ in stream:
            pass
        return list(stream.tokens[0])

    def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        """Read ``prompt`` as :meth:`generate` does (recalling before its query), then the
        ``continuation`` token by token: the NLL of each continuation token (nats)."""
        import torch

        prompt, continuation = [int(t) for t in prompt], [int(t) for t in continuation]
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        fed, recorded = self._cue(prompt)
        logits, self.state = self.engine.prefill([fed], self.state)
        nll = []
        self.last_greedy = True  # whether every continuation token was the argmax
        for token in continuation:
            logp = torch.log_softmax(logits[0].double(), -1)
            nll.append(-float(logp[token]))
            self.last_greedy = self.last_greedy and int(logp.argmax()) == token
            logits, self.state = self.engine.step(self.state, [token])
        self.memory.extend([*recorded, *continuation])
        return nll

    def _cue(self, prompt: list[int]) -> tuple[list[int], list[int]]:
        """What to feed after recalling for ``prompt`` (reading its head first), and what of
        it the memory records."""
        self.last_recall = []
        if self.rag == "off":
            return prompt, prompt
        head, query = self.policy.split(prompt)
        self.read(head)
        fed, self.last_recall = self.policy.cue(self.memory, query)
        return fed, query

    # ------------------------------------------------------------------------- files
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """The state (``folder/state``) and the memory (``folder/memory``)."""
        out = Path(folder)
        self.state.save(out / "state")
        self.memory.save(out / "memory")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str], engine: Engine, **options: Any
             ) -> RecallSession:
        """Continue a session written by :meth:`save` on ``engine``'s model; ``options`` as
        the constructor takes them (``index``: the memory's index kind, as it was saved)."""
        src = Path(folder)
        state = State.load(src / "state", engine.model)
        memory = ContextMemory.load(src / "memory", new_index(options.get("index"), engine.model))
        return cls(engine, state=state, memory=memory, **options)


class RecallStream:
    """:meth:`RecallSession.stream`'s tokens: iterate for ``[token]`` lists; ``tokens``,
    ``finish_reasons`` and ``state`` as :class:`~tttlm.inference.engine.TokenStream`'s.
    ``read`` is the number of tokens the prompt put into the window: the prompt, the passages
    quoted for it and their separators."""

    def __init__(self, session: RecallSession, stream: Any, recorded: list[int],
                 read: int) -> None:
        self.session, self.inner, self.read = session, stream, read
        self._recorded: list[int] | None = recorded

    def __iter__(self) -> RecallStream:
        return self

    def __next__(self) -> list[int]:
        try:
            return next(self.inner)
        except StopIteration:
            if self._recorded is not None:  # the session advances once, at the end
                self.session.state = self.inner.state
                self.session.memory.extend([*self._recorded, *self.inner.tokens[0]])
                self._recorded = None
            raise

    @property
    def tokens(self) -> list[list[int]]:
        return self.inner.tokens

    @property
    def finish_reasons(self) -> list[str]:
        return self.inner.finish_reasons

    @property
    def state(self) -> State:
        return self.inner.state
