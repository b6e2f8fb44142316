"""Command-line options shared by several commands (kept here so that no command imports
another's parser)."""

from __future__ import annotations

import argparse

TTT_GROUP_HELP = ("e2e: learn on the chunks of at most N sequences at a time when several "
                  "are read together (each has its own fast weights, so memory grows with "
                  "the sequences read at once, not with their length); the results are the "
                  "same. 'auto' (default): as many as keep the fast weights' working set "
                  "under 28 GiB, or a third of the GPU's memory where that is less (3b: 4 on "
                  "an 80 GB GPU, 2 on a 40 GB one); 'all': all at once")


def ttt_group(text: str) -> int | str:
    """``--ttt-group`` / ``--ttt-groups``: a number of sequences (at least 1), ``auto`` or
    ``all``."""
    if text in ("all", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of sequences; give N >= 1, "
                                         "'auto' or 'all'")
    return value


def group_size(value: int | str | None) -> int | str | None:
    """What ``TTTForCausalLM.ttt_group`` takes: None for ``all``, ``"auto"`` as it is."""
    if value == "auto":
        return value
    return None if value in (None, "all") else int(value)
