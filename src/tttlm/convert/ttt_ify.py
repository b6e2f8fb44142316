"""Turn a full-attention tttlm model (an imported pretrained LLM) into its sliding-window
baseline (``swa``) or a TTT-E2E model (``e2e``) that computes the same function before any
fine-tuning.

``e2e`` adds a prime SwiGLU MLP (with its pre-norm, and post-norm when the model has sandwich
norms) to each of the last ``num_ttt_layers`` blocks and switches attention to the sliding
window. Initialisation: the prime MLP's output projection ``w2`` is zero, so its branch adds
exactly 0 and the model's outputs are unchanged (with a window ≥ the sequence length);
``w1`` and ``w3`` are ``N(0, initializer_range)`` and the norms 1, as the official init.
This is not the paper's choice, which pretrains from scratch with every prime matrix
``N(0, 0.02)`` (METHOD.md §2): a random ``w2`` would perturb a pretrained model before
meta-fine-tuning starts. With ``w2 = 0`` the first inner step's gradient reaches ``w2``
(``∂L/∂w2 = δ·act(h)ᵀ``, non-zero) and ``w1``/``w3`` from the second step on, as a LoRA
adapter whose ``B`` starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from tttlm.config import TTTConfig, Variant
from tttlm.errors import UserError
from tttlm.model.model import TTTForCausalLM

# The official ratio of the window to the chunk (k = 8192, b = 1024).
WINDOW_PER_CHUNK = 8


def ttt_ify(model: TTTForCausalLM, to: Variant | str, *, window: int,
            chunk_size: int | None = None, num_ttt_layers: int | None = None,
            prime_intermediate_size: int | None = None, seed: int = 0) -> TTTForCausalLM:
    """``model`` (``full``) as a ``swa`` or ``e2e`` model with window ``window``.

    ``chunk_size``: the TTT chunk b (default ``window // 8``, the official ratio);
    ``num_ttt_layers``: the blocks that get a prime MLP (default: the last quarter);
    ``prime_intermediate_size``: their width (default: the MLP's). The model's tensors are
    shared, not copied; the prime MLPs are new (see the module docstring), drawn from
    ``seed``.
    """
    config = model.config
    variant = Variant(to)
    if config.variant is not Variant.FULL:
        raise UserError(f"the model is already {config.variant.value!r}; TTT-ify a full-attention "
                        "model (an imported one, or a `full` baseline)")
    if variant is Variant.FULL:
        raise UserError("--to full keeps the model as it is; use --to swa or --to e2e")
    chunk = chunk_size if chunk_size is not None else max(1, window // WINDOW_PER_CHUNK)
    fields = config.to_dict()
    fields.update(variant=variant.value, window=window, chunk_size=chunk,
                  num_ttt_layers=num_ttt_layers if variant is Variant.E2E else None,
                  prime_intermediate_size=prime_intermediate_size)
    try:
        new_config = TTTConfig.from_dict(fields)
    except ValueError as err:
        raise UserError(f"cannot TTT-ify: {err}") from None
    with torch.device("meta"):
        new = TTTForCausalLM(new_config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert not unexpected, unexpected
    ref = model.embed.weight
    generator = torch.Generator().manual_seed(seed)
    std = new_config.initializer_range
    for name in missing:
        module_name, _, param_name = name.rpartition(".")
        module = new.get_submodule(module_name)
        shape = getattr(module, param_name).shape
        if ".prime.w2." in name:
            value = torch.zeros(shape)  # the branch adds 0: outputs unchanged
        elif ".prime.w1." in name or ".prime.w3." in name:
            value = torch.randn(shape, generator=generator) * std
        elif ".prime_norm." in name or ".prime_post_norm." in name:
            value = torch.ones(shape)
        else:
            raise UserError(f"cannot TTT-ify: no initialisation for {name} (inner optimizer "
                            f"{new_config.inner_optimizer!r}); use the sgd inner optimizer")
        setattr(module, param_name, nn.Parameter(value.to(ref.device, ref.dtype)))
    new.train(model.training)
    return new
