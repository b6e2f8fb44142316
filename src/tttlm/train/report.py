"""The quickstart's report files: ``report.json`` and ``report.md``.

The measurements come from :mod:`tttlm.eval` (loss by position, its plot); this module only
words them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tttlm.files import atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "loss_by_position.png"


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
