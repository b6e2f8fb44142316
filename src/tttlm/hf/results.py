"""lm-eval results as tttlm's evaluation outputs: ``harness.json`` (lm-eval's results dict),
``harness.csv`` (one row per task, filter and metric) and the summary table.

The table is lm-eval's own (``make_table``), so it reads as ``lm_eval`` prints it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from tttlm.files import atomic_write_text

JSON_NAME = "harness.json"
CSV_NAME = "harness.csv"
CSV_FIELDS = ("task", "version", "filter", "n_shot", "metric", "value", "stderr")
# Entries of a task's results that are not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task or group, filter, metric) of lm-eval's ``results``; ``stderr`` is
    lm-eval's (``"N/A"`` where it has none)."""
    rows = []
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            if section == "groups" and task in (results.get("results") or {}):
                continue  # a group's row is in "results" already
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if metric in _NOT_METRICS or metric.endswith("_stderr") or not filt:
                    continue
                rows.append({"task": task,
                             "version": (results.get("versions") or {}).get(task, ""),
                             "filter": filt,
                             "n_shot": (results.get("n-shot") or {}).get(task, ""),
                             "metric": metric, "value": value,
                             "stderr": metrics.get(f"{metric}_stderr,{filt}", "")})
    return rows


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's summary table (Markdown), with a groups table when there are groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``harness.json`` and ``harness.csv`` into ``out`` (created), each durably."""
    from lm_eval.utils import handle_non_serializable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / JSON_NAME, out / CSV_NAME
    atomic_write_text(json_path, json.dumps(results, indent=2, default=handle_non_serializable,
                                            ensure_ascii=False) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result_rows(results))
    atomic_write_text(csv_path, buffer.getvalue())
    return [json_path, csv_path]
