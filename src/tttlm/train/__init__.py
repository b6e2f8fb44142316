"""Training: config resolution, the trainer, checkpoints, multi-GPU wrapping, the quickstart."""

from tttlm.train.config import PRESETS, TrainConfig, resolve_config
from tttlm.train.trainer import Trainer, WarmupCosine, forward_backward

__all__ = ["PRESETS", "TrainConfig", "Trainer", "WarmupCosine", "forward_backward",
           "resolve_config"]
