"""Training-step throughput and peak memory: TTT-E2E (meta, exact second order) vs baselines.

One step is exactly what ``tttlm train`` runs per optimizer step (``forward_backward`` with
bf16 autocast on CUDA, global-norm clip, AdamW), on random tokens with random weights, as the
official-code numbers in METHOD.md §6. Reports the median over ``--steps`` timed steps after
``--warmup`` untimed ones, and ``torch.cuda.max_memory_allocated`` per mode.

    python benchmarks/train_step.py --preset 125m --seq-len 8192 --batch 1 \\
        --modes e2e full --out benchmarks/results/train_125m_8k.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from tttlm.config import TTTConfig
from tttlm.data import Batch
from tttlm.model.model import TTTForCausalLM
from tttlm.train.trainer import forward_backward


def bench_mode(preset: str, mode: str, seq_len: int, batch: int, steps: int, warmup: int,
               device: torch.device, checkpointing: bool) -> dict[str, Any]:
    variant = "e2e" if mode.startswith("e2e") else mode
    ttt = mode == "e2e"
    config = TTTConfig.from_preset(preset, variant)
    torch.manual_seed(0)
    model = TTTForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g)
    data = Batch(rows[:, :-1], rows[:, 1:], torch.ones(batch, seq_len, dtype=torch.bool))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        result = forward_backward(model, [data], ttt=ttt, inner_lr=1.0,
                                  checkpoint_chunks=checkpointing, autocast=autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(result.loss)
    median = statistics.median(times)
    out = {
        "mode": mode, "variant": variant, "ttt": ttt, "params": model.num_parameters(),
        "seq_len": seq_len, "batch": batch, "activation_checkpointing": checkpointing,
        "step_times_s": times, "median_step_s": median,
        "tokens_per_s": batch * seq_len / median, "losses": losses,
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["e2e", "full"],
                   help="e2e (meta), e2e-no-ttt, swa, full")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of the TTT chunks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for mode in args.modes:
        r = bench_mode(args.preset, mode, args.seq_len, args.batch, args.steps, args.warmup,
                       device, args.checkpointing)
        print(json.dumps({k: v for k, v in r.items() if k not in ("step_times_s", "losses")}),
              flush=True)
        results.append(r)
    report = {
        "benchmark": "train_step",
        "command": shlex.join(["python", "benchmarks/train_step.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
