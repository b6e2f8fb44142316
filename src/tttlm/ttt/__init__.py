"""The inner loop of test-time training: one clipped SGD step on the fast weights."""

from tttlm.ttt.inner import GradMode, inner_step

__all__ = ["GradMode", "inner_step"]
