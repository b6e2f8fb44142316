"""``tttlm data prepare`` and ``tttlm data books``: thin wrappers over :mod:`tttlm.data`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from tttlm.cli import user_error
from tttlm.data.books import DEFAULT_TOKENIZER, prepare_builtin
from tttlm.data.errors import DataError
from tttlm.data.prepare import prepare

TOKENIZER_HELP = ("bytes (258 ids: bytes + BOS/EOS); train:V (byte-level BPE of V ids trained on "
                  "the training documents, saved as DIR/tokenizer.json); a tokenizer.json; a "
                  "tiktoken BPE file (needs tttlm[tiktoken]); or a prepared folder to reuse its "
                  "tokenizer")


def add_parser(subparsers: Any) -> None:
    """Register ``data prepare`` and ``data books`` on the top-level subparsers."""
    data = subparsers.add_parser("data", help="prepare token data for training",
                                 description="Prepare token data for training.")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "prepare", help="tokenize text corpora into token shards",
        description="Tokenize documents into flat token shards with a meta.json. Each document "
                    "is preceded by BOS and all follow each other in one stream per split.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt files (one document each), .jsonl/.jsonl.gz (one per line), "
                        ".parquet (one per row; needs tttlm[parquet]) or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--tokenizer", metavar="SPEC", help=TOKENIZER_HELP)
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="train a byte-level BPE of V ids: the same as --tokenizer train:V")
    p.add_argument("--val-docs", type=int, default=0, metavar="N",
                   help="the last N documents in input order (files as given, folders sorted) "
                        "form the val split (default 0: no val split)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="undecodable bytes: fail naming file and offset (strict, default) or "
                        "substitute U+FFFD (replace)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / Parquet column holding the text (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guarded(_run_prepare))

    b = sub.add_parser("books", help="prepare the built-in public-domain books",
                       description="Prepare the built-in books (train + 3 held-out val books).")
    b.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    b.add_argument("--tokenizer", metavar="SPEC", default=DEFAULT_TOKENIZER,
                   help=f"{TOKENIZER_HELP} (default: {DEFAULT_TOKENIZER})")
    b.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_guarded(_run_books))


def _guarded(run: Callable[[argparse.Namespace], dict[str, Any]]
             ) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            meta = run(args)
        except DataError as err:
            return user_error(str(err))
        print(summary(args.out, meta))
        return 0

    return handler


def _run_prepare(args: argparse.Namespace) -> dict[str, Any]:
    return prepare(args.inputs, args.out, args.tokenizer, vocab_size=args.vocab_size,
                   val_docs=args.val_docs, errors=args.errors, text_field=args.text_field,
                   overwrite=args.overwrite, progress=not args.quiet)


def _run_books(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_builtin(args.out, args.tokenizer, overwrite=args.overwrite,
                           progress=not args.quiet)


def summary(out: str, meta: dict[str, Any]) -> str:
    """One line per split: what a user checks before training on the folder."""
    lines = [f"wrote {out}: tokenizer {meta['tokenizer']['spec']}, vocab {meta['vocab_size']} "
             f"({meta['dtype']}), BOS {meta['bos_id']}, EOS {meta['eos_id']}"]
    for name, split in meta["splits"].items():
        lines.append(f"  {name}: {split['tokens']:,} tokens, {split['documents']:,} documents, "
                     f"{split['chars'] / max(split['tokens'], 1):.2f} chars/token, "
                     f"{len(split['shards'])} shard(s)")
    return "\n".join(lines)
