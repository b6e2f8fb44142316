"""Whether Triton kernels can run, resolved lazily (never at ``import tttlm``).

Triton is optional: CPU-only installs and CI without a GPU fall back to the PyTorch paths. Under
``TRITON_INTERPRET=1`` Triton runs kernels on CPU tensors through its interpreter, which is how
the kernels' tests run in CI.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (looked up once, on first use)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(t: torch.Tensor) -> bool:
    """Can a Triton kernel take ``t``: a CUDA tensor, or any tensor under the interpreter."""
    if not triton_available():
        return False
    return triton_interpreting() or t.is_cuda


def triton_version() -> str | None:
    """Installed Triton version, or ``None`` (for benchmark records)."""
    if not triton_available():
        return None
    import triton

    return str(triton.__version__)
