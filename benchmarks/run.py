"""The GPU benchmark suite of issue 6: correctness first, then the registered benchmarks.

    python benchmarks/run.py --out-dir benchmarks/results            # everything
    python benchmarks/run.py --sections kernel prefill --prefill-lengths 8192 32768

Runs the kernels' GPU tests (pytest) and stops if they fail (unless ``--keep-going``); then
each section writes ``<out-dir>/<name>.json`` and ``.md`` (card, torch/Triton/CUDA versions,
command). With
``--combined FILE`` everything also goes to one JSON (for machines that return few files).
A section that fails records its traceback and the suite goes on.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tttlm.bench import (
    bench_chunk_kernel,
    bench_prefill,
    bench_train_step,
    environment,
    write_report,
)
from tttlm.bench.names import PREFILL_COLUMNS, STEP_MODES, TRAIN_COLUMNS
from tttlm.bench.prefill import prefill_batch

SECTIONS = ("tests", "kernel", "prefill", "train", "train32k", "sweep")


def sweep_kernel_configs(device: torch.device) -> list[dict[str, Any]]:
    """Time the Triton path's fwd+bwd+double-bwd at k=8192, b=1024 under other tile sizes."""
    from tttlm.ops import triton_chunk_attention as tca

    original = dict(tca.CONFIGS)
    K = tca.KernelConfig
    variants = {
        "default": {},
        "bwd128x64_w8": {"bwd_dq": K(128, 64, 8), "bwd_dkdv": K(64, 128, 8)},
        "dbl64x64": {"dbl_stats": K(64, 64, 4), "dbl_dq": K(64, 64, 4),
                     "dbl_dkdv": K(64, 64, 4)},
        "dbl32x32": {"dbl_stats": K(64, 32, 4), "dbl_dq": K(32, 32, 4),
                     "dbl_dkdv": K(32, 32, 4)},
        "dbl64x32_w8": {"dbl_dq": K(64, 32, 8), "dbl_dkdv": K(32, 64, 8),
                        "dbl_stats": K(128, 64, 8)},
        "fwd64x64": {"fwd": K(64, 64, 4, 3)},
    }
    rows = []
    for name, change in variants.items():
        tca.CONFIGS.update(change)
        try:
            r = bench_chunk_kernel(device, backends=("triton",), repeats=5)
            rows += [{"config": name, **x} for x in r]
        except Exception as err:  # a config that fails to compile is a result too
            rows.append({"config": name, "error": repr(err)[:300]})
        finally:
            tca.CONFIGS.clear()
            tca.CONFIGS.update(original)
        print(name, [(x.get("phase"), x.get("ms_median")) for x in rows[-3:]], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--combined", type=Path, help="also write everything to this JSON")
    parser.add_argument("--no-split", action="store_true", help="only the combined JSON")
    parser.add_argument("--all-tests", action="store_true",
                        help="also the fp32 kernel tests (minutes of Triton compilation on a "
                             "GPU); by default the bf16 kernel test and the flex tests")
    parser.add_argument("--keep-going", action="store_true",
                        help="run the benchmarks even when the correctness tests fail")
    parser.add_argument("--prefill-preset", default="3b")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--prefill-compile", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled"])
    parser.add_argument("--train-modes", nargs="+", default=["eager", "graph"],
                        choices=STEP_MODES)
    parser.add_argument("--train-batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    device = torch.device("cuda")
    env = environment(device)
    combined: dict[str, Any] = {"env": env, "sections": {}}

    def save(name: str, title: str, rows: list[dict[str, Any]], columns: list[str],
             seconds: float) -> None:
        combined["sections"][name] = {"title": title, "rows": rows, "seconds": seconds}
        if not args.no_split:
            write_report(args.out_dir / name, title, env, rows, columns)
        if args.combined:
            args.combined.write_text(json.dumps(combined, indent=2))

    plans = {
        "kernel": ("kernel_chunk_attention_125m",
                   "Chunk attention 1024 queries x 9216 keys, 12 heads x 64, batch 1, bf16",
                   lambda: bench_chunk_kernel(device),
                   ["backend", "phase", "ms_median", "speedup_vs_naive", "peak_gib"]),
        "train": ("train_step_125m_8k", "Training step, 125m, 8192 tokens",
                  lambda: bench_train_step(device, batches=tuple(args.train_batches),
                                           modes=tuple(args.train_modes)),
                  TRAIN_COLUMNS),
        "train32k": ("train_step_125m_32k", "Training step, 125m e2e, 32768 tokens, batch 1",
                     lambda: bench_train_step(device, seq_len=32768, variants=("e2e",),
                                              repeats=1, modes=tuple(args.train_modes)),
                     TRAIN_COLUMNS),
        "sweep": ("kernel_config_sweep", "Triton chunk attention tile sweep, k=8192, b=1024",
                  lambda: sweep_kernel_configs(device),
                  ["config", "phase", "ms_median", "peak_gib", "error"]),
    }
    # One prefill entry per length, so a long length that runs out of time loses only itself.
    for T in args.prefill_lengths:
        plans[f"prefill{T // 1024}k"] = (
            f"prefill_{args.prefill_preset}_{T // 1024}k",
            f"Prefill, {args.prefill_preset}, {T} tokens, batch {prefill_batch(T, 131072)} "
            "(128K tokens per step), bf16 autocast",
            functools.partial(bench_prefill, device, preset=args.prefill_preset, lengths=(T,),
                              repeats=args.prefill_repeats,
                              compile_modes=tuple(m == "compiled" for m in args.prefill_compile)),
            PREFILL_COLUMNS)
    sections = [s for section in args.sections
                for s in ([p for p in plans if p.startswith("prefill")] if section == "prefill"
                          else [section])]
    for section in sections:
        start = time.perf_counter()
        if section == "tests":
            select = [] if args.all_tests else ["-k", "bf16 or gpu_paths"]
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "tests/test_ops_chunk_attention.py",
                 "tests/test_ops_attention.py", *select], capture_output=True, text=True)
            log = (proc.stdout + proc.stderr)[-20000:]
            print(log[-3000:], flush=True)
            combined["sections"]["tests"] = {"returncode": proc.returncode, "log": log,
                                             "seconds": time.perf_counter() - start}
            if args.combined:
                args.combined.write_text(json.dumps(combined, indent=2))
            if proc.returncode != 0:
                print("correctness tests failed: benchmarks would time wrong code", flush=True)
                if not args.keep_going:
                    return 1
            continue
        name, title, fn, columns = plans[section]
        try:
            rows = fn()
        except Exception:  # record the failure, run the other sections
            rows = [{"error": traceback.format_exc()[-3000:]}]
            print(rows[0]["error"], flush=True)
        save(name, title, rows, columns, time.perf_counter() - start)
        print(f"== {section} done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
