"""Reading documents from text, JSON-lines and Parquet inputs.

Every problem with the input raises :class:`DataError` naming the file and the line, row or byte
offset: a corpus with a silently dropped file trains a different model than its author thinks.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from tttlm.data.errors import DataError

Errors = Literal["strict", "replace"]
SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


class Document(NamedTuple):
    """One document's text and where it came from (``path`` or ``path:line``/``path:row``)."""

    text: str
    name: str


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively, sorted by path) into the supported files they hold.

    Sorting makes the document order, and hence the train/val split, the same on every
    filesystem.
    """
    if not inputs:
        raise DataError("no input given: pass .txt/.jsonl/.jsonl.gz/.parquet files or folders")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise DataError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"{path}: unsupported input type; expected a folder or a file "
                                f"ending in {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def _decode(data: bytes, errors: Errors, where: str, base: int = 0) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: invalid UTF-8 at byte offset {base + err.start}; "
                        "pass --errors replace to substitute U+FFFD") from None


def _encodable(text: str, errors: Errors, where: str) -> str:
    """``text`` checked to be UTF-8 encodable: JSON can spell a lone surrogate (``"\\ud800"``),
    which no tokenizer can encode; ``replace`` substitutes U+FFFD for each one."""
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        if errors == "replace":
            return _SURROGATE.sub("\ufffd", text)
        raise DataError(f"{where}: lone surrogate \\u{ord(text[err.start]):04x} at character "
                        f"{err.start}, which UTF-8 cannot encode; pass --errors replace to "
                        "substitute U+FFFD") from None
    return text


def _empty(text: str) -> bool:
    return not text or text.isspace()


def _read_txt(path: Path, errors: Errors) -> Iterator[Document]:
    data = path.read_bytes()
    base = len(_BOM) if data.startswith(_BOM) else 0
    text = _decode(data[base:], errors, str(path), base)
    if _empty(text):
        raise DataError(f"{path}: empty file")
    yield Document(text, str(path))


def _read_jsonl(path: Path, errors: Errors, field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    records = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                line = _decode(raw, errors, where, offset)
                offset += len(raw)
                if line.isspace():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg}, column {err.colno})"
                                    ) from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got "
                                    f"{type(record).__name__}")
                if field not in record:
                    keys = ", ".join(map(str, record)) or "none"
                    raise DataError(f"{where}: no {field!r} field (keys: {keys}); "
                                    "choose the field with --text-field")
                text = record[field]
                if not isinstance(text, str):
                    raise DataError(f"{where}: field {field!r} is {type(text).__name__}, "
                                    "not a string")
                if _empty(text):
                    raise DataError(f"{where}: empty {field!r}")
                records += 1
                yield Document(_encodable(text, errors, where), where)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip file ({err})") from None
    if records == 0:
        raise DataError(f"{path}: empty file")


def _read_parquet(path: Path, errors: Errors, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'tttlm[parquet]'"
                        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no {field!r} column (columns: {', '.join(names) or 'none'}); "
                        "choose the column with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise DataError(f"{where}: column {field!r} is {kind}, not a string")
            if _empty(text):
                raise DataError(f"{where}: empty {field!r}")
            row += 1
            yield Document(_encodable(text, errors, where), where)
    if row == 0:
        raise DataError(f"{path}: empty file")


def iter_documents(files: Iterable[Path], *, errors: Errors = "strict",
                   text_field: str = "text") -> Iterator[Document]:
    """Yield every document of ``files`` in order: a .txt file is one document, a JSON line
    or a Parquet row is one document."""
    if errors not in ("strict", "replace"):
        raise DataError(f"unknown errors policy {errors!r}: expected 'strict' or 'replace'")
    for path in files:
        kind = _kind(path)
        try:
            if kind == ".txt":
                yield from _read_txt(path, errors)
            elif kind == ".parquet":
                yield from _read_parquet(path, errors, text_field)
            else:
                yield from _read_jsonl(path, errors, text_field)
        except OSError as err:  # unreadable (permissions, I/O error): name the input
            reason = err.strerror or type(err).__name__
            raise DataError(f"{path}: cannot read ({reason}); check that the file is readable"
                            ) from err
