"""Turn text corpora into flat, memory-mappable token shards plus a ``meta.json``.

Layout of a prepared folder::

    meta.json            tokenizer, dtype, splits, shards, document offsets (see ``prepare``)
    tokenizer.json       the tokenizer, when it is a Hugging Face one (or tokenizer.tiktoken)
    train_0000.bin ...   raw little-endian uint16 (vocab <= 65 536) or uint32 token ids
    val_0000.bin ...

Each split is one stream: every document is preceded by BOS and the documents follow each other
with nothing else between them, as in the official TTT-E2E data, so that the loss mask
``target != BOS`` skips exactly the unpredictable first token of each document.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tttlm.data.errors import DataError
from tttlm.data.meta import FORMAT, META_FILE, VERSION, read_meta
from tttlm.data.sources import Document, Errors, iter_documents, resolve_inputs
from tttlm.data.tokenizer import (
    HF_FILE,
    TIKTOKEN_FILE,
    Tokenizer,
    parse_train_spec,
    resolve_tokenizer,
    split_text,
)

SHARD_TOKENS = 1 << 28
"""Default tokens per shard file: 512 MiB of uint16, well under any filesystem's file limit."""

_BATCH_CHARS = 2_000_000
_BATCH_TEXTS = 1024
_PIECE_CHARS = 1 << 18


