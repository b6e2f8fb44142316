"""Merge loss and NIAH result files of several runs into one Markdown report with plots.

A TTT-E2E run and its baselines are usually evaluated by separate commands (different
machines, different days); ``tttlm eval compare`` reads their ``loss.json``/``niah.json`` (or
the folders holding them), merges models under unique labels in the order given (the first is
the reference of every difference), redraws the plots over all models and writes
``report.md`` beside them.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tttlm.eval import loss as loss_eval
from tttlm.eval import niah as niah_eval
from tttlm.eval.adapters import EvalError
from tttlm.eval.common import default_label, unique_labels, write_json
from tttlm.files import atomic_write_text

_RESULT_FILES = ("loss.json", "niah.json")


def find_results(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Result files named directly, or the ``loss.json``/``niah.json`` inside folders."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            inside = [path / name for name in _RESULT_FILES if (path / name).is_file()]
            if not inside:
                raise EvalError(f"{path}: folder holds no {' or '.join(_RESULT_FILES)}; give "
                                "the --out folder of `tttlm eval loss|niah` or the files")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise EvalError(f"{path}: no such file or folder; check the path")
    return found


def load_result(path: Path) -> dict[str, Any]:
    """A loss or NIAH report, checked to be one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not a JSON result file ({err}); give the loss.json or "
                        "niah.json written by `tttlm eval loss|niah`") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in (loss_eval.RESULT_TYPE, niah_eval.RESULT_TYPE):
        raise EvalError(f"{path}: not a tttlm evaluation result (type {kind!r}); expected the "
                        "loss.json or niah.json written by `tttlm eval loss|niah`")
    data["_file"] = str(path)
    return data


def _current_label(model: dict[str, Any]) -> str:
    """The label of a model in a result file, in today's naming: files written before models
    were named after their run call every run's model ``final``; such a label (the folder's
    own name) becomes :func:`default_label` of the model's path (``runs/125m/final`` → 125m)."""
    label, path = model["label"], model.get("path")
    if not path:
        return label
    own = Path(path).name
    for suffix in ("", " (no TTT)"):
        if own and re.fullmatch(re.escape(own + suffix) + r"( #\d+)?", label):
            return default_label(path) + suffix
    return label


def _relabel(reports: list[dict[str, Any]]) -> None:
    """Give every model a label unique across the reports (in place)."""
    old = [_current_label(m) for r in reports for m in r["models"]]
    new = iter(unique_labels(old))
    for report in reports:
        mapping = {}
        for model in report["models"]:
            label = next(new)
            mapping[model["label"]] = label
            model["label"] = label
        report["results"] = {mapping[k]: v for k, v in report["results"].items()}
        if "samples" in report:
            report["samples"] = {mapping[k]: v for k, v in report["samples"].items()}


