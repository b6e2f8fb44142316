"""A compiled fast path that falls back to the function itself where the compiler fails."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any


def compile_or_fall_back(fn: Callable[..., Any], dynamic: bool | None = None
                         ) -> Callable[..., Any]:
    """``torch.compile(fn)``; should compiling or running the compiled form fail on some
    machine (no working compiler, an unsupported input), ``fn`` runs as it is from then on,
    with one warning: the same values, more kernel passes, never a failed run for want of
    a fused copy. Only for functions whose uncompiled form is the reference."""
    import torch

    compiled = torch.compile(fn, dynamic=dynamic)
    failed: list[BaseException] = []

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say so)
                failed.append(e)
                warnings.warn(f"{fn.__name__}: torch.compile failed ({type(e).__name__}: "
                              f"{e}); running it uncompiled", RuntimeWarning, stacklevel=2)
        return fn(*args, **kwargs)

    return run
