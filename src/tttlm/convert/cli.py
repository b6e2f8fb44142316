"""``tttlm convert official SRC DST``: the command-line front end of the converter."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tttlm.config import (
    OFFICIAL_BOS_ID,
    OFFICIAL_CHUNK_SIZE,
    OFFICIAL_EOS_ID,
    OFFICIAL_ROPE_THETA,
    OFFICIAL_WINDOW,
)
from tttlm.errors import UserError


def _run_official(args: argparse.Namespace) -> int:
    from tttlm.convert.official import convert_official

    def note(message: str) -> None:  # what the checkpoint cannot tell, and how to override it
        print(f"{getattr(args, 'command_prog', 'tttlm convert official')}: {message}",
              file=sys.stderr)

    try:
        out = convert_official(args.src, args.dst, window=args.window, chunk_size=args.chunk,
                               rope_theta=args.rope_theta, bos_token_id=args.bos_id,
                               eos_token_id=args.eos_id, variant=args.variant, log=note)
    except ImportError as err:  # an optional dependency (tensorstore for Orbax checkpoints)
        if (err.name or "").partition(".")[0] == "tttlm":
            raise  # tttlm itself is broken: a bug, not something the user can install
        raise UserError(str(err) or type(err).__name__) from None
    print(f"wrote {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert`` (with its ``official`` subcommand) on the top-level CLI's subparsers.

    Each leaf sets ``func`` to a handler ``(args) -> exit code`` so the top-level CLI stays a
    plain dispatcher.
    """
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints from other implementations",
        description="Convert checkpoints from other implementations into tttlm model directories.")
    sources = convert.add_subparsers(dest="convert_source", metavar="SOURCE", required=True)
    official = sources.add_parser(
        "official", help="an official TTT-E2E (JAX/Orbax) checkpoint",
        description="Convert an official TTT-E2E checkpoint (Orbax, <ckpt>/<step>/model_weights; "
                    "reading it needs pip install 'tttlm[orbax]') or a .npz of official arrays "
                    "into a tttlm model directory. Sizes come from the tensor shapes; options "
                    f"left out take the official values (k {OFFICIAL_WINDOW}, b "
                    f"{OFFICIAL_CHUNK_SIZE}, theta {OFFICIAL_ROPE_THETA:g}, Llama-3 BOS/EOS "
                    f"{OFFICIAL_BOS_ID}/{OFFICIAL_EOS_ID}), and each value so assumed is printed "
                    "on stderr with the option that overrides it.")
    official.add_argument("src", metavar="SRC",
                          help="checkpoint root, a <step>/ folder, its model_weights/, or a .npz")
    official.add_argument("dst", metavar="DST", help="output tttlm model directory")
    official.add_argument("--window", type=int, default=None, metavar="K",
                          help=f"sliding-window size k (default {OFFICIAL_WINDOW})")
    official.add_argument("--chunk", type=int, default=None, metavar="B",
                          help=f"TTT chunk size b (default {OFFICIAL_CHUNK_SIZE})")
    official.add_argument("--rope-theta", type=float, default=None, metavar="T",
                          help=f"RoPE base theta (default {OFFICIAL_ROPE_THETA:g})")
    official.add_argument("--bos-id", type=int, default=None, metavar="N",
                          help=f"BOS token id (default {OFFICIAL_BOS_ID}; required if the vocab "
                               "is smaller)")
    official.add_argument("--eos-id", type=int, default=None, metavar="N",
                          help=f"EOS token id (default {OFFICIAL_EOS_ID} if it fits the vocab, "
                               "else BOS)")
    official.add_argument("--variant", choices=("swa", "full"), default=None,
                          help="for checkpoints without prime MLPs: sliding-window or full "
                               "attention (default full); e2e is detected from the tensors")
    official.set_defaults(func=_run_official)
    return convert
