"""``tttlm bench kernel|prefill|decode|train``: parse, call :mod:`tttlm.bench`, write reports.

The benchmarks measure a CUDA GPU: without one they refuse at once (they would otherwise run
for minutes on the CPU, or fail inside Triton). ``--device cpu`` is an explicit smoke run of the
same code with tiny shapes (the tests use it; ``bench kernel`` also needs
``TRITON_INTERPRET=1``); its timings mean nothing.

Reports go to ``bench-results/<name>.json|.md`` in the current folder by default, never into
the repository's committed ``benchmarks/results/`` unless named with ``--out``, and an existing
report is kept unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tttlm.bench.names import BLOCK_MODES, PREFILL_COLUMNS, STEP_MODES, TRAIN_COLUMNS
from tttlm.errors import UserError
from tttlm.options import group_size, ttt_group

DEFAULT_OUT_DIR = Path("bench-results")
_GUIDE = "see benchmarks/README.md"


def _device(args: argparse.Namespace) -> Any:
    """The benchmark's device, refusing at once where it cannot run (before any work)."""
    import torch

    from tttlm.devices import check_device_name, resolve_device

    kind, _ = check_device_name(args.device, option="--device")
    if kind != "cpu" and not torch.cuda.is_available():
        raise UserError(f"needs a CUDA GPU and none is visible here; {_GUIDE} (--device "
                        "cpu runs a smoke test with tiny shapes, whose timings mean nothing)")
    device = resolve_device("cuda" if kind == "auto" else args.device, option="--device")
    if device.type == "cpu":
        print(f"{args.command_prog}: --device cpu is a smoke run: its timings are not GPU "
              "numbers", file=sys.stderr)
    return device


def _check_out(args: argparse.Namespace) -> Path:
    """``--out`` (a path without suffix), refusing to replace a report unless ``--overwrite``."""
    out = Path(args.out)
    existing = [p for p in (out.with_suffix(".json"), out.with_suffix(".md")) if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or choose "
                        "another --out")
    return out


def _write(args: argparse.Namespace, title: str, device: Any, rows: list[dict[str, Any]],
           columns: list[str]) -> int:
    from tttlm.bench import environment, write_report

    paths = write_report(Path(args.out), title, environment(device), rows, columns)
    print("wrote", *paths)
    return 0


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench", help="speed benchmarks (CUDA GPU; random weights)",
        description="Speed benchmarks with random weights. They need a CUDA GPU and refuse "
                    "without one (--device cpu: a smoke run with tiny shapes). Reports go to "
                    f"{DEFAULT_OUT_DIR}/ by default; an existing report is kept unless "
                    "--overwrite. See benchmarks/README.md.")
    sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--device", default="cuda",
                       help="cuda (default) or cuda:N; without a GPU the command refuses. cpu: "
                            "a smoke run of the code with tiny shapes (timings mean nothing)")
        p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / out,
                       help=f"output path without suffix: writes OUT.json and OUT.md (default "
                            f"{DEFAULT_OUT_DIR / out}; the committed results live in "
                            "benchmarks/results/)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT.json / OUT.md (default: refuse)")

    k = sub.add_parser("kernel", help="suffix chunk attention: naive vs Triton, "
                                      "forward + backward + double backward")
    k.add_argument("--window", type=int, default=8192)
    k.add_argument("--chunk", type=int, default=1024)
    k.add_argument("--heads", type=int, default=12)
    k.add_argument("--head-dim", type=int, default=64)
    k.add_argument("--batch", type=int, default=1)
    common(k, "kernel_chunk_attention")
    k.set_defaults(func=run_kernel, repeats=10)

    p = sub.add_parser("prefill", help="prefill seconds per 1K tokens, e2e vs full")
    p.add_argument("--preset", default="3b")
    p.add_argument("--variants", nargs="+", default=["e2e", "full"])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step (default: --tokens-per-step / length, at least 1)")
    p.add_argument("--tokens-per-step", type=int, default=131072,
                   help="tokens per step when --batch is not given (the paper's 128K)")
    p.add_argument("--compile", nargs="+", default=["eager"],
                   choices=list(BLOCK_MODES),
                   help="blocks eager and/or compiled (TTTForCausalLM.compile_blocks), the TTT "
                        "chunks over full caches replayed as a CUDA graph where the model's "
                        "default takes one (TTTForCausalLM.graph_chunks = None: one sequence, "
                        "at least 32 chunks); graphed / launched: compiled, with those graphs "
                        "always / never")
    p.add_argument("--paths", nargs="+", default=["model"],
                   choices=["model", "engine", "engine-graphs"],
                   help="the scoring forward pass (model) and/or Engine.prefill (engine; "
                        "engine-graphs: with its CUDA graphs, Engine(cuda_graphs=True))")
    p.add_argument("--attention", nargs="+", default=["auto"], metavar="BACKEND",
                   help="attention backends to time (auto, first-order, triton, banded, ...)")
    p.add_argument("--ttt-groups", nargs="+", default=["auto"], metavar="N",
                   type=ttt_group,
                   help="e2e: run the TTT chunks of at most N sequences at a time (bounds the "
                        "fast weights' memory, which grows with the batch); 'all': the whole "
                        "batch; 'auto' (default): the model's default, TTTForCausalLM."
                        "auto_ttt_group (3b: 4)")
    common(p, "prefill")
    p.set_defaults(func=run_prefill)

    d = sub.add_parser("decode", help="decode latency per token at long context, e2e vs full")
    d.add_argument("--presets", nargs="+", default=["125m", "760m"])
    d.add_argument("--variants", nargs="+", default=["e2e", "full"])
    d.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    d.add_argument("--modes", nargs="+", default=["graph"], choices=["eager", "graph"],
                   help="eager Engine.step and/or the step replayed as a CUDA graph")
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--warmup", type=int, default=4)
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    common(d, "decode")
    d.add_argument("--inner-reps", type=int, dest="repeats",
                   help="timed inner steps (same as --repeats)")
    d.set_defaults(func=run_decode)

    t = sub.add_parser("train", help="training step tokens/s: e2e meta-training vs full")
    t.add_argument("--preset", default="125m")
    t.add_argument("--seq-len", type=int, default=8192)
    t.add_argument("--batches", type=int, nargs="+", default=[1])
    t.add_argument("--variants", nargs="+", default=["e2e", "full"])
    t.add_argument("--modes", nargs="+", default=["eager"],
                   choices=STEP_MODES,
                   help="eager, compiled blocks, the whole step as a CUDA graph, or both")
    t.add_argument("--checkpoint-chunks", action="store_true",
                   help="recompute each chunk's activations in the backward pass (e2e)")
    common(t, "train_step")
    t.set_defaults(func=run_train)


