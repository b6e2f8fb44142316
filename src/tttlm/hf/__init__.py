"""transformers and lm-evaluation-harness integration (the ``hf`` / ``eval`` extras).

``import tttlm.hf`` registers ``model_type="tttlm"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so that a tttlm model folder loads with
``AutoModelForCausalLM.from_pretrained(folder)``. See docs/hf.md.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    from tttlm.errors import UserError

    raise UserError("tttlm.hf needs transformers; install it with pip install 'tttlm[hf]'"
                    ) from None

from transformers import AutoConfig, AutoModelForCausalLM

from tttlm.hf.cache import TTTCache
from tttlm.hf.config import MODEL_TYPE, TTTLMConfig
from tttlm.hf.modeling import TTTLMForCausalLM
from tttlm.hf.tokenizer import save_tokenizer

AutoConfig.register(MODEL_TYPE, TTTLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTLMConfig, TTTLMForCausalLM, exist_ok=True)

__all__ = ["TTTCache", "TTTLMConfig", "TTTLMForCausalLM", "save_tokenizer"]
