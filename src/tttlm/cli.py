"""The ``tttlm`` command line: a thin layer that parses arguments and calls the library.

Errors a user can fix (:class:`tttlm.errors.UserError`, bad values, missing files, a full disk)
are printed as one line, ``tttlm <cmd>: error: <what>; <how to fix>``, with exit status 2; any
other failure as one line with exit status 1. ``--debug`` (or ``TTTLM_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from tttlm.errors import report_exception

# Each module exposes add_parser(subparsers) and sets `func(args) -> int` on its parsers.
_COMMAND_MODULES = (
    "tttlm.convert.cli",
    "tttlm.data.cli",
    "tttlm.train.cli",
    "tttlm.inference.cli",
    "tttlm.eval.cli",
    "tttlm.bench.cli",
    "tttlm.serve.cli",
)


class CommandParser(argparse.ArgumentParser):
    """Every (sub)command parser records its own name, so that errors can name the command
    (``tttlm data prepare: error: ...``), and takes ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(command_prog=self.prog)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="tttlm", description="End-to-End Test-Time Training (TTT-E2E) language models")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.import_module('tttlm').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("TTTLM_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{args.command_prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        return report_exception(err, args.command_prog)


if __name__ == "__main__":
    sys.exit(main())
