"""``tttlm bench kernel|prefill|decode|train``: parse, call :mod:`tttlm.bench`, write reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tttlm.cli import user_error

_RESULTS = Path("benchmarks/results")
# Training-step modes of tttlm.bench.train (kept here: the CLI imports no torch to parse).
STEP_MODES = ("eager", "compiled", "graph", "compiled-graph")


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="speed benchmarks (GPU; random weights)")
    sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--device", default="auto", help="auto, cuda or cpu")
        p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
        p.add_argument("--out", type=Path, default=_RESULTS / out,
                       help="output path without suffix: writes OUT.json and OUT.md")

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
    p.add_argument("--compile", nargs="+", default=["eager"], choices=["eager", "compiled"],
                   help="blocks eager and/or compiled (TTTForCausalLM.compile_blocks)")
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
    from tttlm.bench import bench_chunk_kernel, environment, write_report

    device = _device(args.device)
    rows = bench_chunk_kernel(device, window=args.window, chunk=args.chunk, heads=args.heads,
                              head_dim=args.head_dim, batch=args.batch, repeats=args.repeats)
    title = (f"Chunk attention {args.chunk} queries x {args.window + args.chunk} keys, "
             f"{args.heads} heads x {args.head_dim}, batch {args.batch}, bf16")
    paths = write_report(args.out, title, environment(device), rows,
                         ["backend", "phase", "ms_median", "speedup_vs_naive", "peak_gib"])
    print("wrote", *paths)
    return 0


PREFILL_COLUMNS = ["variant", "blocks", "sdpa", "tokens", "batch", "micro_batch", "s_per_1k_tokens",
                   "tokens_per_s", "mfu", "speedup_vs_full", "peak_gib", "error"]


def run_prefill(args: argparse.Namespace) -> int:
    from tttlm.bench import bench_prefill, environment, write_report

    device = _device(args.device)
    rows = bench_prefill(device, preset=args.preset, variants=tuple(args.variants),
                         lengths=tuple(args.lengths), batch=args.batch,
                         tokens_per_step=args.tokens_per_step, repeats=args.repeats,
                         compile_modes=tuple(m == "compiled" for m in args.compile))
    size = (f"batch {args.batch}" if args.batch is not None
            else f"{args.tokens_per_step} tokens per step")
    paths = write_report(args.out, f"Prefill, {args.preset}, {size}, bf16 autocast",
                         environment(device), rows, PREFILL_COLUMNS)
    print("wrote", *paths)
    return 0


TRAIN_COLUMNS = ["variant", "mode", "batch", "checkpoint_chunks", "s_median", "tokens_per_s",
                 "mfu", "ratio_vs_best_full", "peak_gib", "error"]


def run_train(args: argparse.Namespace) -> int:
    from tttlm.bench import bench_train_step, environment, write_report

    device = _device(args.device)
    rows = bench_train_step(device, preset=args.preset, seq_len=args.seq_len,
                            batches=tuple(args.batches), variants=tuple(args.variants),
                            checkpoint_chunks=args.checkpoint_chunks, repeats=args.repeats,
                            modes=tuple(args.modes))
    paths = write_report(args.out, f"Training step, {args.preset}, {args.seq_len} tokens",
                         environment(device), rows, TRAIN_COLUMNS)
    print("wrote", *paths)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    import torch

    from tttlm.bench import bench_decode, environment, write_report

    device = _device(args.device)
    try:
        rows = bench_decode(device, presets=args.presets, variants=args.variants,
                            contexts=args.contexts, modes=args.modes, steps=args.steps,
                            warmup=args.warmup, inner_reps=args.repeats,
                            dtype=getattr(torch, args.dtype))
    except ValueError as err:
        return user_error(str(err))
    paths = write_report(args.out, f"Decode latency per token, batch 1, {args.dtype}",
                         environment(device), rows,
                         ["preset", "variant", "mode", "context", "step_ms", "inner_step_ms",
                          "per_token_ms", "vs_shortest", "state_mib"])
    print("wrote", *paths)
    return 0
