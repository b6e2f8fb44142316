"""``torch.compile`` as the project calls it, and a compiled fast path that falls back to the
function itself where the compiler fails."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

# Inductor's own switch; where the user sets it, it decides (see ``inductor_options``).
TUNING_ENV = "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"


def inductor_options() -> dict[str, Any] | None:
    """Inductor's options for the project's compiled regions: coordinate-descent tuning of the
    block sizes of the kernels Inductor writes (the norms, casts and reductions around the
    matmuls, launched per chunk and layer: timed against Inductor's default configs, 3b e2e
    prefill at 128K x 1 was 0.3-0.7% faster in three interleaved pairs on one H100). It
    costs compile time only and changes the bits of a sum on a GPU no more than Inductor's
    own choice among its default configs, which is timed too. ``None`` (Inductor reads its
    environment) where the user set ``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING``: ``=0`` gives
    the default configs back."""
    if TUNING_ENV in os.environ:
        return None
    return {"coordinate_descent_tuning": True}


def inductor_compile(fn: Callable[..., Any], dynamic: bool | None = None) -> Callable[..., Any]:
    """``torch.compile(fn)`` with :func:`inductor_options`."""
    import torch

    return torch.compile(fn, dynamic=dynamic, options=inductor_options())


def compile_or_fall_back(fn: Callable[..., Any], dynamic: bool | None = None
                         ) -> Callable[..., Any]:
    """``torch.compile(fn)``; should compiling or running the compiled form fail on some
    machine (no working compiler, an unsupported input), ``fn`` runs as it is from then on,
    with one warning: the same values, more kernel passes, never a failed run for want of
    a fused copy. Only for functions whose uncompiled form is the reference."""
    compiled = inductor_compile(fn, dynamic=dynamic)
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
