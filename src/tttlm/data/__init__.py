"""Data pipeline: text corpora to token shards, tokenizers, and resumable training batches."""

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
