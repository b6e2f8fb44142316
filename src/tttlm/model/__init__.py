"""The TTT-E2E model: blocks, the meta forward pass, save/load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.model.model import TTTForCausalLM, TTTOutput

__all__ = ["TTTForCausalLM", "TTTOutput"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "TTTForCausalLM": "tttlm.model.model",
    "TTTOutput": "tttlm.model.model",
})