def merge_loss(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One loss report over the models of all ``reports`` (lengths: the union)."""
    reports = [copy.deepcopy(r) for r in reports]
    _relabel(reports)
    lengths = sorted({L for r in reports for L in r["lengths"]})
    base = reports[0]["data"]
    merged: dict[str, Any] = {**{k: v for k, v in reports[0].items() if k != "_file"},
                              "lengths": lengths, "models": [], "results": {},
                              "sources": [r["_file"] for r in reports]}
    notes = []
    for report in reports:
        same_data = (report["data"]["fingerprint"] == base["fingerprint"]
                     and report["data"]["windows"] == base["windows"])
        if not same_data:
            notes.append(f"{report['_file']} was evaluated on other data "
                         f"({report['data']['source']}, {report['data']['windows']} windows): "
                         "its differences are not paired")
        for model in report["models"]:
            entries = report["results"][model["label"]]
            if not same_data:
                for entry in entries.values():
                    entry.pop("per_sequence", None)
            for L in lengths:
                entries.setdefault(str(L), _missing())
            merged["models"].append(model)
            merged["results"][model["label"]] = entries
    merged["notes"] = notes
    loss_eval.add_differences(merged)
    return merged


def _missing() -> dict[str, Any]:
    return {"sequences": 0, "tokens": 0, "mean_nll": None, "ppl": None, "stderr": None,
            "per_sequence": [], "curve": {"bin": 1, "positions": [], "mean_nll": [],
                                          "count": []}}


def merge_niah(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One NIAH report over the models of all ``reports``."""
    reports = [copy.deepcopy(r) for r in reports]
    _relabel(reports)
    settings = dict(reports[0]["settings"])
    for key in ("lengths", "depths", "kinds"):
        values = [v for r in reports for v in r["settings"][key]]
        settings[key] = sorted(set(values)) if key != "kinds" else list(dict.fromkeys(values))
    notes = [f"{r['_file']} used other NIAH settings (seed {r['settings']['seed']}, haystack "
             f"{r['settings']['haystack']})" for r in reports[1:]
             if (r["settings"]["seed"], r["settings"]["haystack_fingerprint"])
             != (settings["seed"], settings["haystack_fingerprint"])]
    return {**{k: v for k, v in reports[0].items() if k != "_file"}, "settings": settings,
            "models": [m for r in reports for m in r["models"]],
            "results": {k: v for r in reports for k, v in r["results"].items()},
            "samples": {k: v for r in reports for k, v in r.get("samples", {}).items()},
            "sources": [r["_file"] for r in reports], "notes": notes}


def compare(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
            title: str = "tttlm evaluation report", plots: bool = True) -> Path:
    """Merge the result files in ``paths`` and write ``out_dir/report.md`` (+ plots, JSON)."""
    files = find_results(paths)
    if not files:
        raise EvalError("no result files given; give loss.json/niah.json files or the folders "
                        "holding them")
    reports = [load_result(f) for f in files]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss_reports = [r for r in reports if r["type"] == loss_eval.RESULT_TYPE]
    niah_reports = [r for r in reports if r["type"] == niah_eval.RESULT_TYPE]
    lines = [f"# {title}", "", "Merged from: " + ", ".join(f"`{f}`" for f in files), ""]
    if loss_reports:
        merged = merge_loss(loss_reports)
        write_json(out / "loss.json", merged)
        images = []
        if plots:
            from tttlm.eval.plots import plot_loss

            images = plot_loss(merged, out)
        lines += loss_markdown(merged, [p.name for p in images])
    if niah_reports:
        merged_niah = merge_niah(niah_reports)
        write_json(out / "niah.json", merged_niah)
        images = []
        if plots:
            from tttlm.eval.plots import plot_niah

            images = plot_niah(merged_niah, out)
        lines += niah_markdown(merged_niah, [p.name for p in images])
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


# ------------------------------------------------------------------------------- markdown
def _num(value: float | None, spec: str = "{:.4f}") -> str:
    return "–" if value is None else spec.format(value)


def _count(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _length(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]


def _models_table(models: Sequence[dict[str, Any]]) -> list[str]:
    rows = [[m["label"], m.get("variant", "?"), "yes" if m.get("ttt") else "no",
             str(m.get("window") or "–"),
             str(m["chunk_size"]) if m.get("variant") == "e2e" and "chunk_size" in m else "–",
             _count(m.get("parameters")), f"`{m['path']}`"]
            for m in models]
    return _table(["model", "variant", "TTT", "window k", "chunk b", "parameters", "path"], rows)


def loss_markdown(report: dict[str, Any], images: Sequence[str]) -> list[str]:
    """The loss section: data, models, the loss-vs-length table, differences, plots."""
    lengths = report["lengths"]
    data = report["data"]
    labels = [m["label"] for m in report["models"]]
    lines = ["## Loss by context length", "",
             f"Data: `{data['source']}` ({data['documents']} documents, {data['tokens']} "
             f"tokens). Windows: {data['window_rule']}. Loss mask: {data['loss_mask']}. "
             "Mean NLL in nats per counted target over every sequence of that length; "
             "± is the standard error over sequences.", ""]
    lines += [f"> {note}" for note in report.get("notes", [])]
    lines += _models_table(report["models"])
    rows = []
    for label in labels:
        row = [label]
        for L in lengths:
            e = report["results"][label][str(L)]
            cell = _num(e["mean_nll"])
            if e.get("stderr") is not None:
                cell += f" ± {e['stderr']:.4f}"
            row.append(cell)
        rows.append(row)
    lines += _table(["model", *(_length(L) for L in lengths)], rows)
    counts = [max(report["results"][label][str(L)]["sequences"] for label in labels)
              for L in lengths]
    lines += ["Sequences per length: " + ", ".join(
        f"{_length(L)}: {n}" for L, n in zip(lengths, counts)), ""]
    if len(labels) > 1:
        lines += [f"Difference against **{labels[0]}** (negative: lower loss than it; ± is "
                  "the paired standard error over the same windows):", ""]
        rows = []
        for label in labels[1:]:
            row = [label]
            for L in lengths:
                e = report["results"][label][str(L)]
                cell = _num(e.get("diff_vs_first"), "{:+.4f}")
                if e.get("diff_stderr") is not None:
                    cell += f" ± {e['diff_stderr']:.4f}"
                row.append(cell)
            rows.append(row)
        lines += _table(["model", *(_length(L) for L in lengths)], rows)
    captions = {"loss_vs_length.png": "Loss by context length",
                "loss_by_position.png": "NLL by position (dashed: attention window; dotted: "
                                        "TTT chunk boundaries)"}
    for name in images:
        lines += [f"![{captions.get(name, name)}]({name})", ""]
    return lines


def niah_markdown(report: dict[str, Any], images: Sequence[str]) -> list[str]:
    """The NIAH section: settings, accuracy and log-probability by length, heatmaps."""
    s = report["settings"]
    lines = ["## Needle in a haystack", "",
             f"Haystack: `{s['haystack']}`; kinds {', '.join(s['kinds'])}; depths "
             f"{', '.join(f'{d:.0%}' for d in s['depths'])}; {s['samples']} sample(s) per cell, "
             f"seed {s['seed']}. Scoring: {s['scoring']}.", ""]
    lines += [f"> {note}" for note in report.get("notes", [])]
    lines += _models_table(report["models"])
    lengths = s["lengths"]
    for kind in s["kinds"]:
        lines += [f"### {kind}", "", "Accuracy (mean over depths) / mean log-probability of "
                  "the value per token:", ""]
        rows = []
        for label, grids in report["results"].items():
            grid = grids.get(kind)
            if grid is None:
                continue
            row = [label]
            for L in lengths:
                if L not in grid["lengths"]:
                    row.append("–")
                    continue
                j = grid["lengths"].index(L)
                lp = [r[j] for r in grid["logprob_per_token"] if r[j] is not None]
                row.append(f"{_num(grid['by_length'][j], '{:.2f}')} / "
                           f"{_num(sum(lp) / len(lp) if lp else None, '{:.2f}')}")
            rows.append(row)
        lines += _table(["model", *(_length(L) for L in lengths)], rows)
    captions = {"niah_accuracy.png": "NIAH exact-match accuracy by depth and length",
                "niah_logprob.png": "Log-probability of the needle's value per token"}
    for name in images:
        lines += [f"![{captions.get(name, name)}]({name})", ""]
    return lines
