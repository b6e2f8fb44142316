"""prepare(): inputs, BOS joining, splits, shards, dtypes, and every bad input's message."""

from __future__ import annotations

import gzip
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from tttlm.data import DataError, TokenDataset, load_tokenizer, prepare, read_meta
from tttlm.data.prepare import token_dtype, tokenizer_spec

DOCS = ["First document.\n", "Second one, a bit longer.\n", "Third: ünïcödé 🙂\n", "Fourth."]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines) if path.suffix == ".gz" else lines)
    return path


def stream(out: Path, split: str) -> np.ndarray:
    meta = read_meta(out)
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in shards])


def test_bos_before_every_document_and_val_is_the_tail(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl.gz", [{"text": d} for d in DOCS])
    meta = prepare([src], tmp_path / "out", "bytes", val_docs=1, progress=False)
    bos = 256
    train = stream(tmp_path / "out", "train")
    expected = np.concatenate([[bos, *d.encode()] for d in DOCS[:3]])
    np.testing.assert_array_equal(train, expected)
    np.testing.assert_array_equal(stream(tmp_path / "out", "val"), [bos, *DOCS[3].encode()])
    split = meta["splits"]["train"]
    assert split["doc_offsets"] == [0, 1 + len(DOCS[0].encode()),
                                    2 + len(DOCS[0].encode()) + len(DOCS[1].encode())]
    assert split["doc_names"] == [f"{src}:1", f"{src}:2", f"{src}:3"]
    assert split["tokens"] == len(train) and split["documents"] == 3
    assert meta["splits"]["val"]["doc_names"] == [f"{src}:4"]
    assert (meta["dtype"], meta["bos_id"], meta["max_token_id"]) == ("uint16", 256, 256)
    tok = load_tokenizer(tmp_path / "out")
    pieces = np.split(train, split["doc_offsets"][1:])
    assert [tok.decode(p.tolist()) for p in pieces] == DOCS[:3]


def test_loss_mask_skips_exactly_the_bos_targets(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    prepare([src], tmp_path / "out", "bytes", progress=False)
    ds = TokenDataset(tmp_path / "out", "train", seq_len=16)
    full = stream(tmp_path / "out", "train")
    for i in range(len(ds)):
        sample = ds[i]
        window = full[i * 16:i * 16 + 17]
        assert sample.input_ids.tolist() == window[:-1].tolist()
        assert sample.labels.tolist() == window[1:].tolist()
        assert sample.loss_mask.tolist() == (window[1:] != 256).tolist()
    masked = sum(int((~ds[i].loss_mask).sum()) for i in range(len(ds)))
    assert masked == sum(1 for o in read_meta(tmp_path / "out")["splits"]["train"]["doc_offsets"]
                         if 0 < o <= len(ds) * 16)


def test_trained_tokenizer_saved_beside_the_data(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d * 30} for d in DOCS])
    meta = prepare([src], tmp_path / "out", vocab_size=300, val_docs=1, progress=False)
    assert meta["tokenizer"]["spec"] == "train:300"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "out")
    assert (tok.bos_id, meta["bos_id"]) == (0, 0)
    train = stream(tmp_path / "out", "train")
    offsets = meta["splits"]["train"]["doc_offsets"]
    for doc, piece in zip(DOCS, np.split(train, offsets[1:])):
        assert piece[0] == tok.bos_id
        assert tok.decode(piece.tolist()) == doc * 30
    reused = prepare([src], tmp_path / "again", str(tmp_path / "out"), progress=False)
    assert reused["vocab_size"] == meta["vocab_size"]
    np.testing.assert_array_equal(stream(tmp_path / "again", "train")[:len(train)], train)