def run_kernel(args: argparse.Namespace) -> int:
    _check_out(args)
    device = _device(args)
    if device.type == "cpu":
        from tttlm.ops.triton_runtime import triton_available, triton_interpreting

        if not (triton_available() and triton_interpreting()):
            raise UserError("the Triton kernel runs on a CPU only through Triton's interpreter; "
                            "set TRITON_INTERPRET=1 for a smoke run (with tiny shapes, e.g. "
                            "--window 32 --chunk 16), or run on a CUDA GPU")
    from tttlm.bench import bench_chunk_kernel

    rows = bench_chunk_kernel(device, window=args.window, chunk=args.chunk, heads=args.heads,
                              head_dim=args.head_dim, batch=args.batch, repeats=args.repeats)
    title = (f"Chunk attention {args.chunk} queries x {args.window + args.chunk} keys, "
             f"{args.heads} heads x {args.head_dim}, batch {args.batch}, bf16")
    return _write(args, title, device, rows,
                  ["backend", "phase", "ms_median", "speedup_vs_naive", "peak_gib"])

def run_prefill(args: argparse.Namespace) -> int:
    _check_out(args)
    device = _device(args)
    from tttlm.bench import bench_prefill

    rows = bench_prefill(device, preset=args.preset, variants=tuple(args.variants),
                         lengths=tuple(args.lengths), batch=args.batch,
                         tokens_per_step=args.tokens_per_step, repeats=args.repeats,
                         compile_modes=tuple(BLOCK_MODES[m] for m in args.compile),
                         paths=tuple(args.paths), attention=tuple(args.attention),
                         ttt_groups=tuple(group_size(g) for g in args.ttt_groups))
    size = (f"batch {args.batch}" if args.batch is not None
            else f"{args.tokens_per_step} tokens per step")
    return _write(args, f"Prefill, {args.preset}, {size}, bf16 autocast", device, rows,
                  PREFILL_COLUMNS)


def run_train(args: argparse.Namespace) -> int:
    _check_out(args)
    device = _device(args)
    from tttlm.bench import bench_train_step

    rows = bench_train_step(device, preset=args.preset, seq_len=args.seq_len,
                            batches=tuple(args.batches), variants=tuple(args.variants),
                            checkpoint_chunks=args.checkpoint_chunks, repeats=args.repeats,
                            modes=tuple(args.modes))
    return _write(args, f"Training step, {args.preset}, {args.seq_len} tokens", device, rows,
                  TRAIN_COLUMNS)


def run_decode(args: argparse.Namespace) -> int:
    _check_out(args)
    device = _device(args)
    import torch

    from tttlm.bench import bench_decode

    rows = bench_decode(device, presets=args.presets, variants=args.variants,
                        contexts=args.contexts, modes=args.modes, steps=args.steps,
                        warmup=args.warmup, inner_reps=args.repeats,
                        dtype=getattr(torch, args.dtype))
    return _write(args, f"Decode latency per token, batch 1, {args.dtype}", device, rows,
                  ["preset", "variant", "mode", "context", "step_ms", "inner_step_ms",
                   "per_token_ms", "vs_shortest", "state_mib"])
