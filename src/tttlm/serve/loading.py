"""The model, engine, tokenizer and chat template a server serves, from one model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tttlm.errors import UserError
from tttlm.serve.text import ChatTemplate, load_chat_template


@dataclass
class Served:
    engine: Any  # tttlm.inference.Engine
    tokenizer: Any  # tttlm.data.tokenizer.Tokenizer
    template: ChatTemplate
    name: str


def folder_tokenizer(folder: Path, vocab_size: int) -> Any:
    """The tokenizer the model folder keeps (the trainer saves the data's there), else
    byte-level when the vocabulary is byte-level."""
    from tttlm.data.tokenizer import ByteTokenizer
    from tttlm.data.tokenizer import folder_tokenizer as kept

    tokenizer = kept(folder)
    if tokenizer is None:
        tokenizer = ByteTokenizer()
        if vocab_size not in (256, tokenizer.vocab_size):
            raise UserError(f"{folder} holds no tokenizer and its vocabulary ({vocab_size}) is "
                            "not byte-level; put the tokenizer the model was trained with "
                            "(tokenizer.json) in the model folder")
        return tokenizer
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size} ids but the "
                        f"model only {vocab_size}; put the model's own tokenizer there")
    return tokenizer


def load_served(folder: Path, *, device: str | None, dtype: str | None, ttt: bool | None,
                name: str | None) -> Served:
    import torch

    from tttlm.devices import autocast_dtype, resolve_device
    from tttlm.inference.engine import Engine
    from tttlm.model.model import TTTForCausalLM

    where = resolve_device(device, option="--device")
    weights = getattr(torch, dtype) if dtype else (autocast_dtype(where) or torch.float32)
    model = TTTForCausalLM.from_pretrained(folder, device=where, dtype=weights).eval()
    engine = Engine(model, ttt=ttt)
    tokenizer = folder_tokenizer(folder, model.config.vocab_size)
    return Served(engine, tokenizer, load_chat_template(folder),
                  name or folder.resolve().name)
