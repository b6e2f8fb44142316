"""tttlm: End-to-End Test-Time Training (TTT-E2E) language models in PyTorch."""

from tttlm.config import PRESETS, TTTConfig, Variant
from tttlm.model import TTTForCausalLM, TTTOutput
from tttlm.ttt import GradMode

__version__ = "0.1.0"
__all__ = ["PRESETS", "GradMode", "TTTConfig", "TTTForCausalLM", "TTTOutput", "Variant",
           "__version__"]
