"""The few calls evaluation makes into the data pipeline and the inference engine.

Both packages were written alongside this one; every call into them goes through this module so
that a change of their API is a one-line fix here. What is assumed of each:

- ``tttlm.data.tokenizer.resolve_tokenizer(spec)`` takes ``bytes``, a ``tokenizer.json``, a
  tiktoken file or a folder holding a ``tokenizer.json``/``meta.json`` and returns an object
  with ``encode(text) -> list[int]`` (no BOS/EOS added), ``decode(ids) -> str``, ``bos_id``,
  ``eos_id`` and ``vocab_size``.
- ``tttlm.data.dataset.TokenDataset(dir, split, seq_len)`` exposes ``doc_offsets``,
  ``num_tokens``, ``bos_id`` and ``tokens(start, stop)``; a split's stream is every document
  preceded by BOS, which is also how :func:`tokenize_documents` builds one from text.
- ``tttlm.data.books.builtin_books_paths()`` returns ``{"train": path, "val": path}``.
- ``tttlm.inference.Engine(model, ttt=...)`` with ``prefill([ids]) -> (logits [1, V], state)``,
  ``step(state, [token]) -> (logits [1, V], state)`` and ``state.clone()``; a target equal to
  BOS is left out of the inner loss, as in :mod:`tttlm.eval.loss`. Its caches keep the model's
  dtype under autocast.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from tttlm.errors import UserError
from tttlm.model import TTTForCausalLM

if TYPE_CHECKING:
    from tttlm.inference import Engine, State

META_FILE = "meta.json"


class EvalError(UserError):
    """Bad evaluation input (lengths, kinds, data, models); the message says what to change."""


class Tokenizer(Protocol):
    """What evaluation needs of a tokenizer (the data pipeline's :class:`Tokenizer` fits)."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ------------------------------------------------------------------------------ tokenizers
def resolve_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring), as an :class:`EvalError`."""
    from tttlm.data.errors import DataError
    from tttlm.data.tokenizer import resolve_tokenizer as _resolve

    try:
        return _resolve(str(spec))
    except DataError as err:
        raise EvalError(str(err)) from None


def has_tokenizer(directory: str | os.PathLike[str]) -> bool:
    """Whether a model (or prepared data) folder carries its own tokenizer files."""
    path = Path(directory)
    return any((path / name).is_file()
               for name in ("tokenizer.json", "tokenizer.tiktoken", META_FILE))


# ---------------------------------------------------------------------------- token corpora
@dataclass
class TokenCorpus:
    """A token stream (every document preceded by BOS) with its document boundaries.

    Attributes:
        tokens: ``[N]`` integer ids (a memory map for prepared data).
        doc_offsets: ``[n_docs]`` index of each document's first token (its BOS) in ``tokens``.
        bos_id: the id that starts every document; a target equal to it is not counted.
        source: what the stream was read from, for reports.
        fingerprint: a short hash identifying the stream, to key resumable results.
        doc_names: a name per document (file and line), when known.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    bos_id: int
    source: str
    fingerprint: str
    doc_names: list[str] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def doc_lengths(self) -> np.ndarray:
        """``[n_docs]`` tokens of each document, its BOS included."""
        ends = np.append(self.doc_offsets[1:], self.num_tokens)
        return ends - self.doc_offsets


def load_prepared(directory: str | os.PathLike[str], split: str | None = None) -> TokenCorpus:
    """The stream of one split of a prepared folder (default: ``val`` if it has one)."""
    from tttlm.data.dataset import TokenDataset
    from tttlm.data.errors import DataError
    from tttlm.data.meta import read_meta

    path = Path(directory)
    try:
        meta = read_meta(path)
        splits = meta["splits"]
        if split is None:
            split = "val" if "val" in splits else "train"
            if split == "train":
                warnings.warn(f"{path} has no val split: evaluating on its training split "
                              "(pass --split to choose)", stacklevel=2)
        dataset = TokenDataset(path, split, seq_len=1)
        tokens = dataset.tokens(0, dataset.num_tokens)
    except DataError as err:
        raise EvalError(str(err)) from None
    digest = hashlib.sha256((path / META_FILE).read_bytes() + split.encode()).hexdigest()[:16]
    return TokenCorpus(tokens=tokens, doc_offsets=np.asarray(dataset.doc_offsets, np.int64),
                       bos_id=int(dataset.bos_id), source=f"{path} (split {split})",
                       fingerprint=digest,
                       doc_names=splits[split].get("doc_names"))


