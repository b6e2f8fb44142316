"""The inner loop of test-time training: the fast weights and the inner optimizers that step
them (the official clipped SGD by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.ttt.base import InnerOptimizer, InnerState, cat_states, index_state, map_state
    from tttlm.ttt.fast import (
        FastWeights,
        PrimeWeights,
        detach_fast,
        expand_fast,
        fast_to,
        flatten_fast,
        index_fast,
        map_fast,
        unflatten_fast,
    )
    from tttlm.ttt.inner import inner_step
    from tttlm.ttt.learned_lr import LearnedLRSGD
    from tttlm.ttt.modes import GradMode
    from tttlm.ttt.momentum import MomentumSGD
    from tttlm.ttt.optim import DEFAULT_INNER_OPTIMIZER, INNER_OPTIMIZERS, build_inner_optimizer
    from tttlm.ttt.sgd import ClippedSGD

__all__ = ["DEFAULT_INNER_OPTIMIZER", "INNER_OPTIMIZERS", "ClippedSGD", "FastWeights", "GradMode",
           "InnerOptimizer", "InnerState", "LearnedLRSGD", "MomentumSGD", "PrimeWeights",
           "build_inner_optimizer", "cat_states", "detach_fast", "expand_fast", "fast_to",
           "flatten_fast", "index_fast", "index_state", "inner_step", "map_fast", "map_state",
           "unflatten_fast"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "DEFAULT_INNER_OPTIMIZER": "tttlm.ttt.optim",
    "INNER_OPTIMIZERS": "tttlm.ttt.optim",
    "build_inner_optimizer": "tttlm.ttt.optim",
    "InnerOptimizer": "tttlm.ttt.base",
    "InnerState": "tttlm.ttt.base",
    "cat_states": "tttlm.ttt.base",
    "index_state": "tttlm.ttt.base",
    "map_state": "tttlm.ttt.base",
    "ClippedSGD": "tttlm.ttt.sgd",
    "MomentumSGD": "tttlm.ttt.momentum",
    "LearnedLRSGD": "tttlm.ttt.learned_lr",
    "FastWeights": "tttlm.ttt.fast",
    "PrimeWeights": "tttlm.ttt.fast",
    "detach_fast": "tttlm.ttt.fast",
    "expand_fast": "tttlm.ttt.fast",
    "fast_to": "tttlm.ttt.fast",
    "flatten_fast": "tttlm.ttt.fast",
    "index_fast": "tttlm.ttt.fast",
    "map_fast": "tttlm.ttt.fast",
    "unflatten_fast": "tttlm.ttt.fast",
    "GradMode": "tttlm.ttt.modes",
    "inner_step": "tttlm.ttt.inner",
})
