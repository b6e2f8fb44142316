"""prepare() never loses the old dataset, names every bad input, and bounds its own costs.

One test per data item of issue #10: staging and swap (a failure, Ctrl-C or a full disk keeps
the old data), lone surrogates in JSON, fsync before the swap, the lock on --out, duplicates
dropped, tokenizer training on a pathological line, the default tokenizer, --val-fraction,
progress written to a pipe, and out-of-vocab ids in a shard.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tttlm.data import DataError, TokenDataset, load_tokenizer, prepare, prepare_builtin, read_meta
from tttlm.data.cli import add_parser
from tttlm.data.tokenizer import MAX_PRETOKEN_CHARS, ByteTokenizer, train_bpe
from tttlm.files import FolderLock

prepare_module = importlib.import_module("tttlm.data.prepare")
books_module = importlib.import_module("tttlm.data.books")

DOCS = ["First document.\n", "Second one, a bit longer.\n", "Third: ünïcödé 🙂\n", "Fourth."]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def stream(out: Path, split: str) -> np.ndarray:
    meta = read_meta(out)
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in shards])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Staging or swapped-out folders left beside the dataset (the lock folder is expected)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A prepared dataset in tmp_path/out and its exact bytes."""
    src = write_jsonl(tmp_path / "good.jsonl", DOCS)
    prepare([src], tmp_path / "out", "bytes", val_docs=1, progress=False)
    return tmp_path / "out", snapshot(tmp_path / "out")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tttlm")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------- item 5: the old data survives
