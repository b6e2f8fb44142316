"""``tttlm data prepare``: argument wiring, the summary, and errors as `tttlm: error:` + exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tttlm.data import read_meta
from tttlm.data.cli import add_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tttlm")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document number {i}\n" * 20)
    out = tmp_path / "out"
    assert run(["data", "prepare", str(tmp_path), "--out", str(out), "--vocab-size", "270",
                "--val-docs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: tokenizer train:270" in printed and "val:" in printed
    meta = read_meta(out)
    assert meta["splits"]["val"]["doc_names"] == [str(tmp_path / "2.txt")]


@pytest.mark.parametrize(("extra", "message"), [
    (["--tokenizer", "nope"], "tttlm: error: unknown tokenizer spec 'nope'"),
    (["--tokenizer", "bytes", "--vocab-size", "300"],
     "tttlm: error: --vocab-size 300 only sizes a trained tokenizer"),
    (["--tokenizer", "bytes", "--val-docs", "1"], "tttlm: error: --val-docs 1 must be in [0, 0]"),
])
def test_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                       message: str) -> None:
    (tmp_path / "a.txt").write_text("text")
    assert run(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_bytes(b"ok \x80")
    assert run(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "o"),
                "--tokenizer", "bytes", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tttlm: error: {tmp_path / 'a.txt'}: invalid UTF-8 at "
                                       "byte offset 3; pass --errors replace to substitute "
                                       "U+FFFD\n")
