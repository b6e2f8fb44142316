"""Training sequences from a prepared data folder, and a resumable, rank-sharded loader.

A split's stream of N tokens is cut into windows of ``seq_len + 1`` tokens that start every
``seq_len`` tokens, so consecutive windows share one token: every token after the first is a
target exactly once, and the windows ignore document boundaries as the official pipeline does
(a document longer than ``seq_len`` spans several windows; short ones share a window).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset

from tttlm.data.errors import DataError
from tttlm.data.meta import read_meta


class Batch(NamedTuple):
    """One window ([T]) or a batch of them ([B, T]).

    ``labels`` are ``input_ids`` shifted left by one; ``loss_mask`` is ``labels != BOS``
    (bool), the official rule that skips predicting a document's first token from the previous
    document.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


class TokenDataset(Dataset):
    """Windows of one split of a prepared folder, read through ``np.memmap``.

    Memory-mapping keeps start-up instant and memory flat however large the corpus: only the
    pages a batch touches are read.
    """

    def __init__(self, prepared_dir: str | os.PathLike[str], split: str = "train",
                 seq_len: int = 2048) -> None:
        self.directory = Path(prepared_dir)
        self.meta = read_meta(self.directory)
        splits = self.meta["splits"]
        if split not in splits:
            raise DataError(f"{self.directory}: no {split!r} split (has: {', '.join(splits)})")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.split, self.seq_len = split, seq_len
        self.bos_id: int = self.meta["bos_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.max_token_id = int(self.meta["max_token_id"])
        if not 0 <= self.max_token_id < self.vocab_size:
            raise DataError(f"{self.directory / 'meta.json'}: max_token_id {self.max_token_id} "
                            f"is outside the vocab of {self.vocab_size}; the file was modified: "
                            "prepare the data again")
        entry = splits[split]
        self.doc_offsets = np.asarray(entry["doc_offsets"], dtype=np.int64)
        self._shards = self._open_shards()
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens < seq_len + 1:
            raise DataError(f"{self.directory} split {split!r} has {self.num_tokens} tokens: "
                            f"too few for seq_len={seq_len}; the longest possible is "
                            f"seq_len={self.num_tokens - 1}")

    def _open_shards(self) -> list[np.ndarray]:
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        shards = []
        for shard in self.meta["splits"][self.split]["shards"]:
            path = self.directory / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or not {expected} bytes as meta.json says; "
                                "prepare the data again")
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return shards

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory maps (which would pickle as their whole contents), so that
        DataLoader workers started by spawn reopen the files instead."""
        return {**self.__dict__, "_shards": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shards = self._open_shards()

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream, across shard boundaries.

        Every read is checked against the largest id ``meta.json`` records (one ``max`` over
        the tokens read, nothing next to a training step), so a damaged or edited shard is
        reported here, naming it, and not as an index error deep inside the embedding.
        """
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        first = start
        parts = [np.empty(0, dtype=self._shards[0].dtype)]
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            lo = start - self._starts[i]
            take = min(stop - start, len(self._shards[i]) - lo)
            parts.append(self._shards[i][lo:lo + take])
            start += take
            i += 1
        out = np.concatenate(parts)
        if len(out) and int(out.max()) > self.max_token_id:
            self._bad_token(first, out)
        return out

    def _bad_token(self, first: int, read: np.ndarray) -> NoReturn:
        at = int(np.argmax(read > self.max_token_id))
        position = first + at
        i = int(np.searchsorted(self._starts, position, side="right")) - 1
        shard = self.meta["splits"][self.split]["shards"][i]["file"]
        raise DataError(f"{self.directory / shard}: token {position - int(self._starts[i])} is "
                        f"id {int(read[at])}, but the vocab is {self.vocab_size} and meta.json "
                        f"records no id above {self.max_token_id}; the shard is damaged or was "
                        "modified: prepare the data again")

    def window(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of window ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} outside [0, {len(self)})")
        start = index * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def batch(self, indices: np.ndarray | list[int]) -> Batch:
        """The windows ``indices`` stacked into int64 tensors ``[B, T]``."""
        rows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)  # [B, T+1]
        return _to_batch(torch.from_numpy(rows), self.bos_id)

    def __getitem__(self, index: int) -> Batch:
        return _to_batch(torch.from_numpy(self.window(index).astype(np.int64)), self.bos_id)


