"""``tttlm data prepare`` and ``tttlm data books``: thin wrappers over :mod:`tttlm.data`.

Only the argument parsers live at module level; numpy, the tokenizers and the pipeline are
imported when a command runs, so that ``tttlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tttlm.data.books import DEFAULT_TOKENIZER as BOOKS_TOKENIZER
from tttlm.errors import UserError, user_error

DEFAULT_TOKENIZER = "bytes"  # tttlm.data.prepare.DEFAULT_TOKENIZER, without importing numpy
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
                    "is preceded by BOS and all follow each other in one stream per split. "
                    "Documents with the same text are kept once (the last copy). The folder is "
                    "built beside --out and swapped in only when complete, so a failure leaves "
                    "the old data as it was.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt files (one document each), .jsonl/.jsonl.gz (one per line), "
                        ".parquet (one per row; needs tttlm[parquet]) or folders of them")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write: new, empty, or prepared data with --overwrite")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help=f"{TOKENIZER_HELP} (default: {DEFAULT_TOKENIZER}, or train:V with "
                        "--vocab-size)")
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="train a byte-level BPE of V ids: the same as --tokenizer train:V")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, default=0, metavar="N",
                     help="the last N documents in input order (files as given, folders "
                          "sorted) form the val split (default 0: no val split)")
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="hold out round(F x documents), at least one, for the val split: "
                          "those with the smallest hash of their text, so the choice depends "
                          "on the texts alone, not on their order")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="undecodable bytes or lone surrogates: fail naming file and place "
                        "(strict, default) or substitute U+FFFD (replace)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / Parquet column holding the text (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guarded(_run_prepare))

    b = sub.add_parser("books", help="prepare the built-in public-domain books",
                       description="Prepare the built-in books (train + 3 held-out val books).")
    b.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    b.add_argument("--tokenizer", metavar="SPEC", default=BOOKS_TOKENIZER,
                   help=f"{TOKENIZER_HELP} (default: {BOOKS_TOKENIZER})")
    b.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_guarded(_run_books))


def _prog(args: argparse.Namespace) -> str:
    return getattr(args, "command_prog", "tttlm")


def _guarded(run: Callable[[argparse.Namespace], dict[str, Any]]
             ) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            meta = run(args)
        except UserError as err:
            return user_error(str(err), _prog(args))
        print(summary(args.out, meta))
        return 0

    return handler


def _run_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from tttlm.data.prepare import prepare

    if args.tokenizer is None and args.vocab_size is None:
        print(f"{_prog(args)}: no --tokenizer given: using {DEFAULT_TOKENIZER} (one id per UTF-8 "
              "byte); pass --tokenizer train:V or --vocab-size V for a trained BPE",
              file=sys.stderr)
    return prepare(args.inputs, args.out, args.tokenizer, vocab_size=args.vocab_size,
                   val_docs=args.val_docs, val_fraction=args.val_fraction, errors=args.errors,
                   text_field=args.text_field, overwrite=args.overwrite,
                   progress=not args.quiet)


def _run_books(args: argparse.Namespace) -> dict[str, Any]:
    from tttlm.data.books import prepare_builtin

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
    if "val" in meta["splits"]:
        lines.append(f"  val documents: {meta['val_rule']}")
    duplicates = meta.get("duplicates", {})
    if duplicates.get("dropped"):
        example = next(iter(duplicates.get("examples", [])), None)
        like = f", e.g. {example['dropped']} = {example['kept']}" if example else ""
        lines.append(f"  dropped {duplicates['dropped']:,} duplicate document(s): same text as "
                     f"a later one, which was kept{like}")
    return "\n".join(lines)
