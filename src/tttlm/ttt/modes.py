"""How the outer gradient treats the inner step (kept apart from :mod:`tttlm.ttt.inner` so that
configs and the command line name the modes without importing torch)."""

from __future__ import annotations

import enum


class GradMode(str, enum.Enum):
    EXACT = "exact"  # differentiate through the inner gradient (second order), as the paper
    FIRST_ORDER = "first_order"  # treat each inner gradient as a constant: W_{i+1} = W_i - η·sg(g)
    NONE = "none"  # no outer gradient (evaluation / inference): everything is detached
