"""Which device a command runs on, and in which precision: one resolution for training,
evaluation, generation, the quickstart and the benchmarks.

Device names: ``auto`` (the GPU when one is visible, else the CPU), ``cpu``, ``cuda`` (this
process's GPU: ``LOCAL_RANK`` under ``torchrun``) or ``cuda:N``. Any other name, and CUDA where
there is none, is a one-line :class:`~tttlm.errors.UserError`. Precision: ``auto`` is bf16
autocast on a GPU (the paper's matmul precision) and full precision on a CPU.

torch is imported only when a function needs it, so that configs and the command line can check
names without it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING, Any

from tttlm.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
AUTOCAST_CHOICES = ("auto", "bf16", "none")
_NAME = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def _setting(option: str, value: str) -> str:
    """How a message names the setting: ``device=cuda`` (a config key) or ``--device cuda``."""
    return f"{option} {value}" if option.startswith("--") else f"{option}={value}"


def check_device_name(name: Any, option: str = "device") -> tuple[str, int | None]:
    """``(kind, index)`` of a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``); a
    :class:`UserError` naming the choices for anything else. ``option`` is how the message
    names the setting (``device`` for configs, ``--device`` for command lines)."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(f"{_setting(option, repr(name))} is not known; use {DEVICE_CHOICES}")
    index = match.group(2)
    return match.group(1), int(index) if index is not None else None


def resolve_device(name: str | None = "auto", local_rank: int = 0, *,
                   option: str = "device") -> torch.device:
    """The ``torch.device`` of a device name (``None`` is ``auto``): ``cuda`` is GPU
    ``local_rank`` (this process's under ``torchrun``). A :class:`UserError` for unknown names,
    for CUDA in a torch build without it or on a machine where no GPU is visible, and for a GPU
    index past the visible ones."""
    import torch

    name = "auto" if name is None else name
    kind, index = check_device_name(name, option)
    if kind == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        kind = "cuda"
    if kind == "cpu":
        return torch.device("cpu")
    asked = _setting(option, name)
    cpu = f"{_setting(option, 'cpu')} or auto"
    if not torch.backends.cuda.is_built():
        raise UserError(f"{asked} but CUDA is not available in this torch build "
                        f"({torch.__version__}); use {cpu}, or install a CUDA build of torch")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = (f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None
                else "CUDA is not available")
        raise UserError(f"{asked} but no GPU is visible ({note}); use {cpu}")
    index = local_rank if index is None else index
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"{asked} needs GPU {index} but {count} GPU(s) are visible; use "
                        f"{_setting(option, 'cuda:0')} ... cuda:{count - 1}, or fewer processes")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device, setting: str = "auto",
                   weights: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision setting: ``auto`` (bf16 on a GPU, none on a CPU, and
    none for float64 ``weights``, which are there for exactness), ``bf16`` or ``none``
    (``None``: full precision)."""
    import torch

    if setting not in AUTOCAST_CHOICES:
        raise UserError(f"autocast={setting!r} is not known; use {', '.join(AUTOCAST_CHOICES)}")
    if setting == "auto":
        exact = weights == torch.float64
        return torch.bfloat16 if device.type == "cuda" and not exact else None
    return torch.bfloat16 if setting == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | str | None = "auto",
             **kwargs: Any) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` to ``dtype`` (a setting name is resolved by
    :func:`autocast_dtype`; ``None``: a no-op context, full precision)."""
    import torch

    if isinstance(dtype, str):
        dtype = autocast_dtype(device, dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, **kwargs)


def describe_device(device: torch.device) -> str:
    """The device in words, for reports: the GPU's name, or the CPU and its torch threads."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            "threads)")
