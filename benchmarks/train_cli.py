"""Time ``tttlm train`` itself: each configuration is a real run of the command line.

    PYTHONPATH=src python benchmarks/train_cli.py --preset 125m-8k --steps 8 \\
        --runs e2e:eager e2e:graph full:eager full:graph --out OUT/train_cli_125m_8k

Each run prepares nothing of its own: the data is the books the package ships, tokenized as
bytes once (``tttlm data prepare``), with the model's vocabulary pinned to the official 128 256
(``--set model.vocab_size=128256``) so the output head costs what it costs in the official
recipe. A run is ``tttlm train --preset P --mode V --set step_mode=M`` for ``--steps`` steps
with ``log_every=1``; its ``metrics.jsonl`` gives the step times. The first ``--skip`` steps
(compilation, capture, warm-up) are left out of the median. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tttlm.bench import environment, write_report

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT / "src" / "tttlm" / "resources" / "books" / "train.jsonl.gz"
COLUMNS = ("variant", "step_mode", "micro_batch", "batch", "steps_timed", "s_median",
           "tokens_per_s", "peak_gib", "ratio_vs_full", "error")


def tttlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "tttlm.cli", *args]


def mode_args(mode: str) -> list[str]:
    """``compiled-graph`` (the benchmark's name) is ``step_mode=graph`` with ``compile=true``."""
    if mode == "compiled-graph":
        return ["--set", "step_mode=graph", "--set", "compile=true"]
    return ["--set", f"step_mode={mode}"]


def run_one(data: Path, work: Path, preset: str, variant: str, mode: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    out = work / f"{variant}-{mode}-{args.micro_batch}"
    cmd = tttlm("train", "--preset", preset, "--mode", variant, "--data", str(data),
                "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch),
                "--micro-batch-size", str(args.micro_batch), *mode_args(mode),
                "--set", "log_every=1", "--set", "save_every=0", "--set", "eval_every=0",
                "--set", "eval_sequences=1", "--device", args.device,
                *(("--set", "model.vocab_size=128256") if args.official_vocab else ()),
                *(a for s in args.set for a in ("--set", s)))
    row: dict[str, Any] = {"variant": variant, "step_mode": mode, "micro_batch": args.micro_batch,
                           "batch": args.batch,
                           # (the scratch folder as $WORK: no machine's paths in reports)
                           "command": shlex.join(cmd[2:]).replace(str(work), "$WORK")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    row["wall_s"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    steps = [r for r in records if "step_time_s" in r]
    timed = steps[args.skip:]
    if not timed:
        row["error"] = f"only {len(steps)} steps logged"
        return row
    s = statistics.median(r["step_time_s"] for r in timed)
    row.update(steps_timed=len(timed), s_median=round(s, 4),
               tokens_per_s=round(args.batch * args.seq_len / s),
               peak_gib=round(max(r.get("peak_mem_gib", 0.0) for r in steps), 2),
               step_times=[round(r["step_time_s"], 4) for r in steps],
               losses=[r["loss"] for r in steps], resolved_mode=timed[-1].get("step_mode"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m-8k")
    p.add_argument("--seq-len", type=int, default=8192, help="the preset's (for tokens/s)")
    p.add_argument("--runs", nargs="+", default=["e2e:eager", "e2e:graph", "full:eager"],
                   help="VARIANT:STEP_MODE pairs (STEP_MODE: auto, eager, compiled, graph, "
                   "compiled-graph)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--set", action="append", default=[], help="extra --set for every run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-official-vocab", dest="official_vocab", action="store_false",
                   help="keep the data's vocabulary (a CPU smoke run)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run(tttlm("data", "prepare", str(BOOKS), "--out", str(data), "--tokenizer",
                             "bytes", "--val-docs", "1", "--quiet"), check=True)
        rows = []
        for spec in args.runs:
            variant, mode = spec.split(":")
            rows.append(run_one(data, work, args.preset, variant, mode, args))
            print(json.dumps({k: v for k, v in rows[-1].items()
                              if k not in ("step_times", "losses")}), flush=True)
    best_full = max((r.get("tokens_per_s", 0) for r in rows if r["variant"] == "full"),
                    default=0)
    for r in rows:
        if r["variant"] != "full" and best_full and r.get("tokens_per_s"):
            r["ratio_vs_full"] = round(r["tokens_per_s"] / best_full, 3)
    env = environment(torch.device(args.device))
    env["command"] = "python benchmarks/train_cli.py " + shlex.join(sys.argv[1:])
    write_report(args.out, f"tttlm train throughput, preset {args.preset}", env, rows, COLUMNS,
                 notes=[f"Each row is one `tttlm train` run ({args.steps} steps of "
                        f"{args.batch} x {args.seq_len} tokens, micro-batch {args.micro_batch}); "
                        f"median step time over steps {args.skip + 1}..{args.steps} from its "
                        "metrics.jsonl; ratio_vs_full is over the fastest full run."])


if __name__ == "__main__":
    main()
