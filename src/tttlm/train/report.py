"""Loss by token position on held-out text, and the quickstart's report files.

Loss by position is the paper's long-context measure: with enough context a model that uses
it keeps improving along the sequence; sliding-window attention stops improving once the
context exceeds its window, and TTT-E2E should keep improving past it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.data import TokenDataset
from tttlm.files import atomic_save, atomic_write_text
from tttlm.model.model import TTTForCausalLM

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "loss_by_position.png"


@torch.no_grad()
def loss_by_position(model: TTTForCausalLM, dataset: TokenDataset, *, num_sequences: int,
                     ttt: bool, batch_size: int = 4, device: torch.device | str = "cpu",
                     autocast: torch.dtype | None = None,
                     inner_lr: float | None = None) -> tuple[np.ndarray, int]:
    """Mean NLL at every position ``[T]`` over the first ``num_sequences`` windows of
    ``dataset`` (consecutive windows of the held-out books), and the count used.

    Targets the loss mask excludes (a document's first token) are left out of their
    position's mean. With ``ttt`` each token is predicted with the fast weights from before
    its chunk's update, exactly as in training.
    """
    device = torch.device(device)
    n = min(num_sequences, len(dataset)) if num_sequences else len(dataset)
    total = torch.zeros(dataset.seq_len, dtype=torch.float64)
    count = torch.zeros(dataset.seq_len, dtype=torch.float64)
    model.eval()
    for start in range(0, n, batch_size):
        input_ids, labels, mask = (t.to(device) for t in
                                   dataset.batch(range(start, min(n, start + batch_size))))
        amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
        with amp:
            out = model(input_ids, labels=labels, loss_mask=mask, ttt=ttt, inner_lr=inner_lr)
        m = mask.double().cpu()
        total += (out.token_nll.double().cpu() * m).sum(0)
        count += m.sum(0)
    return (total / count.clamp_min(1)).numpy(), n


def bucket_means(curve: Sequence[float], width: int) -> list[float]:
    """Means of consecutive ``width``-position buckets (the last may be shorter)."""
    arr = np.asarray(curve, dtype=np.float64)
    return [float(arr[i:i + width].mean()) for i in range(0, len(arr), width)]


def plot_loss_by_position(curves: dict[str, Sequence[float]], path: str | os.PathLike[str], *,
                          window: int, chunk: int, bucket: int, title: str) -> bool:
    """Draw the curves (bucketed) with the window and the first chunks marked.

    Returns ``False`` (and draws nothing) when matplotlib is not installed: the plot is the
    only part of the report that needs it (``pip install 'tttlm[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and never pops a window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = {"e2e": "tab:red", "swa": "tab:blue", "full": "tab:green"}
    for name, curve in curves.items():
        means = bucket_means(curve, bucket)
        x = [min(len(curve), i * bucket + bucket / 2) for i in range(len(means))]
        ax.plot(x, means, label=name, color=colors.get(name), linewidth=1.8)
    ax.axvline(window, color="black", linestyle="--", linewidth=1)
    ax.text(window, ax.get_ylim()[1], f" window k={window}", va="top", fontsize=8)
    length = max(len(c) for c in curves.values())
    for boundary in range(chunk, length, chunk):
        ax.axvline(boundary, color="gray", alpha=0.15, linewidth=0.6)
    ax.set_xlabel(f"token position (gray lines: TTT chunks of b={chunk})")
    ax.set_ylabel(f"NLL (nats, mean over {bucket}-token buckets)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return True


def write_report(out_dir: str | os.PathLike[str], report: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` from the quickstart's results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1) + "\n")
    s = report["settings"]
    lines = [
        "# tttlm quickstart: TTT-E2E vs sliding-window vs full attention",
        "",
        f"Three models trained on the same {s['train_tokens']:,} tokens of the built-in books "
        f"({s['steps']} steps × {s['batch_size']} sequences × {s['seq_len']} tokens), then "
        f"evaluated on {report['eval_sequences']} held-out windows of {s['seq_len']} tokens.",
        f"Device: {report['device']}; torch {report['torch']}; wall time "
        f"{report['wall_time_s']:.0f} s.",
        "",
        "| model | params | final train loss | held-out loss | loss, positions < k | "
        "loss, positions ≥ k | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['params']:,} | {m['final_train_loss']:.3f} | "
                     f"{m['eval_loss']:.3f} | {m['eval_loss_within_window']:.3f} | "
                     f"{m['eval_loss_beyond_window']:.3f} | {m['train_time_s']:.0f} s |")
    arch = s["model"]
    lines += [
        "",
        f"Architecture: {arch['num_layers']} layers, width {arch['hidden_size']}, "
        f"{arch['num_heads']} heads, vocabulary {arch['vocab_size']}; window k = "
        f"{s['window']} (swa, e2e), TTT chunk b = {s['chunk_size']} and "
        f"{arch['num_ttt_layers']} TTT block(s) (e2e). MLP widths are set so that the three "
        "models have about the same parameter count (as in the paper's presets).",
        "",
        f"![loss by position]({PLOT_PNG})" if report.get("plot") else
        "(matplotlib is not installed: no plot; `pip install 'tttlm[plot]'`)",
        "",
        "How to read it: all three models see the same tokens. Inside the window (positions "
        "< k) swa and full attention see the same context; beyond it swa forgets everything "
        "older than k tokens, full attention keeps it all, and TTT-E2E keeps a compressed "
        "memory in its fast weights. At this toy scale the gaps are small and noisy; the "
        "paper's gains need billions of training tokens.",
        "",
        f"Reproduce: `{report['command']}`",
        "",
    ]
    atomic_write_text(out / REPORT_MD, "\n".join(lines))
    return {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / PLOT_PNG}
