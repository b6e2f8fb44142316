"""Training: config resolution, the trainer, checkpoints, multi-GPU wrapping, the quickstart."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.train.config import PRESETS, TrainConfig, resolve_config
    from tttlm.train.trainer import Trainer, WarmupCosine, forward_backward

__all__ = ["PRESETS", "TrainConfig", "Trainer", "WarmupCosine", "forward_backward",
           "resolve_config"]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["PRESETS", "TrainConfig", "resolve_config"], "tttlm.train.config"),
    **dict.fromkeys(["Trainer", "WarmupCosine", "forward_backward"], "tttlm.train.trainer"),
})
