"""``tttlm eval repeat``: the simplest picture of memory — the loss on the second reading of a
passage placed ``d`` tokens after the first.

Each sequence is ``BOS, lead, P, gap (d tokens), P``: ``P`` a held-out passage, ``lead`` and
``gap`` contiguous held-out text from elsewhere. The first ``cue`` tokens of each reading of
``P`` are a cue and not scored; the report gives the mean NLL of the rest of ``P`` at its first
reading (nothing to remember yet) and at its second, for every distance ``d``. Full attention
copies at any distance (second ≪ first); sliding-window attention copies only while the first
reading is inside its window; TTT-E2E keeps part of it in its fast weights beyond; with
retrieval (``rag="end"``: the cue is the query) the passage is quoted back and copied again.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.devices import autocast
from tttlm.eval.adapters import EvalError, TokenCorpus
from tttlm.eval.common import EvalModel, progress_bar, write_json
from tttlm.files import atomic_write_bytes


@dataclass
class RepeatSettings:
    """What :func:`evaluate_repeat` builds: ``samples`` sequences per distance."""

    distances: list[int]
    passage_len: int = 64
    cue: int = 8
    lead: int = 64
    samples: int = 4
    seed: int = 0
    rag: list[str] = field(default_factory=lambda: ["off"])
    horizon: int | None = None  # rag=end: passages indexed once this old (None: the window)

    def check(self) -> None:
        if not self.distances or min(self.distances) < 0:
            raise EvalError(f"distances {self.distances} must be given and >= 0")
        if not 0 < self.cue < self.passage_len:
            raise EvalError(f"cue={self.cue} must be in [1, passage_len={self.passage_len})")
        if self.samples < 1 or self.lead < 0:
            raise EvalError(f"samples={self.samples} must be >= 1 and lead={self.lead} >= 0")
        bad = [m for m in self.rag if m not in ("off", "end")]
        if bad:
            raise EvalError(f"rag mode(s) {bad} unknown; use off and/or end")
        if self.horizon is not None and "end" not in self.rag:
            raise EvalError(f"--rag-horizon {self.horizon} sets when --rag end indexes "
                            "passages; add end to --rag or drop --rag-horizon")


@dataclass
class RepeatItem:
    tokens: list[int]
    first: int  # index of P's first token, first reading
    second: int  # index of P's first token, second reading


def build_items(corpus: TokenCorpus, settings: RepeatSettings, distance: int) -> list[RepeatItem]:
    """``samples`` sequences with the gap ``distance``; deterministic in the seed."""
    P, lead = settings.passage_len, settings.lead
    filler = lead + distance
    stream = corpus.tokens
    if len(stream) < P + filler + 2:
        raise EvalError(f"{corpus.source} has {len(stream)} tokens; a distance of {distance} "
                        f"needs at least {P + filler + 2}; give more held-out text or shorter "
                        "distances")
    rng = np.random.default_rng([settings.seed, distance])
    items = []
    for _ in range(settings.samples):
        # The passage and the filler come from two different places of the stream.
        p0 = int(rng.integers(0, len(stream) - P))
        f0 = int(rng.integers(0, len(stream) - filler))
        passage = [int(t) for t in stream[p0:p0 + P]]
        text = [int(t) for t in stream[f0:f0 + filler]]
        tokens = [corpus.bos_id, *text[:lead], *passage, *text[lead:], *passage]
        items.append(RepeatItem(tokens, 1 + lead, 1 + lead + P + distance))
    return items


def _forward_nll(em: EvalModel, tokens: list[int], device: torch.device) -> np.ndarray:
    """NLL of every token given those before it (index 0 has none: NaN)."""
    ids = torch.tensor([tokens], device=device)
    with torch.inference_mode(), autocast(device):
        out = em.model(ids[:, :-1], labels=ids[:, 1:], ttt=em.ttt)
    assert out.token_nll is not None
    return np.concatenate([[np.nan], out.token_nll[0].double().cpu().numpy()])


def score_item(em: EvalModel, item: RepeatItem, settings: RepeatSettings, rag: str,
               device: torch.device) -> tuple[float, float]:
    """Mean NLL of the scored part of ``P`` at its first and second reading."""
    P, cue = settings.passage_len, settings.cue
    if rag == "off":
        nll = _forward_nll(em, item.tokens, device)
        return (float(nll[item.first + cue:item.first + P].mean()),
                float(nll[item.second + cue:item.second + P].mean()))
    from tttlm.inference import Engine
    from tttlm.memory import RecallSession

    engine = Engine(em.model, ttt=em.ttt)
    session = RecallSession(engine, "end", query_len=cue, horizon=settings.horizon)
    # The first reading with retrieval too: the same treatment of both readings.
    first = session.score(item.tokens[:item.first + cue],
                          item.tokens[item.first + cue:item.first + P])
    session.read(item.tokens[item.first + P:item.second])
    second = session.score(item.tokens[item.second:item.second + cue],
                           item.tokens[item.second + cue:item.second + P])
    return float(np.mean(first)), float(np.mean(second))


def evaluate_repeat(models: Sequence[EvalModel], corpus: TokenCorpus, settings: RepeatSettings,
                    *, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """The report: per model, rag mode and distance the mean first/second-reading NLL."""
    settings.check()
    full = [em.label for em in models if not em.model.config.uses_window]
    if settings.rag == ["end"] and full:
        raise EvalError(f"{', '.join(full)} has full attention: nothing leaves its window, so "
                        "rag=end does not apply; evaluate it with --rag off (or off,end)")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    items = {d: build_items(corpus, settings, d) for d in settings.distances}
    total = len(models) * len(settings.rag) * len(settings.distances)
    with progress_bar(total, "repeat", progress) as bar:
        for em in models:
            for rag in settings.rag:
                if rag == "end" and not em.model.config.uses_window:
                    continue
                label = em.label if rag == "off" else f"{em.label} + retrieval"
                rows = results.setdefault(label, {})
                for d in settings.distances:
                    pairs = [score_item(em, it, settings, rag, device) for it in items[d]]
                    first = [a for a, _ in pairs]
                    second = [b for _, b in pairs]
                    rows[str(d)] = {"first": float(np.mean(first)),
                                    "second": float(np.mean(second)),
                                    "copy_gain": float(np.mean(first) - np.mean(second)),
                                    "samples": len(pairs)}
                    bar.update(1)
    notes = ([f"rag=end skipped for full attention ({', '.join(full)}): nothing leaves its "
              "window"] if "end" in settings.rag and full else [])
    return {"task": "repeat", "settings": asdict(settings), "source": corpus.source,
            "models": [em.info for em in models], "results": results, "notes": notes}


def format_repeat_table(report: dict[str, Any]) -> str:
    """NLL of the second reading by distance (first reading in the last column)."""
    ds = report["settings"]["distances"]
    head = "| model | " + " | ".join(f"d={d}" for d in ds) + " | first reading |"
    lines = [head, "|" + "---|" * (len(ds) + 2)]
    for label, rows in report["results"].items():
        first = np.mean([rows[str(d)]["first"] for d in ds if str(d) in rows])
        cells = [f"{rows[str(d)]['second']:.3f}" if str(d) in rows else "" for d in ds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {first:.3f} |")
    return "\n".join(lines)


def write_repeat_outputs(report: dict[str, Any], out_dir: str | os.PathLike[str],
                         plots: bool = True) -> list[Path]:
    """``repeat.json``, ``repeat.csv`` and ``repeat.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "repeat.json", out / "repeat.csv"]
    write_json(written[0], report)
    rows = [["model", "distance", "first_nll", "second_nll", "copy_gain", "samples"]]
    for label, by_d in report["results"].items():
        for d, e in by_d.items():
            rows.append([label, d, e["first"], e["second"], e["copy_gain"], e["samples"]])
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write_bytes(written[1], text.getvalue().encode("utf-8"))
    if plots:
        from tttlm.eval.plots import plot_repeat

        path = plot_repeat(report, out / "repeat.png")
        if path is not None:
            written.append(path)
    return written


def default_distances(window: int | None) -> list[int]:
    """From inside the window to 16x beyond it: w/2, w, 2w, 4w, 8w, 16w."""
    w = window or 1024
    return [max(1, w // 2), w, 2 * w, 4 * w, 8 * w, 16 * w]
