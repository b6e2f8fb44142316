"""The TTT-E2E model: blocks, the meta forward pass, save/load."""

from tttlm.model.model import TTTForCausalLM, TTTOutput

__all__ = ["TTTForCausalLM", "TTTOutput"]
