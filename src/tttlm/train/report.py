"""The quickstart's report files: ``report.json`` and ``report.md``.

The measurements come from :mod:`tttlm.eval` (loss by position, its plot); this module only
words them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tttlm.eval.repeat import format_repeat_table
from tttlm.files import atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "loss_by_position.png"
REPEAT_PNG = "repeat.png"


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
        *_repeat_section(report),
        f"Reproduce: `{report['command']}`",
        "",
    ]
    atomic_write_text(out / REPORT_MD, "\n".join(lines))
    return {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / PLOT_PNG}


def _repeat_section(report: dict[str, Any]) -> list[str]:
    """The memory panel: loss on the second reading of a passage, by distance."""
    rep = report.get("repeat")
    if not rep:
        return []
    st = rep["settings"]
    window = report["settings"]["window"]
    lines = ["## Memory: a passage read twice", "",
             f"A held-out passage of {st['passage_len']} tokens is read, then again d tokens "
             f"later; the table gives the mean loss of its second reading (after a cue of "
             f"{st['cue']} tokens), the last column that of its first reading "
             f"({st['samples']} sequences per distance; window k = {window}).", "",
             format_repeat_table(rep)]
    lines += ["", f"![repeated passage]({REPEAT_PNG})" if rep.get("plot") else "", "",
              "How to read it: a second reading below the first means the model copies from "
              "what it read before. Full attention can copy at any distance; sliding-window "
              f"attention only while the first reading is inside its window (d < k = {window});"
              " TTT-E2E keeps part of it in its fast weights beyond the window; with retrieval "
              "(\"+ retrieval\": the cue recalls the first reading from the memory and quotes "
              "it back) swa and TTT-E2E can copy again at any distance. Copying is a skill the "
              "model must learn: if no line drops below its first reading, these toy models "
              "have not learned it yet (a longer run or a pretrained model shows it).", ""]
    return lines
