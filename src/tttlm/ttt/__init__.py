"""The inner loop of test-time training: one clipped SGD step on the fast weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.ttt.inner import inner_step
    from tttlm.ttt.modes import GradMode

__all__ = ["GradMode", "inner_step"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "GradMode": "tttlm.ttt.modes",
    "inner_step": "tttlm.ttt.inner",
})
