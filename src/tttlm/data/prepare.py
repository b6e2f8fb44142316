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

import contextlib
import hashlib
import json
import os
import re
import shutil
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tttlm.data.errors import DataError
from tttlm.data.meta import FORMAT, META_FILE, VERSION
from tttlm.data.sources import Document, Errors, iter_documents, resolve_inputs
from tttlm.data.tokenizer import Tokenizer, parse_train_spec, resolve_tokenizer, split_text
from tttlm.errors import UserError, describe_os_error
from tttlm.files import (
    FolderLock,
    commit_dir,
    recover_dir,
    staging_dir,
)
from tttlm.progress import progress_bar

SHARD_TOKENS = 1 << 28
"""Default tokens per shard file: 512 MiB of uint16, well under any filesystem's file limit."""

DEFAULT_TOKENIZER = "bytes"
"""The tokenizer of ``tttlm data prepare`` without ``--tokenizer``: needs no training and
round-trips any text; ``train:V`` gives shorter sequences."""

_BATCH_CHARS = 2_000_000
_BATCH_TEXTS = 1024
_PIECE_CHARS = 1 << 18


def tokenizer_spec(tokenizer: str | None, vocab_size: int | None) -> str:
    """Combine ``--tokenizer`` and ``--vocab-size`` into one spec.

    ``--vocab-size V`` alone means ``train:V``, and sizes a bare ``--tokenizer train``; a
    tokenizer that comes with its own vocabulary cannot be resized, so giving both is an error.
    Neither gives :data:`DEFAULT_TOKENIZER`.
    """
    if vocab_size is not None and vocab_size <= 0:
        raise DataError(f"--vocab-size must be positive, got {vocab_size}")
    if tokenizer is None and vocab_size is None:
        return DEFAULT_TOKENIZER
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
             bar: Any) -> Iterator[tuple[Document, np.ndarray]]:
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


_TRAIN, _VAL, _DUPLICATE = 0, 1, 2
_DATA_FILE = re.compile(r"meta\.json(\.tmp)?|tokenizer\.json|tokenizer\.tiktoken|"
                        r"[A-Za-z0-9-]+_\d{4,}\.bin|\.tttlm\.lock")
"""Names a prepared folder may hold; ``--overwrite`` refuses to replace a folder with others."""
_EXAMPLES = 5


