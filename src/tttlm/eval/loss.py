"""Loss by context length: per-token NLL by position over long held-out sequences.

The paper's "loss vs context length" table evaluates, for each context length L, sequences of L
tokens and reports the mean NLL of all their counted tokens. Here a sequence is a contiguous
window of L + 1 tokens (L inputs, L shifted targets), taken either inside one document
(``document`` windows, the default: the model never straddles two books) or anywhere in the
concatenated stream (``stream`` windows, the official training layout). Windows start every L
tokens, so consecutive windows share one token and every target is scored once.

Loss mask, everywhere: a target equal to BOS is not counted (predicting the start of the next
document from the previous one is noise), as in the official training loss.
"""

from __future__ import annotations

import copy
import csv
import enum
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.devices import autocast
from tttlm.eval.adapters import EvalError, TokenCorpus
from tttlm.eval.common import (
    EvalModel,
    PartialResults,
    progress_bar,
    write_json,
)
from tttlm.files import atomic_write_bytes

RESULT_TYPE = "tttlm.eval.loss"
RESULT_VERSION = 1
LOSS_MASK_RULE = "a target equal to BOS is not counted"


class WindowMode(str, enum.Enum):
    """Where evaluated sequences may come from."""

    DOCUMENT = "document"  # a window lies inside one document
    STREAM = "stream"  # a window is any slice of the concatenated stream (documents joined)


@dataclass(frozen=True)
class Window:
    """One evaluated sequence: tokens ``[start, start + length + 1)`` of the stream."""

    index: int
    start: int
    doc: int | None


def describe_windows(mode: WindowMode) -> str:
    """The sentence reports use to say what a sequence is."""
    if mode is WindowMode.DOCUMENT:
        return ("each sequence is a contiguous window of L+1 tokens of one document (L inputs, "
                "L targets); windows start every L tokens from the document's BOS")
    return ("each sequence is a contiguous window of L+1 tokens of the concatenated stream "
            "(BOS before every document, no attention masking between documents); windows "
            "start every L tokens")


def max_length(corpus: TokenCorpus, mode: WindowMode | str) -> int:
    """The longest context length the data allows in this window mode."""
    mode = WindowMode(mode)
    if mode is WindowMode.DOCUMENT:
        return int(corpus.doc_lengths().max(initial=0)) - 1
    return corpus.num_tokens - 1


def plan_windows(corpus: TokenCorpus, length: int, mode: WindowMode | str,
                 max_sequences: int | None = None) -> list[Window]:
    """The windows of ``length`` (+1) tokens to evaluate, in a fixed order.

    Document windows are interleaved across documents (first window of every document, then
    the second, ...) and stream windows are thinned evenly, so that ``max_sequences`` takes a
    sample of all books rather than the beginning of the first one.
    """
    mode = WindowMode(mode)
    limit = max_length(corpus, mode)
    if length > limit:
        where = ("one document" if mode is WindowMode.DOCUMENT else "the stream")
        hint = (f"; --windows stream allows up to {corpus.num_tokens - 1}"
                if mode is WindowMode.DOCUMENT and corpus.num_tokens - 1 > limit else "")
        raise EvalError(f"length {length} needs {length + 1} tokens in {where}, but the "
                        f"longest available in {corpus.source} has {limit + 1}; the largest "
                        f"possible length is {max(limit, 0)}{hint}")
    if mode is WindowMode.STREAM:
        starts = range(0, corpus.num_tokens - length, length)
        windows = [Window(i, s, None) for i, s in enumerate(starts)]
    else:
        counts = (corpus.doc_lengths() - 1) // length  # windows in each document
        order = [(int(corpus.doc_offsets[d]) + j * length, d)
                 for j in range(int(counts.max(initial=0)))
                 for d in range(len(counts)) if j < counts[d]]
        windows = [Window(i, start, d) for i, (start, d) in enumerate(order)]
    if max_sequences is not None and max_sequences < len(windows):
        if mode is WindowMode.STREAM:
            # Evenly spaced over the stream, not its first documents; indices stay those of
            # the full plan, so results keyed by them are reused across --max-sequences.
            picks = np.linspace(0, len(windows) - 1, max_sequences).round().astype(int)
            windows = [windows[i] for i in sorted(set(picks.tolist()))]
        else:
            windows = windows[:max_sequences]
    return windows


def curve_bin(length: int, curve_points: int) -> int:
    """Positions per point of the stored per-position curve (1: every position)."""
    return max(1, math.ceil(length / max(1, curve_points)))


def _binned(values: np.ndarray, size: int) -> list[float]:
    """Sums of consecutive groups of ``size`` values (the last group may be shorter)."""
    pad = (-len(values)) % size
    padded = np.concatenate([values, np.zeros(pad, values.dtype)]) if pad else values
    return padded.reshape(-1, size).sum(1).tolist()


