"""PNG plots of evaluation reports (needs the ``plot`` extra: ``pip install 'tttlm[plot]'``).

Figures are built with matplotlib's object API (``Figure`` + ``savefig``), never ``pyplot``:
no global backend is switched and nothing leaks between calls. Without matplotlib every function
warns once and returns no files; the JSON and CSV outputs do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tttlm.eval.common import warn_once
from tttlm.files import atomic_save

# More chunk boundaries than this would paint the panel grey; only the window is marked then.
MAX_CHUNK_LINES = 256


def have_matplotlib() -> bool:
    """Whether plots can be drawn; warns (once) when not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn_once("matplotlib is not installed: writing JSON/CSV only "
                  "(pip install 'tttlm[plot]' for the plots)")
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path, dpi: int) -> None:
    """Write the PNG through a temporary file, so a plot is never half-written."""
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def plot_loss(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``loss_vs_length.png`` and ``loss_by_position.png`` of a loss report."""
    if not have_matplotlib():
        return []
    out = Path(out_dir)
    return [_loss_vs_length(report, out / "loss_vs_length.png"),
            _loss_by_position(report, out / "loss_by_position.png")]


def plot_loss_by_position(report: dict[str, Any], path: str | Path) -> Path | None:
    """``path`` (a PNG): NLL by position of every model at every length of a loss report, with
    the difference against the first model; ``None`` without matplotlib."""
    if not have_matplotlib():
        return None
    return _loss_by_position(report, Path(path))


def _loss_vs_length(report: dict[str, Any], path: Path) -> Path:
    lengths = report["lengths"]
    models = report["models"]
    with_diff = len(models) > 1
    fig = _figure(10 if with_diff else 5.5, 4)
    axes = fig.subplots(1, 2 if with_diff else 1, squeeze=False)[0]
    x = np.asarray(lengths)
    for i, model in enumerate(models):
        # Colour by model index, so a model keeps its colour in every panel and figure.
        style = dict(marker="o", capsize=3, color=f"C{i}", label=model["label"])
        entries = [report["results"][model["label"]][str(L)] for L in lengths]
        mean = _nan([e["mean_nll"] for e in entries])
        err = np.nan_to_num(_nan([e.get("stderr") for e in entries]))
        ok = np.isfinite(mean)  # lengths a merged run did not evaluate: skip, keep the line
        axes[0].errorbar(x[ok], mean[ok], yerr=err[ok], **style)
        if with_diff and i > 0:
            diff = _nan([e.get("diff_vs_first") for e in entries])
            derr = np.nan_to_num(_nan([e.get("diff_stderr") for e in entries]))
            ok = np.isfinite(diff)
            axes[1].errorbar(x[ok], diff[ok], yerr=derr[ok], **style)
    axes[0].set_ylabel("mean NLL (nats/token)")
    axes[0].set_title("Loss by context length")
    axes[0].legend(fontsize="small")
    if with_diff:
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        axes[1].set_ylabel(f"difference vs {models[0]['label']}")
        axes[1].set_title("Difference against the first model (lower is better)")
        axes[1].legend(fontsize="small")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    _save(fig, path, dpi=120)
    return path


def _mark_boundaries(ax: Any, models: Sequence[dict[str, Any]], length: int) -> None:
    """Dashed line at each model's window size; dotted lines at TTT chunk boundaries."""
    windows = sorted({m["window"] for m in models if m.get("window") and m["window"] < length})
    for k in windows:
        ax.axvline(k, color="red", linestyle="--", linewidth=0.9, alpha=0.7,
                   label=f"window k={k}")
    chunks = sorted({m["chunk_size"] for m in models if m.get("ttt")})
    for b in chunks:
        if length // b <= MAX_CHUNK_LINES:
            for x in range(b, length, b):
                ax.axvline(x, color="grey", linestyle=":", linewidth=0.6, alpha=0.5,
                           label=f"TTT chunk b={b}" if x == b else None)


def _loss_by_position(report: dict[str, Any], path: Path) -> Path:
    lengths = report["lengths"]
    models = report["models"]
    with_diff = len(models) > 1
    fig = _figure(12 if with_diff else 7, 2.8 * len(lengths) + 0.6)
    axes = fig.subplots(len(lengths), 2 if with_diff else 1, squeeze=False)
    for row, L in enumerate(lengths):
        ax = axes[row][0]
        for i, model in enumerate(models):
            curve = report["results"][model["label"]][str(L)]["curve"]
            x = np.asarray(curve["positions"]) + curve["bin"] / 2
            ax.plot(x, _nan(curve["mean_nll"]), linewidth=0.9, color=f"C{i}",
                    label=model["label"])
        _mark_boundaries(ax, models, L)
        n = max(report["results"][m["label"]][str(L)]["sequences"] for m in models)
        ax.set_title(f"L={_length_label(L)}: NLL by position (mean of {n} sequence(s))")
        ax.set_ylabel("NLL")
        ax.legend(fontsize="x-small", loc="upper right")
        if with_diff:
            ax = axes[row][1]
            for i, model in enumerate(models[1:], 1):
                curve = report["results"][model["label"]][str(L)]["curve"]
                if not curve.get("diff_vs_first"):  # no curve of one model, or other bins
                    continue
                x = np.asarray(curve["positions"]) + curve["bin"] / 2
                ax.plot(x, _nan(curve["diff_vs_first"]), linewidth=0.9, color=f"C{i}",
                        label=model["label"])
            ax.axhline(0.0, color="black", linewidth=0.8)
            _mark_boundaries(ax, models, L)
            ax.set_title(f"L={_length_label(L)}: difference vs {models[0]['label']}")
            ax.legend(fontsize="x-small", loc="upper right")
        for ax in axes[row]:
            ax.set_xlim(0, L)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("position in the sequence (tokens of context)")
    _save(fig, path, dpi=110)
    return path


def plot_niah(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``niah_accuracy.png`` and ``niah_logprob.png``: one heatmap per model and kind."""
    if not have_matplotlib():
        return []
    out = Path(out_dir)
    return [_heatmaps(report, "accuracy", out / "niah_accuracy.png"),
            _heatmaps(report, "logprob_per_token", out / "niah_logprob.png")]


def _heatmaps(report: dict[str, Any], field: str, path: Path) -> Path:
    labels = list(report["results"])
    kinds = list(dict.fromkeys(k for label in labels for k in report["results"][label]))
    grids = [[report["results"][label].get(kind) for kind in kinds] for label in labels]
    present = [g for row in grids for g in row if g is not None]
    values = [_nan(v) for g in present for v in g[field]]
    finite = np.concatenate(values) if values else np.array([])
    finite = finite[np.isfinite(finite)]
    if field == "accuracy":
        vmin, vmax, cmap, title = 0.0, 1.0, "RdYlGn", "exact-match accuracy"
    else:
        vmin = float(finite.min()) if len(finite) else -1.0
        vmax = float(finite.max()) if len(finite) else 0.0
        vmax = vmax if vmax > vmin else vmin + 1e-6
        cmap, title = "viridis", "log-probability of the value (per token)"
    ncols = len(kinds)
    first = present[0]
    fig = _figure(max(3.5, 1.8 + 0.9 * len(first["lengths"])) * ncols,
                  (1.0 + 0.45 * len(first["depths"])) * len(labels) + 0.6)
    axes = fig.subplots(len(labels), ncols, squeeze=False)
    image = None
    for r, label in enumerate(labels):
        for c, kind in enumerate(kinds):
            grid, ax = grids[r][c], axes[r][c]
            if grid is None:  # a merged report whose model was not run on this kind
                ax.set_axis_off()
                continue
            data = np.array([_nan(row) for row in grid[field]])  # [depths, lengths]
            image = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
            ax.set_xticks(range(len(grid["lengths"])),
                          [_length_label(L) for L in grid["lengths"]])
            ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
            ax.set_xlabel("context length")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{label}: {kind}", fontsize="medium")
            for (i, j), v in np.ndenumerate(data):
                if math.isfinite(v):
                    text = f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize="x-small")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=title)
    _save(fig, path, dpi=110)
    return path


def plot_repeat(report: dict[str, Any], path: str | Path) -> Path | None:
    """``repeat.png``: second-reading NLL against the distance to the first reading, with
    each model's first-reading NLL dotted, and its window marked."""
    if not have_matplotlib():
        return None
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    windows = set()
    for i, (label, rows) in enumerate(report["results"].items()):
        ds = sorted(int(d) for d in rows)
        color = f"C{i}"
        ax.plot(ds, [rows[str(d)]["second"] for d in ds], marker="o", color=color,
                label=label)
        first = float(np.mean([rows[str(d)]["first"] for d in ds]))
        ax.axhline(first, color=color, linestyle=":", linewidth=1)
    for model in report["models"]:
        if model.get("window"):
            windows.add(int(model["window"]))
    for w in sorted(windows):
        ax.axvline(w, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=max(1, min(report["settings"]["distances"]) or 1))
    ax.set_xlabel("tokens between the two readings (dashed: attention window)")
    ax.set_ylabel("NLL of the second reading (dotted: first)")
    ax.set_title("Repeated passage: what each model remembers")
    ax.legend(fontsize=8)
    out = Path(path)
    _save(fig, out, dpi=120)
    return out