def read_documents(path: str | os.PathLike[str], text_field: str = "text") -> list[tuple[str, str]]:
    """``(name, text)`` of every document of a .txt/.jsonl/.jsonl.gz/.parquet file or folder."""
    from tttlm.data.errors import DataError
    from tttlm.data.sources import iter_documents, resolve_inputs

    try:
        return [(d.name, d.text) for d in iter_documents(resolve_inputs([path]),
                                                         text_field=text_field)]
    except DataError as err:
        raise EvalError(str(err)) from None


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                       source: str) -> TokenCorpus:
    """Encode documents into one stream, BOS before each, as ``tttlm data prepare`` does."""
    parts: list[np.ndarray] = []
    offsets: list[int] = []
    total = 0
    encode_batch = getattr(tokenizer, "encode_batch", None)
    texts = [text for _, text in docs]
    encoded = (encode_batch(texts) if encode_batch is not None
               else [np.asarray(tokenizer.encode(t), np.int64) for t in texts])
    for ids in encoded:
        offsets.append(total)
        part = np.concatenate([[tokenizer.bos_id], np.asarray(ids, np.int64)])
        parts.append(part)
        total += len(part)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    digest = hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()[:16]
    return TokenCorpus(tokens=tokens, doc_offsets=np.asarray(offsets, np.int64),
                       bos_id=int(tokenizer.bos_id), source=source, fingerprint=digest,
                       doc_names=[name for name, _ in docs])


def builtin_books(split: str = "val") -> list[Path]:
    """Files of the public-domain books shipped with tttlm (the default NIAH haystack)."""
    from tttlm.data.books import builtin_books_paths
    from tttlm.data.errors import DataError

    try:
        return [Path(builtin_books_paths()[split])]
    except DataError as err:
        raise EvalError(f"{err}; pass --haystack FILE") from None


# ------------------------------------------------------------------------------ generation
def generate_and_score(model: TTTForCausalLM, prompt: Sequence[int], max_new_tokens: int,
                       answer: Sequence[int] = (), *, ttt: bool | None = None,
                       eos_id: int | None = None) -> tuple[list[int], float | None]:
    """Greedy continuation of ``prompt`` (cut before EOS) and ``log p(answer | prompt)``.

    The prompt is prefilled once and the state cloned: one copy decodes greedily, the other
    reads the answer teacher-forced. At long context this halves the work of two passes.
    ``answer=()`` skips the log-probability (``None``). One row of
    :func:`generate_and_score_batch`.
    """
    return generate_and_score_batch(model, [prompt], [max_new_tokens], [answer], ttt=ttt,
                                    eos_id=eos_id)[0]


def generate_and_score_batch(model: TTTForCausalLM, prompts: Sequence[Sequence[int]],
                             max_new_tokens: Sequence[int],
                             answers: Sequence[Sequence[int]], *, ttt: bool | None = None,
                             eos_id: int | None = None, cuda_graphs: bool = False
                             ) -> list[tuple[list[int], float | None]]:
    """:func:`generate_and_score` for several prompts in one batch: one prefill, then every
    decoding step reads one token for each row still going (the engine's ``active`` rows), so
    a step costs about what one row's does when decoding is bound by kernel launches. Rows
    with an empty answer get ``None``. ``cuda_graphs``: the engine's
    (:class:`~tttlm.inference.Engine`)."""
    from tttlm.inference import Engine

    if not (len(max_new_tokens) == len(answers) == len(prompts)):
        raise ValueError("give one max_new_tokens and one answer per prompt")
    engine = Engine(model, ttt=ttt, cuda_graphs=cuda_graphs)
    first, state = engine.prefill([list(p) for p in prompts])  # [B, V] logits after each
    return decode_and_score(engine, first, state, max_new_tokens, answers, eos_id=eos_id)


def decode_and_score(engine: Engine, first: torch.Tensor, state: State,
                     max_new_tokens: Sequence[int], answers: Sequence[Sequence[int]], *,
                     eos_id: int | None = None) -> list[tuple[list[int], float | None]]:
    """From ``state`` and its next-token logits ``first [B, V]``: each row's greedy
    continuation (cut before EOS) and ``log p(answer | what was read)``, the state cloned
    for the second (see :func:`generate_and_score_batch`)."""
    B = state.batch_size
    scored = state.clone() if any(answers) else None
    outs: list[list[int]] = [[] for _ in range(B)]
    logits, going = first, [r for r in range(B) if max_new_tokens[r] > 0]
    while going:
        tokens = [0] * B
        stepping = []
        for r in going:
            token = int(logits[r].argmax())
            if token == eos_id:
                continue
            outs[r].append(token)
            if len(outs[r]) < max_new_tokens[r]:
                tokens[r] = token
                stepping.append(r)
        if stepping:
            logits, state = engine.step(state, tokens, active=stepping)
        going = stepping
    totals = [0.0] * B
    if scored is not None:
        logits, i = first, 0
        while True:
            reading = [r for r in range(B) if i < len(answers[r])]
            for r in reading:
                totals[r] += float(torch.log_softmax(logits[r].double(), -1)[answers[r][i]])
            stepping = [r for r in reading if i + 1 < len(answers[r])]
            if not stepping:
                break
            tokens = [answers[r][i] if r in stepping else 0 for r in range(B)]
            logits, scored = engine.step(scored, tokens, active=stepping)
            i += 1
    return [(out, total if answer else None) for out, total, answer in zip(outs, totals, answers)]