def bucket_means(values: Sequence[float | None], width: int,
                 counts: Sequence[int] | None = None) -> list[float | None]:
    """Means of consecutive ``width``-value buckets (the last may be shorter), each value
    weighing its count (default 1); a ``None`` value (no data) weighs nothing, and a bucket
    without data is ``None``."""
    means = _floats(values)
    weights = np.ones(len(means)) if counts is None else np.asarray(counts, np.float64)
    weights = np.where(np.isnan(means), 0.0, weights)
    sums = np.asarray(_binned(np.nan_to_num(means) * weights, width))
    totals = np.asarray(_binned(weights, width))
    return _nullable(np.where(totals > 0, sums / np.maximum(totals, 1e-300), np.nan))


def coarsen_curves(report: dict[str, Any], width: int) -> dict[str, Any]:
    """A copy of a loss report whose per-position curves have ``width`` times fewer points:
    each point the token-weighted mean of ``width`` consecutive ones (for plots of curves too
    noisy to read position by position). Differences against the first model are redone."""
    out = copy.deepcopy(report)
    for lengths in out["results"].values():
        for entry in lengths.values():
            curve = entry["curve"]
            counts = curve["count"]
            curve.update(bin=curve["bin"] * width, positions=curve["positions"][::width],
                         mean_nll=bucket_means(curve["mean_nll"], width, counts),
                         count=[int(c) for c in _binned(np.asarray(counts, np.int64), width)])
            curve.pop("diff_vs_first", None)
    add_differences(out)
    return out


def score_windows(model: EvalModel, corpus: TokenCorpus, windows: Sequence[Window], length: int,
                  *, device: torch.device, batch_size: int = 1,
                  curve_points: int = 1024) -> list[dict[str, Any]]:
    """One record per window: counted tokens, NLL sum and the binned per-position sums."""
    records = []
    size = curve_bin(length, curve_points)
    for lo in range(0, len(windows), batch_size):
        batch = windows[lo:lo + batch_size]
        rows = np.stack([np.asarray(corpus.tokens[w.start:w.start + length + 1], np.int64)
                         for w in batch])
        ids = torch.from_numpy(rows).to(device)  # [B, L+1]
        inputs, labels = ids[:, :-1], ids[:, 1:]
        mask = labels != corpus.bos_id  # [B, L]
        with torch.inference_mode(), autocast(device):
            out = model.model(inputs, labels=labels, loss_mask=mask, ttt=model.ttt)
        assert out.token_nll is not None
        nll = out.token_nll.double().cpu().numpy()  # [B, L]
        counted = mask.cpu().numpy()
        for b, w in enumerate(batch):
            kept = np.where(counted[b], nll[b], 0.0)
            records.append({"index": w.index, "start": w.start, "doc": w.doc,
                            "count": int(counted[b].sum()), "sum": float(kept.sum()),
                            "bin": size, "bin_sum": _binned(kept, size),
                            "bin_count": [int(c) for c in _binned(counted[b].astype(np.int64),
                                                                  size)]})
    return records


