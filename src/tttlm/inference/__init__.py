"""Inference: prefill, streaming decode with test-time updates, sessions and generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    import torch

    from tttlm.inference.engine import Engine, Generation, TokenStream
    from tttlm.inference.sampling import sample
    from tttlm.inference.state import State, weights_digest
    from tttlm.model.model import TTTForCausalLM

__all__ = ["Engine", "Generation", "State", "TokenStream", "generate", "sample",
           "weights_digest"]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Engine", "Generation", "TokenStream"], "tttlm.inference.engine"),
    "sample": "tttlm.inference.sampling",
    **dict.fromkeys(["State", "weights_digest"], "tttlm.inference.state"),
})


def generate(model: TTTForCausalLM, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Hugging Face-style generation with test-time updates, with its argument names (the model
    has no ``generate`` method: the model package imports nothing of inference).

    ``input_ids [B, T]``, optionally padded (left or right) with ``attention_mask [B, T]``
    marking real tokens. Greedy unless ``do_sample``. Returns ``[B, T + max_new]``: each row's
    prompt (as given, padding kept) followed by its new tokens, right-padded with
    ``pad_token_id`` (default: EOS) after a row stops, as ``transformers`` does.
    """
    import torch

    from tttlm.inference.engine import Engine

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        prompts: list[torch.Tensor] | torch.Tensor = [
            row[m.bool()] for row, m in zip(input_ids, attention_mask)]
    else:
        prompts = input_ids
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if pad_token_id is None:
        pad_token_id = eos if isinstance(eos, int) else (list(eos) or
                                                         [model.config.eos_token_id])[0]
    out = Engine(model).generate(prompts, max_new_tokens,
                                 temperature=temperature if do_sample else 0.0,
                                 top_k=top_k if do_sample else None,
                                 top_p=top_p if do_sample else None, stop=eos, seed=seed)
    width = max((len(t) for t in out.tokens), default=0)
    new = torch.full((input_ids.shape[0], width), pad_token_id, dtype=torch.long)
    for r, tokens in enumerate(out.tokens):
        new[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return torch.cat((input_ids.cpu().long(), new), dim=1).to(input_ids.device)
