"""Tokenizers: exact round trips, BOS/EOS ids, spec parsing and its errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from tttlm.data import DataError, resolve_tokenizer, train_bpe
from tttlm.data.tokenizer import ByteTokenizer, split_text

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession\n",
    "of a good fortune, must be in want of a wife.\n\n  Indented   spaces\tand tabs.\r\n",
    "Ünïcödé, 日本語, emoji 🙂 and a literal <|bos|> that must stay text.",
]


def test_bytes_round_trip_and_ids() -> None:
    tok = resolve_tokenizer("bytes")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_trained_bpe_round_trip_and_specials() -> None:
    tok = train_bpe(TEXTS * 20, 300)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert 258 < tok.vocab_size <= 300
    unseen = "Zebras quizzically vex 🦓 — ∑ unseen symbols"
    for text in [*TEXTS, unseen]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())
    batch = tok.encode_batch(TEXTS)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in TEXTS]


def test_tokenizer_json_loads_the_same(tmp_path: Path) -> None:
    tok = train_bpe(TEXTS * 20, 290)
    tok.save(tmp_path)
    for spec in (tmp_path / "tokenizer.json", tmp_path):
        again = resolve_tokenizer(str(spec))
        assert (again.vocab_size, again.bos_id, again.eos_id) == (tok.vocab_size, 0, 1)
        assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def _word_level(tmp_path: Path, specials: list[str]) -> Path:
    vocab = {name: i for i, name in enumerate([*specials, "[UNK]", "hello", "world"])}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    rust.save(str(path))
    return path


def test_tokenizer_json_bos_eos_by_name(tmp_path: Path) -> None:
    tok = resolve_tokenizer(str(_word_level(tmp_path, ["<unk>", "<s>", "</s>"])))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 6)
    assert tok.encode("hello world") == [4, 5]


def test_tokenizer_json_without_bos_is_an_error(tmp_path: Path) -> None:
    path = _word_level(tmp_path, ["[CLS]", "[SEP]"])
    with pytest.raises(DataError, match=r"tokenizer\.json: cannot tell its BOS/EOS tokens"):
        resolve_tokenizer(str(path))


def test_bad_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(DataError, match=r"not a Hugging Face tokenizer\.json"):
        resolve_tokenizer(str(path))


def _tiktoken_file(path: Path, extra: list[bytes]) -> Path:
    tokens = [bytes([i]) for i in range(256)] + extra
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


def test_tiktoken_generic_file(tmp_path: Path) -> None:
    pytest.importorskip("tiktoken")
    path = _tiktoken_file(tmp_path / "small.bpe", [b"th", b"he", b"the", b" the"])
    tok = resolve_tokenizer(str(path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (262, 260, 261)
    ids = tok.encode("the other theme")
    assert 259 in ids
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    out = tmp_path / "out"
    out.mkdir()
    assert tok.save(out)["file"] == "tokenizer.tiktoken"
    again = resolve_tokenizer(f"tiktoken:{out / 'tokenizer.tiktoken'}")
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_tiktoken_llama3_layout(tmp_path: Path) -> None:
    pytest.importorskip("tiktoken")
    fillers = [b"\xff" + i.to_bytes(3, "big") for i in range(128000 - 256)]
    tok = resolve_tokenizer(str(_tiktoken_file(tmp_path / "tokenizer.model", fillers)))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)


@pytest.mark.parametrize(("spec", "message"), [
    ("gpt7", r"unknown tokenizer spec 'gpt7': expected 'bytes', 'train:V'"),
    ("train:abc", r"the size in train:V must be an integer"),
    ("train:100", r"needs vocab size >= 258"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        resolve_tokenizer(spec, train_texts=lambda: TEXTS)


def test_file_of_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("hello\nworld\n")
    with pytest.raises(DataError, match=r"vocab\.txt: neither a tokenizer\.json nor a tiktoken"):
        resolve_tokenizer(str(path))


def test_byte_tokenizer_batch_matches_encode() -> None:
    tok = ByteTokenizer()
    assert [a.tolist() for a in tok.encode_batch(TEXTS)] == [tok.encode(t) for t in TEXTS]


MIXED = ("Chapter 1.\n\nIt's the 2nd time: \"Hello,  world\"!\n\t  Tabs, café naïve x² y³ — "
         "日本語 text; don't stop\r\nat 10,000 words.  Trailing   spaces   \n\n\nEnd") * 7


def _llama3_style(tmp_path: Path, normalizer: bool = False) -> Path:
    from tokenizers import Regex, decoders, normalizers, trainers

    from tttlm.data.tokenizer import _PAT_LLAMA3

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PAT_LLAMA3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rust.decoder = decoders.ByteLevel()
    if normalizer:
        rust.normalizer = normalizers.NFKC()
    rust.train_from_iterator(TEXTS * 10 + [MIXED], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    rust.save(str(path))
    return path


def test_pieces_encode_like_the_whole_text(tmp_path: Path) -> None:
    pytest.importorskip("tiktoken")
    toks = [ByteTokenizer(), train_bpe(TEXTS * 10 + [MIXED], 400),
            resolve_tokenizer(str(_llama3_style(tmp_path))),
            resolve_tokenizer(str(_tiktoken_file(tmp_path / "t.bpe", [b"th", b"he", b" the"])))]
    for size in (1, 5, 23, 200):
        pieces = split_text(MIXED, size)
        assert "".join(pieces) == MIXED and len(pieces) > len(MIXED) // (size + 40)
        for tok in toks:
            assert tok.splittable
            assert [i for p in pieces for i in tok.encode(p)] == tok.encode(MIXED)


def test_tokenizer_with_normalizer_is_not_cut(tmp_path: Path) -> None:
    assert not resolve_tokenizer(str(_llama3_style(tmp_path, normalizer=True))).splittable
    assert split_text("日本語" * 100, 10) == ["日本語" * 100]