def test_lone_surrogate_is_caught_up_front_and_keeps_the_old_data(
        tmp_path: Path, old: tuple[Path, dict[str, bytes]]) -> None:
    out, before = old
    bad = tmp_path / "bad.jsonl"
    # "\ud800" in JSON is valid JSON but no UTF-8: it used to pass the check, be found only by
    # the tokenizer as a bare UnicodeEncodeError, after --overwrite had emptied --out.
    bad.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: lone surrogate \\ud800 at character 1, "
                                        r"which UTF-8 cannot encode; pass --errors replace"):
        prepare([bad], out, "train:300", overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    prepare([bad], out, "bytes", errors="replace", overwrite=True, progress=False)
    assert load_tokenizer(out).decode(stream(out, "train").tolist()) == "fine" + "a\ufffdb"


def test_interrupt_while_tokenizing_keeps_the_old_data(
        tmp_path: Path, old: tuple[Path, dict[str, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = old
    src = write_jsonl(tmp_path / "new.jsonl", [d * 3 for d in DOCS])

    def interrupted(self: ByteTokenizer, texts: list[str]) -> list[np.ndarray]:
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteTokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, "bytes", overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    prepare([src], out, "bytes", overwrite=True, progress=False)  # the lock was released
    assert read_meta(out)["splits"]["train"]["documents"] == 4


def test_disk_full_keeps_the_old_data(tmp_path: Path, old: tuple[Path, dict[str, bytes]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = old
    src = write_jsonl(tmp_path / "new.jsonl", [d * 3 for d in DOCS])

    def full(self: object, ids: np.ndarray, doc: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module._SplitWriter, "add", full)
    with pytest.raises(DataError, match=rf"^no space left on device; {re.escape(str(out))} is "
                                        "unchanged; free some space"):
        prepare([src], out, "bytes", overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_out_is_refused_unless_it_is_empty_or_prepared_data(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"mine: is not empty and holds files that are not "
                                            r"prepared data \(notes\.md\); choose an empty"):
            prepare([src], mine, "bytes", overwrite=overwrite, progress=False)
    assert (mine / "notes.md").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file: exists and is not a folder; choose a folder"):
        prepare([src], tmp_path / "file", "bytes", progress=False)
    half = tmp_path / "half"  # shards of an unfinished run of an older version
    half.mkdir()
    (half / "train_0000.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match=r"half: holds the shards of an unfinished prepare "
                                        r"\(no meta\.json\); pass --overwrite to replace it"):
        prepare([src], half, "bytes", progress=False)
    prepare([src], half, "bytes", overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    prepare([src], tmp_path / "empty", "bytes", progress=False)
    assert read_meta(tmp_path / "empty")["splits"]["train"]["documents"] == 4


def test_out_is_locked_while_preparing(tmp_path: Path, old: tuple[Path, dict[str, bytes]]
                                       ) -> None:
    out, before = old
    src = write_jsonl(tmp_path / "new.jsonl", DOCS[:2])
    busy = rf"^{re.escape(str(out))} is in use by `tttlm data prepare` \(pid {os.getpid()} "
    with (FolderLock(tmp_path / ".out.lock", "data prepare"),  # another run holds it
          pytest.raises(DataError, match=busy + r".*\); wait for it")):
        prepare([src], out, "bytes", overwrite=True, progress=False)
    assert snapshot(out) == before
    prepare([src], out, "bytes", overwrite=True, progress=False)
    assert "tttlm.lock" not in "".join(snapshot(out))  # the lock lives beside, not inside


def test_leftovers_of_a_crash_are_cleaned_or_recovered(
        tmp_path: Path, old: tuple[Path, dict[str, bytes]]) -> None:
    out, before = old
    src = write_jsonl(tmp_path / "new.jsonl", DOCS[:2])
    (tmp_path / ".tmp-out-123-abcdef12").mkdir()  # a crashed run's staging folder
    (tmp_path / ".tmp-out-2-123-abcdef12").mkdir()  # a live run's for the sibling out-2
    out.rename(tmp_path / ".old-out")  # a crash between the two renames of the swap
    with pytest.raises(DataError, match=r"out: already holds prepared data; pass --overwrite"):
        prepare([src], out, "bytes", progress=False)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == [".tmp-out-2-123-abcdef12"]


# ---------------------------------------------------------------- item 10: flushed before swap
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_files_and_folder_are_fsynced_before_the_swap(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [d * 20 for d in DOCS])
    root = tmp_path.resolve()
    out = root / "out"
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        events.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    prepare([src], out, "train:300", val_docs=1, shard_tokens=50, progress=False)
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
    staged = Path(events[swap][1])
    synced = {e[1] for e in events[:swap] if e[0] == "fsync"}
    files = sorted(p.name for p in out.iterdir())
    assert {"meta.json", "tokenizer.json", "train_0000.bin", "val_0000.bin"} <= set(files)
    assert {str(staged / f) for f in files} | {str(staged)} <= synced
    assert ("fsync", str(root)) in events[swap + 1:]


# ---------------------------------------------------------------- item 11: duplicates, cost
def test_a_document_given_twice_is_kept_once_in_one_split(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(DOCS):
        (corpus / f"{i}.txt").write_text(text)
    again = corpus / "1.txt"
    # The folder, then one of its files as the held-out tail: that text used to be trained on
    # (from the folder) and evaluated on (as the val document) at once.
    meta = prepare([corpus, again], tmp_path / "out", "bytes", val_docs=1, progress=False)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert val["doc_names"] == [str(again)]
    assert train["doc_names"] == [str(corpus / f"{i}.txt") for i in (0, 2, 3)]
    assert meta["duplicates"]["dropped"] == 1
    assert meta["duplicates"]["examples"] == [{"dropped": str(again), "kept": str(again)}]
    assert bytes(t for t in stream(tmp_path / "out", "train") if t < 256) == (
        (DOCS[0] + DOCS[2] + DOCS[3]).encode())
    assert run_cli(["data", "prepare", str(corpus), str(corpus / "3.txt"), "--out",
                    str(tmp_path / "cli"), "--quiet"]) == 0
    assert "dropped 1 duplicate document(s): same text as a later one" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"--val-docs 4 must be in \[0, 3\]: the corpus has 4 "
                                        r"document\(s\) once 1 duplicate\(s\) are dropped"):
        prepare([corpus, again], tmp_path / "x", "bytes", val_docs=4, progress=False)


def test_tokenizer_training_on_one_long_run_is_bounded(tmp_path: Path) -> None:
    # 2 MB of one character is one pre-token for GPT-2's split: training used to cost its whole
    # length per merge (100 KB took 10 s, 20 MB hours). Cut at MAX_PRETOKEN_CHARS it is
    # thousands of copies of one short word.
    src = write_jsonl(tmp_path / "c.jsonl", ["a" * 2_000_000, *[d * 20 for d in DOCS]])
    started = time.perf_counter()
    meta = prepare([src], tmp_path / "out", "train:300", progress=False)
    assert time.perf_counter() - started < 30  # about 1 s
    tok = load_tokenizer(tmp_path / "out")
    assert tok.splittable  # the cap keeps long documents encodable in pieces
    longest = max(len(tok.decode([i])) for i in range(2, tok.vocab_size))
    assert longest <= MAX_PRETOKEN_CHARS
    first = np.split(stream(tmp_path / "out", "train"),
                     meta["splits"]["train"]["doc_offsets"][1:])[0]
    assert tok.decode(first.tolist()) == "a" * 2_000_000


def test_capped_pre_tokenizer_matches_gpt2_below_the_cap() -> None:
    from tokenizers import pre_tokenizers

    texts = ["It's 2024: hello  world!!\n\n\tdone", "Ünïcödé 日本語 🙂 x", " " * 300 + "z" * 300]
    tok = train_bpe(texts * 5, 270)
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)
    capped = tok._tok.pre_tokenizer
    for text in texts[:2]:
        assert capped.pre_tokenize_str(text) == gpt2.pre_tokenize_str(text)
    pieces = [len(p) for p, _ in capped.pre_tokenize_str(texts[2])]
    assert max(pieces) == MAX_PRETOKEN_CHARS and sum(pieces) == 600


# ---------------------------------------------------------------- item 15: defaults, val split
def test_default_tokenizer_is_bytes_and_said(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    assert run_cli(["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "no --tokenizer given: using bytes" in captured.err
    assert "tokenizer bytes, vocab 258" in captured.out
    assert read_meta(tmp_path / "out")["tokenizer"]["kind"] == "bytes"


def test_val_fraction_is_chosen_by_content(tmp_path: Path) -> None:
    texts = [f"document {i}: " + "word " * i for i in range(20)]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    meta = prepare([src], tmp_path / "a", "bytes", val_fraction=0.25, progress=False)
    assert meta["splits"]["val"]["documents"] == 5 and meta["splits"]["train"]["documents"] == 15
    assert "smallest BLAKE2b-128 hash" in meta["val_rule"]
    val_texts = set(load_tokenizer(tmp_path / "a").decode(stream(tmp_path / "a", "val").tolist())
                    .split("document ")[1:])
    reordered = write_jsonl(tmp_path / "r.jsonl", texts[::-1])
    prepare([reordered], tmp_path / "b", "bytes", val_fraction=0.25, progress=False)
    again = set(load_tokenizer(tmp_path / "b").decode(stream(tmp_path / "b", "val").tolist())
                .split("document ")[1:])
    assert again == val_texts  # the same texts, whatever their order
    tiny = prepare([src], tmp_path / "c", "bytes", val_fraction=0.01, progress=False)
    assert tiny["splits"]["val"]["documents"] == 1  # at least one
    with pytest.raises(DataError, match=r"--val-docs 2 and --val-fraction 0.1 both choose"):
        prepare([src], tmp_path / "d", "bytes", val_docs=2, val_fraction=0.1, progress=False)
    with pytest.raises(DataError, match=r"--val-fraction 1 must be in \[0, 1\)"):
        prepare([src], tmp_path / "d", "bytes", val_fraction=1.0, progress=False)
    one = write_jsonl(tmp_path / "one.jsonl", ["only"])
    with pytest.raises(DataError, match=r"--val-fraction 0.5 leaves no training document"):
        prepare([one], tmp_path / "d", "bytes", val_fraction=0.5, progress=False)
    with pytest.raises(SystemExit):
        run_cli(["data", "prepare", str(src), "--out", str(tmp_path / "d"), "--val-docs", "1",
                 "--val-fraction", "0.1"])


def test_progress_written_to_a_pipe_is_plain_lines(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    prepare([src], tmp_path / "out", "bytes", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "tokenize" in err and "check inputs" in err


# ---------------------------------------------------------------- tttlm data books
def test_books_go_through_the_same_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    import gzip

    paths = {}
    for split, texts in (("train", DOCS[:3]), ("val", DOCS[3:])):
        paths[split] = tmp_path / f"{split}.jsonl.gz"
        paths[split].write_bytes(gzip.compress(
            "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    monkeypatch.setattr(books_module, "builtin_books_paths", lambda: paths)
    out = tmp_path / "books"
    prepare_builtin(out, "bytes", progress=False)
    before = snapshot(out)
    with pytest.raises(DataError, match=r"books: already holds prepared data; pass --overwrite"):
        prepare_builtin(out, "bytes", progress=False)

    def interrupted(self: ByteTokenizer, texts: list[str]) -> list[np.ndarray]:
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteTokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_builtin(out, "bytes", overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------- item 9: ids beyond the vocab
def test_out_of_vocab_id_in_a_shard_is_named(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [d * 4 for d in DOCS])
    prepare([src], tmp_path / "out", "bytes", shard_tokens=64, progress=False)
    shard = tmp_path / "out" / "train_0001.bin"
    ids = np.fromfile(shard, dtype="<u2")
    ids[5] = 300  # past the 258 ids of bytes: the embedding lookup used to fail inside torch
    ids.tofile(shard)
    ds = TokenDataset(tmp_path / "out", "train", seq_len=16)
    ds.batch([0, 1])  # tokens 0..32 are in the first, untouched shard
    named = re.escape(str(shard))
    with pytest.raises(DataError, match=rf"{named}: token 5 is id 300, but the vocab is 258 and "
                                        r"meta.json records no id above 256; the shard is "
                                        r"damaged or was modified: prepare the data again"):
        ds.batch([3, 4])  # tokens 48..80: shard 1 starts at 64
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    meta["max_token_id"] = 999
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"max_token_id 999 is outside the vocab of 258"):
        TokenDataset(tmp_path / "out", "train", seq_len=16)
