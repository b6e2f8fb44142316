"""Tokenizers behind one small interface: bytes, Hugging Face ``tokenizer.json``, tiktoken files.

Whatever the source, a prepared data folder keeps its own copy of the tokenizer, so that
``load_tokenizer(prepared_dir)`` gives back exactly the tokenizer that produced the tokens. BOS
and EOS are never added by ``encode``: the pipeline places BOS itself (one in front of every
document), so a tokenizer's own post-processor must not add a second one.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tttlm.data.errors import DataError
from tttlm.data.meta import META_FILE, read_meta

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
HF_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
MIN_TRAIN_VOCAB = 256 + 2
MAX_PRETOKEN_CHARS = 128
"""A trained BPE cuts pre-tokens (words, runs of digits, spaces or symbols) longer than this
into pieces of at most this many characters, in training and in encoding alike. Without the cap
one long run (a 20 MB line of one repeated character) is a single word whose every merge costs
its whole length, and training takes hours; with it every word's cost is bounded and the
run becomes many copies of one short word. No natural word comes near the cap."""

# Special-token names of common tokenizers, most specific first; GPT-2 style tokenizers have a
# single <|endoftext|> that serves as both.
_BOS_NAMES = (BOS_TOKEN, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

_PAT_R50K = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PAT_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
               r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_PAT_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PATTERNS = (_PAT_R50K, _PAT_CL100K, _PAT_LLAMA3)
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?$")
_CAP_PATTERN = re.compile(r"\[\\s\\S\]\{1,\d+\}")


class Tokenizer(abc.ABC):
    """Text to token ids and back.

    Attributes:
        vocab_size: one more than the largest id the tokenizer can produce (specials included).
        bos_id: the token placed in front of every document.
        eos_id: the end-of-text token (generation stops on it; prepared data does not contain it).
        splittable: encoding the pieces of :func:`split_text` and joining the ids gives exactly
            the ids of the whole text. True where the pre-tokenizer is known to cut before a space
            that follows a letter and precedes one; it lets one huge document be encoded on
            every core in bounded memory.
    """

    kind: ClassVar[str]
    vocab_size: int
    bos_id: int
    eos_id: int
    splittable: bool = False

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS; special-token names in the text stay text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, ...) are left out."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """``encode`` for many texts at once, as integer arrays; subclasses run it in parallel."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    @abc.abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the tokenizer's files into ``directory``; return its ``meta.json`` entry."""

    def _entry(self, file: str | None) -> dict[str, Any]:
        return {"kind": self.kind, "file": file, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then BOS = 256 and EOS = 257.

    Needs no file and no training, and any text round-trips exactly: the tokenizer of tests and
    of tiny CPU models.
    """

    kind = "bytes"
    splittable = True

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict[str, Any]:
        return self._entry(None)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (a ``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, tok: Any, source: str) -> None:
        self._tok = tok
        # Text that spells a special token ("<|bos|>" in a web page) must stay text, or it would
        # plant false document boundaries in the stream.
        self._tok.encode_special_tokens = True
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        bos = next((specials[n] for n in _BOS_NAMES if n in specials), None)
        eos = next((specials[n] for n in _EOS_NAMES if n in specials), None)
        if bos is None or eos is None:
            raise DataError(f"{source}: cannot tell its BOS/EOS tokens; none of "
                            f"{', '.join(_BOS_NAMES)} is among its special tokens")
        self.bos_id, self.eos_id = bos, eos
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.splittable = _splits_between_words(json.loads(tok.to_str()))

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers reports every parse failure as a bare Exception
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({reason})") from None
        return cls(tok, str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: Path) -> dict[str, Any]:
        self._tok.save(str(directory / HF_FILE))
        return self._entry(HF_FILE)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file (``base64-token rank`` per line), e.g. cl100k or Llama-3's.

    The file holds only the merges; the split pattern and special tokens are recognised from the
    number of ranks (50 256: GPT-2, 100 256: cl100k, 128 000: Llama-3). Any other file gets the
    cl100k pattern and ``<|bos|>``/``<|eos|>`` appended after its ranks.
    """

    kind = "tiktoken"
    splittable = True

    def __init__(self, path: Path) -> None:
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"{path}: tiktoken files need tiktoken: pip install 'tttlm[tiktoken]'"
                            ) from None
        self._data = path.read_bytes()
        ranks = _read_tiktoken_ranks(self._data, path)
        n = len(ranks)
        if n == 128000:
            pattern = _PAT_LLAMA3
            names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                     "<|python_tag|>"]
            names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
            specials = {name: n + i for i, name in enumerate(names)}
            bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
        elif n == 100256:
            pattern = _PAT_CL100K
            specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                        "<|endofprompt|>": 100276}
            bos = eos = "<|endoftext|>"
        elif n == 50256:
            pattern, specials = _PAT_R50K, {"<|endoftext|>": 50256}
            bos = eos = "<|endoftext|>"
        else:
            top = max(ranks.values()) + 1
            pattern, specials = _PAT_CL100K, {BOS_TOKEN: top, EOS_TOKEN: top + 1}
            bos, eos = BOS_TOKEN, EOS_TOKEN
        self._enc = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._specials = set(specials.values())
        self.bos_id, self.eos_id = specials[bos], specials[eos]
        self.vocab_size = self._enc.max_token_value + 1

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([i for i in ids if i not in self._specials], errors="replace")

    def save(self, directory: Path) -> dict[str, Any]:
        (directory / TIKTOKEN_FILE).write_bytes(self._data)
        return self._entry(TIKTOKEN_FILE)