def _target(out_dir: str | os.PathLike[str]) -> Path:
    """The absolute, symlink-free ``--out``: the folder that will be swapped."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose a folder for --out")
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise DataError(f"{out}: is the current folder or holds it, and prepared data replaces "
                        "--out as a whole; run from outside it or choose another --out")
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or (with ``overwrite``) prepared data."""
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    foreign = [n for n in names if not _DATA_FILE.fullmatch(n) or not (out / n).is_file()]
    if foreign:
        listed = ", ".join(foreign[:_EXAMPLES])
        more = f" and {len(foreign) - _EXAMPLES} more" if len(foreign) > _EXAMPLES else ""
        raise DataError(f"{out}: is not empty and holds files that are not prepared data "
                        f"({listed}{more}); choose an empty or new folder for --out")
    if not overwrite:
        what = ("already holds prepared data" if META_FILE in names
                else "holds the shards of an unfinished prepare (no meta.json)")
        raise DataError(f"{out}: {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Own ``out`` for the whole run.

    The lock is a sibling, ``.<name>.lock/`` beside ``out``, not a file inside it: ``out`` is
    replaced as a whole when the new data is in place, and a lock inside would leave with the
    old folder while this run still needs it. Crashed runs leave nothing to clean by hand: the
    kernel drops the lock with the process, and their staging folders are removed here.
    """
    lock = FolderLock(out.with_name(f".{out.name}.lock"), "data prepare")
    try:
        lock.acquire()
    except UserError as err:
        raise DataError(str(err).replace(str(lock.directory), str(out), 1)) from None
    try:
        recover_dir(out)
        _remove_stale_staging(out)
        yield
    finally:
        lock.release()


def _remove_stale_staging(out: Path) -> None:
    """Delete the staging folders of crashed runs for ``out`` (the lock is held), and only
    theirs: ``files.remove_stale_staging``'s ``.tmp-<name>-*`` would also match the live
    staging folder of a run for a sibling named ``<name>-2``."""
    own = re.compile(rf"\.tmp-{re.escape(out.name)}-\d+-[0-9a-f]{{8}}")
    for path in out.parent.glob(".tmp-*"):
        if own.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _check_val(val_docs: int, val_fraction: float | None) -> None:
    if val_fraction is None:
        return
    if val_docs:
        raise DataError(f"--val-docs {val_docs} and --val-fraction {val_fraction:g} both choose "
                        "the val split; pass only one of them")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction:g} must be in [0, 1): the share of "
                        "documents held out for val")


def _scan(docs: Iterable[Document], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read every document once (which checks the whole corpus) and return each one's
    BLAKE2b-128 content hash ``[N, 2]`` (uint64) and length in characters ``[N]``."""
    digests = bytearray()
    lengths = array("q")
    with progress_bar(iterable=docs, desc="check inputs", unit="doc",
                      disable=not progress) as bar:
        for doc in bar:
            digests += hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
            lengths.append(len(doc.text))
    return (np.frombuffer(digests, dtype="<u8").reshape(-1, 2),
            np.frombuffer(lengths, dtype=np.int64))


def _roles(digests: np.ndarray, val_docs: int, val_fraction: float | None
           ) -> tuple[np.ndarray, dict[int, int], str]:
    """Each document's role (train, val or duplicate), some dropped duplicates with the copy
    kept in their place ``{dropped: kept}``, and the val rule in words.

    Of documents with the same text only the last is kept, so that a held-out file given last
    keeps all its documents even when the same texts also came earlier (a folder given whole
    and one of its files again, say): no text is ever in both splits.
    """
    n_all = len(digests)
    roles = np.full(n_all, _TRAIN, dtype=np.uint8)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal texts by position
    ordered = digests[order]
    same_as_next = np.all(ordered[1:] == ordered[:-1], axis=1)
    roles[order[:-1][same_as_next]] = _DUPLICATE
    run_ends = np.flatnonzero(np.append(~same_as_next, True))  # the kept copy of each text
    examples = {int(order[pos]): int(order[run_ends[np.searchsorted(run_ends, pos)]])
                for pos in np.flatnonzero(same_as_next)[:_EXAMPLES]}
    kept = np.flatnonzero(roles != _DUPLICATE)
    n = len(kept)
    dropped = n_all - n
    counted = (f"the corpus has {n} document(s)"
               + (f" once {dropped} duplicate(s) are dropped" if dropped else ""))
    if val_fraction:
        k = max(1, round(val_fraction * n))
        if k >= n:
            raise DataError(f"--val-fraction {val_fraction:g} leaves no training document: "
                            f"{counted}; pass a smaller fraction or more documents")
        by_hash = kept[np.lexsort((digests[kept, 1], digests[kept, 0]))]
        roles[by_hash[:k]] = _VAL
        rule = (f"the {k} document(s) ({val_fraction:g} of {n}) with the smallest BLAKE2b-128 "
                "hash of their UTF-8 text: chosen by content alone, so the same texts give the "
                "same split in any order")
    elif val_docs:
        if not 0 < val_docs < n:
            raise DataError(f"--val-docs {val_docs} must be in [0, {n - 1}]: {counted} and "
                            "training needs at least one")
        roles[kept[n - val_docs:]] = _VAL
        rule = f"last {val_docs} document(s) in input order"
    else:
        rule = "none: no val split"
    return roles, examples, rule


def prepare(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            tokenizer: str | None = None, *, vocab_size: int | None = None, val_docs: int = 0,
            val_fraction: float | None = None, errors: Errors = "strict",
            text_field: str = "text", shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out_dir`` and return the ``meta.json`` written there.

    Args:
        inputs: .txt files (one document each), .jsonl/.jsonl.gz files (one document per line,
            text in ``text_field``), .parquet files (one document per row) or folders of them.
        out_dir: the folder to write: new, empty, or (with ``overwrite``) prepared data.
        tokenizer: ``bytes`` (the default when neither it nor ``vocab_size`` is given),
            ``train:V``, a tokenizer.json, a tiktoken file or a prepared folder (see
            :func:`tttlm.data.tokenizer.resolve_tokenizer`).
        vocab_size: ``V`` of a trained tokenizer (see :func:`tokenizer_spec`).
        val_docs: the last ``val_docs`` documents, in input order (files as given, folders
            sorted by path), form the ``val`` split; 0 writes no ``val`` split. Taking the tail
            rather than a random draw lets a held-out file be appended as the last input, and
            keeps the split stable when documents are added in front.
        val_fraction: instead of ``val_docs``, hold out ``round(F * N)`` documents (at least
            one): those with the smallest content hash, so the choice depends on the texts
            alone, not on their order or file names, and is spread over the whole corpus.
        errors: ``strict`` fails on undecodable bytes and on lone surrogates in JSON (naming
            file and line or byte offset); ``replace`` substitutes U+FFFD.
        text_field: the JSON field or Parquet column holding the text.
        shard_tokens: the most tokens per shard file.
        overwrite: replace a prepared dataset already in ``out_dir``.
        progress: show progress bars (on a terminal; a line every 10 s in a log).

    Documents with the same text are kept once, at their last place (``meta["duplicates"]``
    counts the others), so a file given twice, or a val text that also appears in training,
    ends up in one split only. A trained tokenizer sees only the training documents.

    Every input is read and checked before any tokenizer work, so a bad line at the end of a
    large corpus fails in seconds. The new folder is assembled beside ``out_dir``, flushed to
    disk and swapped in only when complete: a failure, Ctrl-C or a full disk leaves the old
    dataset as it was. ``out_dir`` is locked (see :func:`_locked`) while this runs.
    """
    spec = tokenizer_spec(tokenizer, vocab_size)
    files = resolve_inputs(inputs)
    out = _target(out_dir)
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    _check_val(val_docs, val_fraction)

    def documents() -> Iterator[Document]:
        return iter_documents(files, errors=errors, text_field=text_field)

    with _locked(out):
        _check_target(out, overwrite)
        digests, lengths = _scan(documents(), progress)
        roles, examples, val_rule = _roles(digests, val_docs, val_fraction)
        n_train = int(np.count_nonzero(roles == _TRAIN))

        def train_texts() -> Iterator[str]:
            return (d.text for d, role in zip(documents(), roles) if role == _TRAIN)

        tok = resolve_tokenizer(spec, train_texts=train_texts, train_docs=n_train,
                                progress=progress)
        duplicates = {"dropped": int(np.count_nonzero(roles == _DUPLICATE)),
                      "rule": "documents with the same text are kept once, at their last place",
                      "examples": []}
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": {"spec": spec},
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "max_token_id": None,
            "dtype": token_dtype(tok.vocab_size).name,
            "join": "BOS before every document, one stream per split, no EOS",
            "inputs": [str(p) for p in inputs],
            "val_rule": val_rule,
            "duplicates": duplicates,
            "splits": {},
        }
        stage: Path | None = None
        try:
            stage = staging_dir(out)
            _write(stage, documents(), tok, roles, lengths, examples, meta, shard_tokens,
                   progress)
            commit_dir(stage, out)
        except BaseException as err:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            with contextlib.suppress(OSError):
                recover_dir(out)
            if isinstance(err, OSError):
                kept = f"{out} is unchanged" if out.exists() else "nothing was written"
                message = describe_os_error(err, kept)
                if message is not None:
                    raise DataError(message) from err
            raise
    return meta


def _write(stage: Path, docs: Iterable[Document], tok: Tokenizer, roles: np.ndarray,
           lengths: np.ndarray, examples: dict[int, int], meta: dict[str, Any],
           shard_tokens: int, progress: bool) -> None:
    """Tokenize the documents into ``stage`` and complete ``meta`` (written last)."""
    dtype = np.dtype(meta["dtype"])
    writers = {"train": _SplitWriter(stage, "train", dtype, shard_tokens)}
    if np.any(roles == _VAL):
        writers["val"] = _SplitWriter(stage, "val", dtype, shard_tokens)
    kept_roles = roles[roles != _DUPLICATE]
    named = {*examples, *examples.values()}
    names: dict[int, str] = {}

    def kept() -> Iterator[Document]:
        for i, (doc, role) in enumerate(zip(docs, roles)):
            if i in named:
                names[i] = doc.name
            if role != _DUPLICATE:
                yield doc

    bos = np.array([tok.bos_id], dtype=np.int64)
    max_id = tok.bos_id
    try:
        with progress_bar(total=int(lengths[roles != _DUPLICATE].sum()), desc="tokenize",
                          unit="char", unit_scale=True, disable=not progress) as bar:
            for (doc, ids), role in zip(_encoded(kept(), tok, bar), kept_roles, strict=True):
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
                writers["val" if role == _VAL else "train"].add(np.concatenate([bos, ids]), doc)
    finally:
        for writer in writers.values():
            writer.close()
    if max_id >= tok.vocab_size:
        raise DataError(f"tokenizer {meta['tokenizer']['spec']} produced id {max_id} >= its "
                        f"vocab size {tok.vocab_size}; the tokenizer file is inconsistent: "
                        "use another tokenizer")
    meta["tokenizer"].update(tok.save(stage))
    meta["max_token_id"] = max_id
    meta["duplicates"]["examples"] = [{"dropped": names[d], "kept": names[k]}
                                      for d, k in examples.items()]
    meta["splits"] = {name: w.entry() for name, w in writers.items()}
    (stage / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
