"""tttlm: End-to-End Test-Time Training (TTT-E2E) language models in PyTorch.

The public names are imported on first use, so ``import tttlm`` (and ``tttlm --help``) does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.config import PRESETS, TTTConfig, Variant
    from tttlm.model import TTTForCausalLM, TTTOutput
    from tttlm.ttt import GradMode

__version__ = "0.1.0"
__all__ = ["PRESETS", "GradMode", "TTTConfig", "TTTForCausalLM", "TTTOutput", "Variant",
           "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "PRESETS": "tttlm.config",
    "TTTConfig": "tttlm.config",
    "Variant": "tttlm.config",
    "TTTForCausalLM": "tttlm.model.model",
    "TTTOutput": "tttlm.model.model",
    "GradMode": "tttlm.ttt.modes",
})
