"""A model folder's tokenizer in the files ``AutoTokenizer.from_pretrained(folder)`` reads.

``tokenizer.json`` (the ``tokenizers`` model, with a post-processor that puts BOS in front of a
text, as tttlm's data pipeline does for every document) and ``tokenizer_config.json`` (the
class and the BOS/EOS/pad tokens). tttlm's own loaders read the same ``tokenizer.json`` and
encode without special tokens, so both sides give the same ids.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tttlm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, HF_FILE, ByteTokenizer, Tokenizer
from tttlm.data.tokenizer import resolve_tokenizer as data_tokenizer
from tttlm.errors import UserError
from tttlm.files import atomic_write_text

CONFIG_FILE = "tokenizer_config.json"


def save_tokenizer(tokenizer: Tokenizer | str | os.PathLike[str],
                   directory: str | os.PathLike[str]) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (a model
    folder), each durably. ``tokenizer``: a tttlm tokenizer or its spec (``bytes``, a
    ``tokenizer.json``, a prepared data folder). Tiktoken files have no ``tokenizer.json``
    form here and are refused."""
    tok = data_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) \
        else tokenizer
    spec = byte_level_spec() if isinstance(tok, ByteTokenizer) else _tokenizers_spec(tok)
    names = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    if tok.bos_id not in names or tok.eos_id not in names:
        raise UserError(f"the tokenizer's BOS ({tok.bos_id}) or EOS ({tok.eos_id}) is not one "
                        "of its special tokens; use a tokenizer.json that declares both")
    bos, eos = names[tok.bos_id], names[tok.eos_id]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / HF_FILE, json.dumps(spec, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": eos, "pad_token": eos, "add_bos_token": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 10**30}
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def _tokenizers_spec(tok: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.json`` of a tokenizer that has one (written by its own ``save``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp))
        file = Path(tmp) / HF_FILE
        if not file.is_file():
            raise UserError(f"a {tok.kind} tokenizer has no tokenizer.json form; convert it to "
                            "a Hugging Face tokenizer.json first")
        return json.loads(file.read_text(encoding="utf-8"))


def byte_level_spec() -> dict[str, Any]:
    """tttlm's byte tokenizer (UTF-8 bytes as ids 0..255, BOS 256, EOS 257) as a
    ``tokenizers`` byte-level BPE without merges: every byte is its own token, same ids."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # one printable character per byte
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([BOS_TOKEN, EOS_TOKEN])  # ids 256, 257
    return json.loads(rust.to_str())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (what ByteLevel pre-tokenizers use)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))