def _splits_between_words(config: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is GPT-2/Llama-3 style: no normalizer, a regex pre-tokenizer
    whose pieces never join a letter to a following space, and no added words that could."""
    if config.get("normalizer") is not None:
        return False
    if any(not t.get("special") for t in config.get("added_tokens", [])):
        return False
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 3 and _is_split(steps[1]) and _CAP_PATTERN.fullmatch(_regex(steps[1])):
        steps = [steps[0], steps[2]]  # cutting each piece from its start keeps the cuts
    return (len(steps) == 2 and _is_split(steps[0]) and _regex(steps[0]) in _PATTERNS
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space"))


def _is_split(step: dict[str, Any]) -> bool:
    return (step.get("type") == "Split" and step.get("behavior") == "Isolated"
            and not step.get("invert"))


def _regex(step: dict[str, Any]) -> str:
    return str(step.get("pattern", {}).get("Regex"))


def _cap_regex(chars: int) -> str:
    """Pieces of at most ``chars`` characters, cut from the start of each pre-token."""
    return rf"[\s\S]{{1,{chars}}}"


def split_text(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each cut just before a space that
    has a letter on both sides, where the pre-tokenizers of splittable tokenizers end a token
    anyway. Text with no such space (long runs of CJK, say) stays whole."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not (text[cut - 1].isalpha() and text[cut + 1:cut + 2].isalpha()):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _read_tiktoken_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}:{lineno}: not a tiktoken BPE line (expected "
                            "'<base64 token> <rank>')") from None
    if not ranks:
        raise DataError(f"{path}: empty tiktoken file")
    return ranks


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as fh:
        first = fh.readline(4096)
    return bool(_TIKTOKEN_LINE.match(first.rstrip(b"\n")))


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None,
              progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``vocab_size`` ids in all.

    Byte-level so that every text round-trips exactly and no input is ever unknown. ids 0 and 1
    are BOS and EOS, then the 256 byte symbols, then the merges; a corpus too small for all the
    merges gives a smaller vocabulary. The pre-tokenizer is GPT-2's split followed by a cut of
    every piece longer than :data:`MAX_PRETOKEN_CHARS`, which bounds the training time whatever
    the text (see there); progress bars are drawn only on a terminal.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    from tttlm.progress import is_terminal

    if vocab_size < MIN_TRAIN_VOCAB:
        raise DataError(f"train:{vocab_size}: a byte-level BPE needs vocab size >= "
                        f"{MIN_TRAIN_VOCAB} (256 bytes + BOS + EOS)")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PAT_R50K), behavior="isolated"),
        pre_tokenizers.Split(Regex(_cap_regex(MAX_PRETOKEN_CHARS)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
        show_progress=progress and is_terminal(sys.stderr),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return HFTokenizer(tok, f"train:{vocab_size}")


def parse_train_spec(spec: str) -> int | None:
    """The V of a ``train:V`` spec, or None when ``spec`` is not a training spec."""
    if not spec.startswith("train:"):
        return None
    value = spec.removeprefix("train:")
    if not value.isdigit():
        raise DataError(f"unknown tokenizer spec {spec!r}: the size in train:V must be an integer")
    return int(value)


def folder_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer a model or data folder keeps (``meta.json`` of prepared data,
    ``tokenizer.json``, ``tokenizer.tiktoken``; the trainer saves the data's into its model
    folders), or ``None`` when it keeps none."""
    folder = Path(folder)
    if (folder / META_FILE).is_file() or (folder / HF_FILE).is_file():
        return resolve_tokenizer(str(folder))
    if (folder / TIKTOKEN_FILE).is_file():
        return resolve_tokenizer(f"tiktoken:{folder / TIKTOKEN_FILE}")
    return None


def resolve_tokenizer(spec: str, *, train_texts: Callable[[], Iterable[str]] | None = None,
                      train_docs: int | None = None, progress: bool = False) -> Tokenizer:
    """Build the tokenizer a spec names.

    ``spec`` is ``bytes``; ``train:V`` (a byte-level BPE trained on ``train_texts()``, which
    yields ``train_docs`` documents); a ``tokenizer.json`` file or a folder holding one; a
    tiktoken BPE file (``tiktoken:PATH`` forces that reading); or a prepared data folder, whose
    tokenizer is reused.
    """
    if spec == "bytes":
        return ByteTokenizer()
    size = parse_train_spec(spec)
    if size is not None:
        if train_texts is None:
            raise DataError(f"{spec}: training a tokenizer needs the corpus")
        return train_bpe(train_texts(), size, length=train_docs, progress=progress)
    forced = spec.startswith("tiktoken:")
    path = Path(spec.removeprefix("tiktoken:"))
    if path.is_dir():
        if (path / META_FILE).is_file():
            return load_tokenizer(path)
        if (path / HF_FILE).is_file():
            return HFTokenizer.from_file(path / HF_FILE)
        raise DataError(f"{path}: folder holds neither {META_FILE} nor {HF_FILE}")
    if path.is_file():
        if forced:
            return TiktokenTokenizer(path)
        if path.suffix.lower() == ".json":
            return HFTokenizer.from_file(path)
        if _looks_like_tiktoken(path):
            return TiktokenTokenizer(path)
        raise DataError(f"{path}: neither a tokenizer.json nor a tiktoken BPE file")
    raise DataError(f"unknown tokenizer spec {spec!r}: expected 'bytes', 'train:V', a "
                    "tokenizer.json, a tiktoken BPE file or a prepared data folder")


def tokenizer_from_entry(entry: dict[str, Any], directory: Path) -> Tokenizer:
    """Rebuild a tokenizer from its ``meta.json`` entry and the files beside it."""
    kind = entry.get("kind")
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf":
        tok = HFTokenizer.from_file(directory / entry["file"])
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(directory / entry["file"])
    else:
        raise DataError(f"{directory / META_FILE}: unknown tokenizer kind {kind!r}")
    for key in ("vocab_size", "bos_id", "eos_id"):
        if getattr(tok, key) != entry[key]:
            raise DataError(f"{directory}: tokenizer file gives {key}={getattr(tok, key)} but "
                            f"meta.json says {entry[key]}; the folder was modified")
    return tok


def load_tokenizer(prepared_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer that produced the tokens of a prepared data folder."""
    return tokenizer_from_entry(read_meta(prepared_dir)["tokenizer"], Path(prepared_dir))