def test_dtype_follows_the_vocab(tmp_path: Path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    words = [f"w{i}" for i in range(70000)]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(["<s>", "</s>", *words])},
                                          unk_token="<s>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.add_special_tokens(["<s>", "</s>"])
    rust.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "a.txt"
    src.write_text("w0 w69999 w5")
    meta = prepare([src], tmp_path / "out", str(tmp_path / "tokenizer.json"), progress=False)
    assert meta["dtype"] == "uint32"
    assert stream(tmp_path / "out", "train").tolist() == [0, 2, 70001, 7]
    assert meta["max_token_id"] == 70001


def test_txt_folders_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / "b" / "2.txt").write_text("two")
    (tmp_path / "corpus" / "1.txt").write_text("one")
    (tmp_path / "corpus" / "c.txt").write_bytes(b"\xef\xbb\xbfthree")
    meta = prepare([tmp_path / "corpus"], tmp_path / "out", "bytes", progress=False)
    names = [Path(n).relative_to(tmp_path / "corpus").as_posix()
             for n in meta["splits"]["train"]["doc_names"]]
    assert names == ["1.txt", "b/2.txt", "c.txt"]
    assert bytes(t for t in stream(tmp_path / "out", "train") if t < 256) == b"onetwothree"


def test_shards_split_the_stream(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    prepare([src], tmp_path / "one", "bytes", progress=False)
    meta = prepare([src], tmp_path / "many", "bytes", shard_tokens=10, progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 10 for s in meta["splits"]["train"]["shards"])
    np.testing.assert_array_equal(stream(tmp_path / "many", "train"),
                                  stream(tmp_path / "one", "train"))
    one = TokenDataset(tmp_path / "one", "train", seq_len=7)
    many = TokenDataset(tmp_path / "many", "train", seq_len=7)
    for i in range(len(one)):
        np.testing.assert_array_equal(one.window(i), many.window(i))


def test_overwrite(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    prepare([src], tmp_path / "out", "bytes", shard_tokens=10, progress=False)
    with pytest.raises(DataError, match=r"out: already holds prepared data; pass --overwrite"):
        prepare([src], tmp_path / "out", "bytes", progress=False)
    prepare([src], tmp_path / "out", "bytes", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train_0000.bin"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": DOCS, "n": list(range(4))}), tmp_path / "c.parquet")
    meta = prepare([tmp_path / "c.parquet"], tmp_path / "out", "bytes", text_field="body",
                   progress=False)
    assert meta["splits"]["train"]["documents"] == 4
    with pytest.raises(DataError, match=r"c\.parquet: no 'text' column \(columns: body, n\)"):
        prepare([tmp_path / "c.parquet"], tmp_path / "x", "bytes", progress=False)
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet:row 1: column 'text' is null"):
        prepare([tmp_path / "null.parquet"], tmp_path / "y", "bytes", progress=False)


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"c\.parquet: reading Parquet needs pyarrow: pip install"):
        prepare([tmp_path / "c.parquet"], tmp_path / "out", "bytes", progress=False)


