"""What the loss and NIAH evaluations share: models, devices, lengths, resumable results."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tttlm.config import Variant
from tttlm.eval.adapters import (
    META_FILE,
    EvalError,
    TokenCorpus,
    Tokenizer,
    has_tokenizer,
    load_prepared,
    read_documents,
    resolve_tokenizer,
    tokenize_documents,
)
from tttlm.files import atomic_write_text
from tttlm.model import TTTForCausalLM

PARTIAL_FILE = "partial.jsonl"


@dataclass
class EvalModel:
    """A loaded model with the name results are filed under and the mode it is run in.

    Attributes:
        model: the network, in eval mode, on its device.
        label: unique display name (:func:`default_label`, plus " (no TTT)" for
            ``ttt=False``).
        path: the model folder.
        ttt: whether the meta forward pass (with inner updates) runs.
        fingerprint: config hash plus the weights file's size and mtime: results computed for
            another model under the same label are never reused on resume.
    """

    model: TTTForCausalLM
    label: str
    path: str
    ttt: bool
    fingerprint: str

    @property
    def info(self) -> dict[str, Any]:
        """The model's description in result files."""
        c = self.model.config
        return {"label": self.label, "path": self.path, "variant": c.variant.value,
                "ttt": self.ttt, "window": c.window if c.uses_window else None,
                "chunk_size": c.chunk_size, "num_layers": c.num_layers,
                "hidden_size": c.hidden_size, "parameters": self.model.num_parameters(),
                "fingerprint": self.fingerprint}


def load_model(path: str | os.PathLike[str], *, device: torch.device | None = None,
               ttt: bool | None = None, label: str | None = None) -> EvalModel:
    """Load a model folder for evaluation; ``ttt=None`` keeps the model's default mode."""
    folder = Path(path)
    try:
        model = TTTForCausalLM.from_pretrained(folder, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from None
    model.eval()
    is_e2e = model.config.variant is Variant.E2E
    if ttt and not is_e2e:
        raise EvalError(f"{folder} is a {model.config.variant.value!r} model: it has no "
                        "test-time training to switch on; evaluate an e2e model")
    mode = is_e2e if ttt is None else ttt
    name = label or default_label(folder)
    if is_e2e and not mode:
        name += " (no TTT)"
    weights = folder / "model.safetensors"
    stat = weights.stat()
    digest = hashlib.sha256(
        f"{model.config.fingerprint()}:{stat.st_size}:{stat.st_mtime_ns}:{mode}".encode()
    ).hexdigest()[:16]
    return EvalModel(model=model, label=name, path=str(folder), ttt=mode, fingerprint=digest)


# The run-folder layout of tttlm.train.checkpoint: RUN/final/ and RUN/checkpoints/step_NNNNNNNN/.
_FINAL = "final"
_CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def default_label(path: str | os.PathLike[str]) -> str:
    """The name a model folder is shown under: its run's name for a run's ``final/`` model
    (``runs/125m/final`` → ``125m``), the run's name and step for a checkpoint
    (``runs/125m/checkpoints/step_00001000`` → ``125m step 1000``), else the folder's own
    name."""
    folder = Path(path)
    folder = folder.resolve() if folder.exists() else Path(os.path.abspath(folder))
    parent = folder.parent
    if folder.name == _FINAL and parent.name:
        return parent.name
    step = _STEP_DIR.match(folder.name)
    if step and parent.name == _CHECKPOINTS and parent.parent.name:
        return f"{parent.parent.name} step {int(step.group(1))}"
    return folder.name or str(folder)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Make labels unique by numbering repeats (two runs both named ``125m`` in different
    folders)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def parse_int_list(text: str | Sequence[int], name: str) -> list[int]:
    """``"1024,2k,8K"`` → ``[1024, 2048, 8192]``; sorted, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        raw = str(item).strip()
        if not raw:
            continue
        scale = 1
        if raw[-1] in "kK":
            raw, scale = raw[:-1], 1024
        try:
            value = int(raw) * scale
        except ValueError:
            raise EvalError(f"{name}: {item!r} is not an integer; give integers such as 1024 "
                            "or 8k") from None
        if value <= 0:
            raise EvalError(f"{name}: {value} is not positive; give positive integers such as "
                            "1024 or 8k")
        values.append(value)
    if not values:
        raise EvalError(f"{name} is empty; give at least one value, e.g. 1024,8k")
    return sorted(set(values))


def parse_float_list(text: str | Sequence[float], name: str, lo: float,
                     hi: float) -> list[float]:
    """Comma-separated floats within ``[lo, hi]``, sorted, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        if not str(item).strip():
            continue
        try:
            value = float(item)
        except ValueError:
            raise EvalError(f"{name}: {item!r} is not a number; give numbers in [{lo}, {hi}]"
                            ) from None
        if not lo <= value <= hi:
            raise EvalError(f"{name}: {value} is outside [{lo}, {hi}]; give numbers in that "
                            "range")
        values.append(value)
    if not values:
        raise EvalError(f"{name} is empty; give at least one number in [{lo}, {hi}]")
    return sorted(set(values))


class PartialResults:
    """Per-item results appended as JSON lines, so an interrupted evaluation loses nothing.

    Each line is a record with a ``key`` list; :meth:`done` returns the records already there so
    a rerun skips them. A line cut off by a kill mid-write is ignored (and later overwritten by
    the recomputed record, which is appended again).
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / PARTIAL_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[tuple[Any, ...], dict[str, Any]]:
        records: dict[tuple[Any, ...], dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "key" in record:
                    records[tuple(record["key"])] = record
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        # Opened per batch: a kill between batches leaves a consistent file, and a kill
        # mid-write only a cut-off last line, which gets its own line ended before appending.
        prefix = ""
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                prefix = "" if fh.read(1) == b"\n" else "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(prefix)
            for record in records:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file (flushed, then renamed) so a result file is never
    half-written."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning shown once per process (e.g. matplotlib missing, for every plot)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (a tqdm bar on a terminal, a line every few seconds in a log;
    see :mod:`tttlm.progress`), or a no-op object when disabled."""
    from tttlm.progress import progress_bar as make_bar

    with make_bar(total=total, desc=desc, unit="seq", disable=not enabled, leave=False) as bar:
        yield bar


def find_tokenizer(spec: str | None, model_dirs: Sequence[str | os.PathLike[str]]) -> Tokenizer:
    """``--tokenizer`` if given, else the tokenizer saved in the first model folder with one."""
    if spec is not None:
        return resolve_tokenizer(spec)
    for directory in model_dirs:
        if has_tokenizer(directory):
            return resolve_tokenizer(directory)
    raise EvalError(f"no tokenizer: {', '.join(map(str, model_dirs))} hold(s) no tokenizer.json; "
                    "pass --tokenizer (bytes, a tokenizer.json, a tiktoken file or a prepared "
                    "data folder)")


def load_corpus(data: str | os.PathLike[str], *, tokenizer: str | None = None,
                model_dirs: Sequence[str | os.PathLike[str]] = (), split: str | None = None,
                text_field: str = "text") -> TokenCorpus:
    """Evaluation tokens from a prepared folder (as they are) or from text files (tokenized
    with ``tokenizer`` or the models' own tokenizer, BOS before every document)."""
    path = Path(data)
    if path.is_dir() and (path / META_FILE).is_file():
        return load_prepared(path, split)
    if split is not None:
        raise EvalError(f"--split only applies to prepared data folders and {path} is text; "
                        "drop --split")
    tok = find_tokenizer(tokenizer, model_dirs)
    return tokenize_documents(read_documents(path, text_field), tok, str(path))
