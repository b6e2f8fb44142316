"""Data pipeline: text corpora to token shards, tokenizers, and resumable training batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.data.books import builtin_books_paths, prepare_builtin
    from tttlm.data.dataset import Batch, SequenceSampler, TokenDataset, TokenLoader, check_vocab
    from tttlm.data.errors import DataError
    from tttlm.data.meta import read_meta
    from tttlm.data.prepare import prepare
    from tttlm.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer, train_bpe

__all__ = [
    "Batch",
    "DataError",
    "SequenceSampler",
    "TokenDataset",
    "TokenLoader",
    "Tokenizer",
    "builtin_books_paths",
    "check_vocab",
    "load_tokenizer",
    "prepare",
    "prepare_builtin",
    "read_meta",
    "resolve_tokenizer",
    "train_bpe",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["builtin_books_paths", "prepare_builtin"], "tttlm.data.books"),
    **dict.fromkeys(["Batch", "SequenceSampler", "TokenDataset", "TokenLoader", "check_vocab"],
                    "tttlm.data.dataset"),
    "DataError": "tttlm.data.errors",
    "read_meta": "tttlm.data.meta",
    "prepare": "tttlm.data.prepare",
    **dict.fromkeys(["Tokenizer", "load_tokenizer", "resolve_tokenizer", "train_bpe"],
                    "tttlm.data.tokenizer"),
})