def _bad_inputs(tmp: Path) -> list[tuple[list[Path], str]]:
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "blank.txt").write_text(" \n\n")
    (tmp / "bad.txt").write_bytes(b"hello\xffworld")
    write_jsonl(tmp / "nofield.jsonl", [{"text": "ok"}, {"body": "x", "id": 3}])
    write_jsonl(tmp / "emptytext.jsonl.gz", [{"text": "ok"}, {"text": ""}])
    write_jsonl(tmp / "notobj.jsonl", [{"text": "ok"}, ["text"]])
    (tmp / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp / "badutf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "a\xc3"}\n')
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n' * 50)[:-12])
    (tmp / "nothing").mkdir()
    (tmp / "notes.md").write_text("# hi")
    return [
        ([tmp / "empty.txt"], r"empty\.txt: empty file$"),
        ([tmp / "blank.txt"], r"blank\.txt: empty file$"),
        ([tmp / "bad.txt"], r"bad\.txt: invalid UTF-8 at byte offset 5; pass --errors replace"),
        ([tmp / "nofield.jsonl"], r"nofield\.jsonl:2: no 'text' field \(keys: body, id\)"),
        ([tmp / "emptytext.jsonl.gz"], r"emptytext\.jsonl\.gz:2: empty 'text'$"),
        ([tmp / "notobj.jsonl"], r"notobj\.jsonl:2: expected a JSON object, got list"),
        ([tmp / "badjson.jsonl"], r"badjson\.jsonl:2: invalid JSON \(Expecting value, column 10\)"),
        ([tmp / "badutf8.jsonl"], r"badutf8\.jsonl:2: invalid UTF-8 at byte offset 26"),
        ([tmp / "empty.jsonl"], r"empty\.jsonl: empty file$"),
        ([tmp / "trunc.jsonl.gz"], r"trunc\.jsonl\.gz: corrupt gzip file"),
        ([tmp / "nothing"], r"nothing: folder holds no \.txt, \.jsonl, \.jsonl\.gz, \.parquet"),
        ([tmp / "notes.md"], r"notes\.md: unsupported input type"),
        ([tmp / "missing.txt"], r"missing\.txt: no such file or folder"),
        ([], r"no input given"),
    ]


def test_every_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    for inputs, message in _bad_inputs(tmp_path):
        with pytest.raises(DataError, match=message) as info:
            prepare(inputs, tmp_path / "out", "bytes", progress=False)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out" / "meta.json").exists()


def test_errors_replace_keeps_going(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"hello\xffworld")
    prepare([tmp_path / "bad.txt"], tmp_path / "out", "bytes", errors="replace", progress=False)
    tok = load_tokenizer(tmp_path / "out")
    assert tok.decode(stream(tmp_path / "out", "train").tolist()) == "hello\ufffdworld"


def test_val_docs_must_leave_training_documents(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    with pytest.raises(DataError, match=r"--val-docs 4 must be in \[0, 3\]: the corpus has 4"):
        prepare([src], tmp_path / "out", "bytes", val_docs=4, progress=False)


@pytest.mark.parametrize(("tokenizer", "size", "expected"), [
    (None, 512, "train:512"), ("train", 512, "train:512"), ("train:512", 512, "train:512"),
    ("train:512", None, "train:512"), ("bytes", None, "bytes"), (None, None, "bytes"),
])
def test_vocab_size_flag(tokenizer: str | None, size: int | None, expected: str) -> None:
    assert tokenizer_spec(tokenizer, size) == expected


@pytest.mark.parametrize(("tokenizer", "size", "message"), [
    ("train", None, r"--tokenizer train needs a size: train:V or --vocab-size V"),
    ("bytes", 512, r"--vocab-size 512 only sizes a trained tokenizer"),
    ("train:256", 512, r"--tokenizer train:256 contradicts --vocab-size 512"),
])
def test_vocab_size_flag_errors(tokenizer: str | None, size: int | None, message: str) -> None:
    with pytest.raises(DataError, match=message):
        tokenizer_spec(tokenizer, size)


def test_long_documents_are_encoded_in_pieces_exactly(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    prepare_module = importlib.import_module("tttlm.data.prepare")
    docs = [d * 40 for d in DOCS]
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    whole = prepare([src], tmp_path / "whole", "train:300", progress=False)
    monkeypatch.setattr(prepare_module, "_PIECE_CHARS", 16)
    monkeypatch.setattr(prepare_module, "_BATCH_CHARS", 50)
    cut = prepare([src], tmp_path / "cut", str(tmp_path / "whole"), progress=False)
    assert cut["splits"]["train"]["doc_offsets"] == whole["splits"]["train"]["doc_offsets"]
    np.testing.assert_array_equal(stream(tmp_path / "cut", "train"),
                                  stream(tmp_path / "whole", "train"))
    tok = load_tokenizer(tmp_path / "cut")
    expected = np.concatenate([[tok.bos_id, *tok.encode(d)] for d in docs])
    np.testing.assert_array_equal(stream(tmp_path / "cut", "train"), expected)