def _to_batch(rows: torch.Tensor, bos_id: int) -> Batch:
    labels = rows[..., 1:].contiguous()
    return Batch(rows[..., :-1].contiguous(), labels, labels != bos_id)


class SequenceSampler:
    """Per-rank batches of window indices: a fresh seeded permutation every epoch.

    Step ``s`` of an epoch takes the global batch ``perm[s*B*W : (s+1)*B*W]`` and rank ``r``
    its ``r``-th block of ``B``; ranks thus see disjoint windows, every rank runs the same number
    of steps (a remainder smaller than a global batch is dropped each epoch), and the union over
    ranks equals a single-rank run with batch ``B*W``. The position (epoch, step) is the same on
    every rank, so one rank's ``state_dict()`` restores all of them.
    """

    def __init__(self, num_windows: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 num_epochs: int | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad sampler layout: batch_size={batch_size}, rank={rank}, "
                            f"world_size={world_size}")
        self.num_windows, self.batch_size = num_windows, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.num_epochs = rank, world_size, num_epochs
        self.steps_per_epoch = num_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_windows} window(s) cannot fill one global batch of "
                            f"{batch_size * world_size} (batch {batch_size} x {world_size} "
                            "rank(s)); use a smaller batch or seq_len")
        self.epoch = 0
        self.step = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
                self._perm = rng.permutation(self.num_windows)
            else:
                self._perm = np.arange(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        start = (self.step * self.world_size + self.rank) * self.batch_size
        indices = self._permutation()[start:start + self.batch_size]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, Any]:
        """The position, plus the layout it is only meaningful for."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "shuffle": self.shuffle, "num_windows": self.num_windows,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; refuses a state saved for another data layout."""
        for key in ("seed", "shuffle", "num_windows", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"sampler state was saved with {key}={state[key]!r}, this "
                                f"sampler has {getattr(self, key)!r}; resuming would not "
                                "continue the same sequence")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class TokenLoader:
    """Batches ``[B, T]`` of a :class:`TokenDataset` in :class:`SequenceSampler` order.

    Reads happen in the calling process: a memory-mapped slice per window is cheap enough that
    worker processes would only add nondeterminism and start-up time.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 num_epochs: int | None = None) -> None:
        self.dataset = dataset
        self.sampler = SequenceSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle,
                                       rank=rank, world_size=world_size, num_epochs=num_epochs)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.dataset.batch(next(self.sampler))

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: save it with the checkpoint."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the saved loader stopped."""
        self.sampler.load_state_dict(state)


def check_vocab(dataset_meta: Mapping[str, Any] | str | os.PathLike[str],
                vocab_size: int) -> None:
    """Fail when the data holds a token id the model's embedding cannot look up.

    ``dataset_meta`` is a prepared folder's ``meta.json`` (as a dict) or the folder itself. An
    out-of-range id would otherwise surface as an index error deep inside the embedding, or as
    silent garbage on some devices.
    """
    meta = dataset_meta if isinstance(dataset_meta, Mapping) else read_meta(dataset_meta)
    max_id = int(meta["max_token_id"])
    if max_id >= vocab_size:
        raise DataError(f"the data holds token id {max_id} (tokenizer {meta['tokenizer']['spec']},"
                        f" vocab {meta['vocab_size']}) but the model's vocab_size is "
                        f"{vocab_size}; use vocab_size >= {max_id + 1} or a smaller tokenizer")
