"""The inner optimizers by name. A new one is a file in this folder (a subclass of
:class:`~tttlm.ttt.base.InnerOptimizer` with a ``name``) plus one line in the tuple below."""

from __future__ import annotations

import inspect
from typing import Any

from tttlm.ttt.base import InnerOptimizer, InnerState  # noqa: F401  (re-exported)
from tttlm.ttt.learned_lr import LearnedLRSGD
from tttlm.ttt.momentum import MomentumSGD
from tttlm.ttt.sgd import ClippedSGD

INNER_OPTIMIZERS: dict[str, type[InnerOptimizer]] = {cls.name: cls for cls in (
    ClippedSGD,
    MomentumSGD,
    LearnedLRSGD,
)}
DEFAULT_INNER_OPTIMIZER = ClippedSGD.name


def build_inner_optimizer(name: str, num_layers: int, **options: Any) -> InnerOptimizer:
    """The inner optimizer ``name`` for ``num_layers`` TTT layers, with its ``options``
    (``beta`` for ``momentum``). An unknown name or option is a ValueError."""
    cls = INNER_OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"unknown inner optimizer {name!r}; known: "
                         f"{', '.join(sorted(INNER_OPTIMIZERS))}")
    try:
        inspect.signature(cls).bind(num_layers, **options)
    except TypeError as error:
        raise ValueError(f"inner optimizer {name!r}: {error}") from None
    return cls(num_layers, **options)
