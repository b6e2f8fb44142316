"""Meta forward + backward of a random-weight model: step time and peak memory.

Usage (GPU):  python benchmarks/meta_step.py --preset 125m --seq-len 8192 --batch 1 2 \
                  --out benchmarks/results/meta_step_125m_8k
Writes <out>.json and <out>.md naming the card, torch version and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.devices import autocast, resolve_device
from tttlm.ops.attention import attention_backend


def measure(model: TTTForCausalLM, batch: int, seq_len: int, ttt: bool, checkpoint: bool,
            repeats: int, device: torch.device) -> dict:
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, V, (batch, seq_len + 1), generator=g).to(device)
    times = []
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device):  # bf16 on a GPU
            out = model(x[:, :-1], labels=x[:, 1:], ttt=ttt, checkpoint_chunks=checkpoint)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"batch": batch, "seq_len": seq_len, "ttt": ttt, "checkpoint_chunks": checkpoint,
            "step_s_median": med, "step_s_all": times, "tokens_per_s": batch * seq_len / med,
            "peak_mem_gib": peak, "loss": float(out.loss.detach())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plain-head", action="store_true",
                        help="keep the logits for the backward (model.lean_head = False)")
    parser.add_argument("--attention", default="auto",
                        help="attention backend (auto, naive, banded, triton)")
    args = parser.parse_args()
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig.from_preset(args.preset)).to(device)
    model.lean_head = not args.plain_head
    rows = []
    for batch in args.batch:
        for ttt, ckpt in ((True, False), (True, True), (False, False)):
            try:
                with attention_backend(args.attention):
                    rows.append(measure(model, batch, args.seq_len, ttt, ckpt, args.repeats,
                                        device))
            except torch.OutOfMemoryError:
                rows.append({"batch": batch, "seq_len": args.seq_len, "ttt": ttt,
                             "checkpoint_chunks": ckpt, "error": "out of memory"})
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           platform.processor(), "torch": torch.__version__, "python": platform.python_version(),
           "command": "python " + " ".join(sys.argv), "dtype": "bf16 autocast, fp32 weights and "
           "fast weights", "params": model.num_parameters(), "preset": args.preset,
           "attention_backend": args.attention, "lean_head": model.lean_head}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"# Meta step, `{args.preset}` e2e, {args.seq_len} tokens", "",
             *(f"- {k}: {v}" for k, v in env.items()), "",
             "| batch | mode | activation ckpt | step (s, median) | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mode = "meta (TTT, exact 2nd order)" if r["ttt"] else "pretrain (no TTT)"
        if "error" in r:
            lines.append(f"| {r['batch']} | {mode} | {r['checkpoint_chunks']} | {r['error']} | | |")
            continue
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['batch']} | {mode} | {r['checkpoint_chunks']} | "
                     f"{r['step_s_median']:.3f} | {r['tokens_per_s']:,.0f} | {peak} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