def evaluate_loss(models: Sequence[EvalModel], corpus: TokenCorpus, lengths: Sequence[int], *,
                  mode: WindowMode | str = WindowMode.DOCUMENT,
                  max_sequences: int | None = None, batch_size: int = 1,
                  device: torch.device | None = None, out_dir: str | os.PathLike[str] | None = None,
                  curve_points: int = 1024, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate every model at every length and return the report (see :func:`summarize`).

    With ``out_dir``, every sequence's result is appended to ``out_dir/partial.jsonl`` as soon
    as its batch is done and results already there are reused: rerunning an interrupted
    command continues where it stopped.
    """
    mode = WindowMode(mode)
    if not models:
        raise EvalError("no model to evaluate; give at least one --model")
    if batch_size < 1:
        raise EvalError(f"batch size {batch_size} is not positive; give --batch-size 1 or more")
    if max_sequences is not None and max_sequences < 1:
        raise EvalError(f"max sequences {max_sequences} is not positive; give --max-sequences "
                        "1 or more, or leave it out")
    if not lengths or min(lengths) < 1:
        raise EvalError(f"lengths {list(lengths)} must be positive integers; give --lengths "
                        "such as 1024,8k")
    lengths = sorted(set(lengths))
    device = device or models[0].model.embed.weight.device
    check_corpus(models, corpus)
    plans = {L: plan_windows(corpus, L, mode, max_sequences) for L in lengths}
    store = PartialResults(out_dir) if out_dir is not None else None
    done = store.load() if store is not None else {}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    total = sum(len(w) for w in plans.values()) * len(models)
    with progress_bar(total, "eval loss", progress) as bar:
        for em in models:
            results[em.label] = {}
            for L, windows in plans.items():
                # A result is reused only for the same data, windows, model, mode and bins.
                run = (corpus.fingerprint, mode.value, em.fingerprint, em.label, L,
                       curve_bin(L, curve_points))

                def key(index: int, run: tuple = run) -> tuple:
                    return (*run, index)

                have = [done[key(w.index)] for w in windows if key(w.index) in done]
                todo = [w for w in windows if key(w.index) not in done]
                bar.update(len(have))
                if have and log is not None:
                    log(f"{em.label} L={L}: reusing {len(have)} sequence(s) from {store.path}")
                started = time.perf_counter()
                for lo in range(0, len(todo), batch_size):
                    batch = todo[lo:lo + batch_size]
                    new = score_windows(em, corpus, batch, L, device=device,
                                        batch_size=batch_size, curve_points=curve_points)
                    for record in new:
                        record.update(key=list(key(record["index"])), model=em.label, length=L)
                    if store is not None:
                        store.append(new)
                    have.extend(new)
                    bar.update(len(batch))
                if todo and log is not None:
                    seconds = time.perf_counter() - started
                    log(f"{em.label} L={L}: {len(todo)} sequence(s) in {seconds:.1f} s")
                results[em.label][L] = sorted(have, key=lambda r: r["index"])
    return summarize(models, corpus, lengths, mode, results, device=device)


def check_corpus(models: Sequence[EvalModel], corpus: TokenCorpus) -> None:
    """Refuse data a model cannot read (ids past its vocabulary, another BOS)."""
    top = int(np.max(corpus.tokens)) if corpus.num_tokens else 0
    for em in models:
        config = em.model.config
        if top >= config.vocab_size:
            raise EvalError(f"{corpus.source} holds token id {top} but {em.label} has "
                            f"vocab_size {config.vocab_size}: the data was tokenized with "
                            "another tokenizer; prepare it with the model's tokenizer")
        if config.bos_token_id != corpus.bos_id:
            raise EvalError(f"{corpus.source} starts documents with BOS id {corpus.bos_id} but "
                            f"{em.label} was built with bos_token_id {config.bos_token_id}: the "
                            "data was tokenized with another tokenizer; prepare it with the "
                            "model's tokenizer")


def summarize(models: Sequence[EvalModel], corpus: TokenCorpus, lengths: Sequence[int],
              mode: WindowMode, results: dict[str, dict[int, list[dict[str, Any]]]],
              device: torch.device | None = None) -> dict[str, Any]:
    """Aggregate per-sequence records into the report written as ``loss.json``.

    ``mean_nll`` at length L is the token-weighted mean NLL of every counted target of every
    sequence of length L; ``stderr`` the standard error of the per-sequence means; the curve
    gives the mean NLL at each position (averaged over sequences; binned for long L);
    ``diff_vs_first`` (and its paired ``diff_stderr`` over the same windows) compares with the
    first model.
    """
    report_models = {em.label: {str(L): _length_summary(results[em.label][L], L)
                                for L in lengths} for em in models}
    report = {
        "type": RESULT_TYPE,
        "version": RESULT_VERSION,
        "data": {"source": corpus.source, "fingerprint": corpus.fingerprint,
                 "documents": len(corpus.doc_offsets), "tokens": corpus.num_tokens,
                 "windows": mode.value, "window_rule": describe_windows(mode),
                 "bos_id": corpus.bos_id, "loss_mask": LOSS_MASK_RULE},
        "lengths": list(lengths),
        "models": [em.info for em in models],
        "results": report_models,
        "environment": {"torch": torch.__version__, "device": str(device),
                        "python": sys.version.split()[0]},
    }
    add_differences(report)
    return report


def add_differences(report: dict[str, Any]) -> None:
    """Fill ``diff_vs_first``, its paired ``diff_stderr`` and the curve differences of every
    model but the first, in place (also used on reports merged by ``eval compare``)."""
    labels = [m["label"] for m in report["models"]]
    for label in labels[1:]:
        for L in report["lengths"]:
            mine = report["results"][label].get(str(L))
            base = report["results"][labels[0]].get(str(L))
            if mine is None or base is None:
                continue
            a, b = mine["mean_nll"], base["mean_nll"]
            mine["diff_vs_first"] = None if a is None or b is None else a - b
            mine["diff_stderr"] = _paired_stderr(mine.get("per_sequence", []),
                                                 base.get("per_sequence", []))
            mine["curve"]["diff_vs_first"] = None
            if mine["curve"]["positions"] == base["curve"]["positions"]:
                diff = _floats(mine["curve"]["mean_nll"]) - _floats(base["curve"]["mean_nll"])
                mine["curve"]["diff_vs_first"] = _nullable(diff)


def _length_summary(records: list[dict[str, Any]], length: int) -> dict[str, Any]:
    count = sum(r["count"] for r in records)
    total = sum(r["sum"] for r in records)
    means = np.array([r["sum"] / r["count"] for r in records if r["count"]])
    mean = total / count if count else None
    stderr = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None
    size = records[0]["bin"] if records else 1
    n_bins = math.ceil(length / size)
    bin_sum, bin_count = np.zeros(n_bins), np.zeros(n_bins, np.int64)
    for r in records:
        bin_sum += np.asarray(r["bin_sum"])
        bin_count += np.asarray(r["bin_count"], np.int64)
    curve = np.where(bin_count > 0, bin_sum / np.maximum(bin_count, 1), np.nan)
    return {"sequences": len(records), "tokens": count, "mean_nll": mean,
            # [index, counted tokens, NLL sum] of every sequence, for paired comparisons.
            "per_sequence": [[r["index"], r["count"], r["sum"]] for r in records],
            "ppl": math.exp(mean) if mean is not None and mean < 700 else None,
            "stderr": stderr,
            "curve": {"bin": size, "positions": list(range(0, length, size)),
                      "mean_nll": _nullable(curve), "count": bin_count.tolist()}}


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """JSON numbers (None for "no data") as a float array with NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _nullable(values: np.ndarray) -> list[float | None]:
    """A float array as JSON numbers, NaN written as null (JSON has no NaN)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def _paired_stderr(mine: Sequence[Sequence[float]],
                   base: Sequence[Sequence[float]]) -> float | None:
    """Standard error of the per-sequence mean-NLL differences over shared windows."""
    by_index = {int(i): s / c for i, c, s in base if c}
    diffs = [s / c - by_index[int(i)] for i, c, s in mine if c and int(i) in by_index]
    if len(diffs) < 2:
        return None
    return float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))


# --------------------------------------------------------------------------------- output
def format_table(report: dict[str, Any]) -> str:
    """The loss-vs-context-length table (differences against the first model in brackets)."""
    lengths = report["lengths"]
    labels = [m["label"] for m in report["models"]]
    width = max(12, *(len(label) for label in labels))
    head = f"{'model':<{width}}" + "".join(f"{_short(L):>18}" for L in lengths)
    lines = [head, "-" * len(head)]
    for i, label in enumerate(labels):
        cells = []
        for L in lengths:
            entry = report["results"][label][str(L)]
            cell = _fmt(entry["mean_nll"], "{:.4f}")
            if i:
                cell += f" ({_fmt(entry['diff_vs_first'], '{:+.4f}')})"
            cells.append(f"{cell:>18}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    seqs = ", ".join(f"{_short(L)}: {report['results'][labels[0]][str(L)]['sequences']}"
                     for L in lengths)
    lines.append(f"sequences per length ({report['data']['windows']} windows): {seqs}")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def _short(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def write_loss_outputs(report: dict[str, Any], out_dir: str | os.PathLike[str],
                       plots: bool = True) -> list[Path]:
    """Write ``loss.json``, ``loss_table.csv``, ``loss_curves.csv`` and the PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss.json", out / "loss_table.csv", out / "loss_curves.csv"]
    write_json(written[0], report)
    table = [["model", "length", "sequences", "tokens", "mean_nll", "stderr", "ppl",
              "diff_vs_first", "diff_stderr"]]
    curves = [["model", "length", "position_start", "position_end", "mean_nll", "count",
               "diff_vs_first"]]
    for model in report["models"]:
        label = model["label"]
        for L in report["lengths"]:
            e = report["results"][label][str(L)]
            table.append([label, L, e["sequences"], e["tokens"], e["mean_nll"], e["stderr"],
                          e["ppl"], e.get("diff_vs_first"), e.get("diff_stderr")])
            curve = e["curve"]
            diffs = curve.get("diff_vs_first") or [None] * len(curve["positions"])
            for p, v, c, d in zip(curve["positions"], curve["mean_nll"], curve["count"], diffs):
                curves.append([label, L, p, min(p + curve["bin"], L), v, c, d])
    for path, rows in ((written[1], table), (written[2], curves)):
        text = io.StringIO(newline="")
        csv.writer(text).writerows([["" if v is None else v for v in row] for row in rows])
        atomic_write_bytes(path, text.getvalue().encode("utf-8"))
    if plots:
        from tttlm.eval.plots import plot_loss

        written.extend(plot_loss(report, out))
    return written

