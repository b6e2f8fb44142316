"""The public-domain book set that ships with tttlm (see resources/books/README.md)."""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path
from typing import Any

from tttlm.data.errors import DataError

DEFAULT_TOKENIZER = "train:4096"
"""A vocabulary small enough for CPU-sized models, large enough that a token is ~3.5 characters."""


def builtin_books_paths() -> dict[str, Path]:
    """``{"train": ..., "val": ...}``: the JSON-lines files of the built-in books."""
    root = resources.files("tttlm") / "resources" / "books"
    paths = {split: Path(str(root / f"{split}.jsonl.gz")) for split in ("train", "val")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"the built-in books are missing from this tttlm installation: "
                        f"{', '.join(missing)}")
    return paths


def prepare_builtin(out_dir: str | os.PathLike[str], tokenizer: str = DEFAULT_TOKENIZER, *,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare the built-in books into ``out_dir``: ``train`` and the held-out ``val`` books.

    The val file goes last and ``val_docs`` is its document count, so the "last N documents"
    rule of :func:`tttlm.data.prepare` reproduces the shipped split exactly, and a trained
    tokenizer never sees the held-out books. Like ``prepare``, the folder is assembled beside
    ``out_dir`` and swapped in only when complete.
    """
    from tttlm.data.prepare import prepare  # numpy and the tokenizers: only when preparing

    paths = builtin_books_paths()
    with gzip.open(paths["val"], "rb") as fh:
        val_docs = sum(1 for line in fh if line.strip())
    return prepare([paths["train"], paths["val"]], out_dir, tokenizer, val_docs=val_docs,
                   overwrite=overwrite, progress=progress)