def tokenizer_spec(tokenizer: str | None, vocab_size: int | None) -> str:
    """Combine ``--tokenizer`` and ``--vocab-size`` into one spec.

    ``--vocab-size V`` alone means ``train:V``, and sizes a bare ``--tokenizer train``; a
    tokenizer that comes with its own vocabulary cannot be resized, so giving both is an error.
    """
    if vocab_size is not None and vocab_size <= 0:
        raise DataError(f"--vocab-size must be positive, got {vocab_size}")
    if tokenizer is None and vocab_size is None:
        raise DataError("no tokenizer: pass --tokenizer SPEC (bytes, train:V, a tokenizer "
                        "file) or --vocab-size V")
    if tokenizer is None or tokenizer == "train":
        if vocab_size is None:
            raise DataError("--tokenizer train needs a size: train:V or --vocab-size V")
        return f"train:{vocab_size}"
    if vocab_size is None:
        return tokenizer
    size = parse_train_spec(tokenizer)
    if size is None:
        raise DataError(f"--vocab-size {vocab_size} only sizes a trained tokenizer, but "
                        f"--tokenizer {tokenizer} has its own vocabulary")
    if size != vocab_size:
        raise DataError(f"--tokenizer {tokenizer} contradicts --vocab-size {vocab_size}")
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _SplitWriter:
    """Appends documents of one split to its shard files and records where each one starts."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.doc_offsets: list[int] = []
        self.doc_names: list[str] = []
        self.tokens = 0
        self.chars = 0
        self._fh: Any = None

    def add(self, ids: np.ndarray, doc: Document) -> None:
        self.doc_offsets.append(self.tokens)
        self.doc_names.append(doc.name)
        self.chars += len(doc.text)
        data = ids.astype(self.dtype)
        while len(data):
            if self._fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, data = data[:room], data[room:]
            self._fh.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._fh = open(self.directory / name, "wb")  # noqa: SIM115 - kept open across documents
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def entry(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": len(self.doc_offsets), "chars": self.chars,
                "shards": self.shards, "doc_offsets": self.doc_offsets,
                "doc_names": self.doc_names}


def _encoded(docs: Iterable[Document], tok: Tokenizer,
             bar: tqdm) -> Iterator[tuple[Document, np.ndarray]]:
    """Each document with its ids, in order.

    Text goes to the tokenizer in batches of about ``_BATCH_CHARS`` characters, long documents
    cut into pieces where the tokenizer allows it, so that every core has work and memory stays
    bounded even when one document is the whole corpus.
    """
    waiting: deque[tuple[Document, list[Any]]] = deque()
    texts: list[str] = []
    slots: list[tuple[list[Any], int]] = []
    chars = 0
    for doc in docs:
        pieces = split_text(doc.text, _PIECE_CHARS) if tok.splittable else [doc.text]
        parts: list[Any] = [None] * len(pieces)
        waiting.append((doc, parts))
        for j, piece in enumerate(pieces):
            texts.append(piece)
            slots.append((parts, j))
            chars += len(piece)
            if chars < _BATCH_CHARS and len(texts) < _BATCH_TEXTS:
                continue
            for (owner, k), ids in zip(slots, tok.encode_batch(texts)):
                owner[k] = ids
            bar.update(chars)
            texts, slots, chars = [], [], 0
            while waiting and waiting[0][1][-1] is not None:
                done, done_parts = waiting.popleft()
                yield done, np.concatenate(done_parts)
    for (owner, k), ids in zip(slots, tok.encode_batch(texts)):
        owner[k] = ids
    bar.update(chars)
    for done, done_parts in waiting:
        yield done, np.concatenate(done_parts)


def _clear_previous(out: Path, overwrite: bool) -> None:
    if not (out / META_FILE).exists():
        return
    if not overwrite:
        raise DataError(f"{out}: already holds prepared data; pass --overwrite to replace it")
    try:
        old = read_meta(out)
    except DataError:
        old = {}
    (out / META_FILE).unlink()
    stale = [s["file"] for split in old.get("splits", {}).values() for s in split["shards"]]
    for name in [*stale, HF_FILE, TIKTOKEN_FILE]:
        (out / name).unlink(missing_ok=True)


def prepare(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            tokenizer: str | None = None, *, vocab_size: int | None = None, val_docs: int = 0,
            errors: Errors = "strict", text_field: str = "text",
            shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out_dir`` and return the ``meta.json`` written there.

    Args:
        inputs: .txt files (one document each), .jsonl/.jsonl.gz files (one document per line,
            text in ``text_field``), .parquet files (one document per row) or folders of them.
        out_dir: the folder to write; created if missing.
        tokenizer: ``bytes``, ``train:V``, a tokenizer.json, a tiktoken file or a prepared
            folder (see :func:`tttlm.data.tokenizer.resolve_tokenizer`).
        vocab_size: ``V`` of a trained tokenizer (see :func:`tokenizer_spec`).
        val_docs: the last ``val_docs`` documents, in input order (files as given, folders
            sorted by path), form the ``val`` split; 0 writes no ``val`` split. Taking the tail
            rather than a random draw lets a held-out file be appended as the last input, and
            keeps the split stable when documents are added in front. A trained tokenizer sees
            only the training documents.
        errors: ``strict`` fails on undecodable bytes (naming file and byte offset); ``replace``
            substitutes U+FFFD.
        text_field: the JSON field or Parquet column holding the text.
        shard_tokens: the most tokens per shard file.
        overwrite: replace a prepared dataset already in ``out_dir``.
        progress: show progress bars.

    Every input is read and checked before any tokenizer work, so a bad line at the end of a
    large corpus fails in seconds. ``meta.json`` is written last: a folder without one is
    incomplete.
    """
    spec = tokenizer_spec(tokenizer, vocab_size)
    files = resolve_inputs(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")

    def documents() -> Iterator[Document]:
        return iter_documents(files, errors=errors, text_field=text_field)

    n_docs = n_chars = 0
    for doc in tqdm(documents(), desc="check inputs", unit="doc", disable=not progress):
        n_docs += 1
        n_chars += len(doc.text)
    if val_docs < 0 or val_docs >= n_docs:
        raise DataError(f"--val-docs {val_docs} must be in [0, {n_docs - 1}]: the corpus has "
                        f"{n_docs} document(s) and training needs at least one")
    n_train = n_docs - val_docs

    def train_texts() -> Iterator[str]:
        return (d.text for d in islice(documents(), n_train))

    tok = resolve_tokenizer(spec, train_texts=train_texts, train_docs=n_train, progress=progress)
    dtype = token_dtype(tok.vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out, overwrite)
    writers = {"train": _SplitWriter(out, "train", dtype, shard_tokens)}
    if val_docs:
        writers["val"] = _SplitWriter(out, "val", dtype, shard_tokens)
    bos = np.array([tok.bos_id], dtype=np.int64)
    max_id = tok.bos_id
    index = 0
    try:
        with tqdm(total=n_chars, desc="tokenize", unit="char", unit_scale=True,
                  disable=not progress) as bar:
            for doc, ids in _encoded(documents(), tok, bar):
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
                writers["train" if index < n_train else "val"].add(np.concatenate([bos, ids]), doc)
                index += 1
    finally:
        for writer in writers.values():
            writer.close()
    if max_id >= tok.vocab_size:
        raise DataError(f"tokenizer {spec} produced id {max_id} >= its vocab size "
                        f"{tok.vocab_size}")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {"spec": spec, **tok.save(out)},
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "max_token_id": max_id,
        "dtype": dtype.name,
        "join": "BOS before every document, one stream per split, no EOS",
        "inputs": [str(p) for p in inputs],
        "val_rule": f"last {val_docs} document(s) in input order",
        "splits": {name: w.entry() for name, w in writers.items()},
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / META_FILE)
    return meta
