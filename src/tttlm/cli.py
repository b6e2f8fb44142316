"""The ``tttlm`` command line: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes add_parser(subparsers) and sets `func(args) -> int` on its parsers.
_COMMAND_MODULES = (
    "tttlm.convert.cli",
    "tttlm.data.cli",
    "tttlm.train.cli",
    "tttlm.inference.cli",
    "tttlm.eval.cli",
    "tttlm.bench.cli",
)


def user_error(message: str) -> int:
    """Report a user error as one line on stderr (never a traceback); the exit code is 2."""
    print(f"tttlm: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
