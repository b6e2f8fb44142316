"""The built-in books ship with the package and prepare into train + held-out val."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tttlm.data import TokenDataset, builtin_books_paths, load_tokenizer, prepare_builtin


def test_builtin_books_are_packaged() -> None:
    paths = builtin_books_paths()
    assert set(paths) == {"train", "val"}
    with gzip.open(paths["val"], "rt", encoding="utf-8") as fh:
        val = [json.loads(line) for line in fh]
    assert [r["id"] for r in val] == ["austen-persuasion.txt", "northangerabbey", "hamlet_gut.txt"]
    assert sum(p.stat().st_size for p in paths.values()) < 4_000_000


def test_prepare_builtin(tmp_path: Path) -> None:
    meta = prepare_builtin(tmp_path / "books", "bytes", progress=False)
    assert meta["splits"]["val"]["documents"] == 3
    assert meta["splits"]["train"]["documents"] > 50
    assert meta["splits"]["val"]["doc_names"][-1].endswith("val.jsonl.gz:3")
    val = TokenDataset(tmp_path / "books", "val", seq_len=4096)
    tok = load_tokenizer(tmp_path / "books")
    start = val.doc_offsets[2]
    hamlet = tok.decode(val.tokens(start, start + 40).tolist())
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
