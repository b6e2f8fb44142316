"""Where one prefill or training step spends its GPU time: kernels grouped by kind.

    PYTHONPATH=src python benchmarks/profile_step.py prefill:3b:e2e:8192:16 train:125m:e2e:8192:1

Each case is ``what:preset:variant:tokens:batch[:compiled][:launched|:graphed]`` (``what`` is
``prefill`` or ``train``; ``compiled`` sets ``TTTForCausalLM.compile_blocks``; ``launched`` /
``graphed`` set ``graph_chunks`` off / on, default the model's: a prefill of one sequence with
32 chunks or more to replay takes the graph, whose kernels the profiler may not list one by
one). The case
runs twice (warm-up, compilation), then once under ``torch.profiler``; the report gives wall
time, the summed time of GPU kernels (wall minus that is time the GPU waited for the host), the
number of kernel launches, time per kernel group and the top kernels. ``--out FILE`` also writes
everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from tttlm.bench.common import environment
from tttlm.bench.names import GRAPH_CHUNKS
from tttlm.config import TTTConfig
from tttlm.model.model import TTTForCausalLM
from tttlm.ops.attention import attention_backend

# Kernel name patterns, first match wins. Inductor's kernels (triton_poi_/red_/per_fused_...)
# come before the eager groups: their names list the fused ops ("..._to_copy_add_mul..."),
# which the copy pattern would otherwise claim.
GROUPS = [
    ("chunk attention (Triton)", r"^_fwd_kernel|^_bwd_dq_kernel|^_bwd_dkdv_kernel|^_dbl_"),
    # (reports before these two groups counted their kernels as "other")
    ("frozen chunk attention (Triton)", r"^_window_fwd_kernel|^_frozen_dq_kernel|^_own_dkdv_"),
    ("inner update (Triton)", r"^_descend"),
    ("RoPE + cache operands (Triton)", r"^_rows_kernel|^_operands_kernel"),
    ("flash / cuDNN / flex attention", r"flash|fmha|cudnn|flex|triton_tem"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|sm90|sm80|cublas"),
    ("compiled, with a reduction", r"^triton_(red|per)_"),
    ("compiled, pointwise", r"^triton_poi_"),
    ("softmax / log-softmax", r"softmax"),
    ("reduction", r"reduce|Reduce"),
    ("copy / cast / cat", r"copy|Copy|cat|Cat|to_copy|fill"),
    ("elementwise", r"elementwise|vectorized|Elementwise|pointwise"),
    ("compiled, other", r"^triton_"),
]


def _group(name: str) -> str:
    return next((g for g, pattern in GROUPS if re.search(pattern, name)), "other")


def _device_time(event: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def _make_step(what: str, preset: str, variant: str, tokens: int, batch: int,
               device: torch.device, compiled: bool, graphs: bool | None = None) -> Any:
    config = TTTConfig.from_preset(preset, variant=variant)
    torch.manual_seed(0)
    with device:
        model = TTTForCausalLM(config)
    model.compile_blocks = compiled
    model.graph_chunks = graphs
    x = torch.randint(0, config.vocab_size, (batch, tokens + 1), device=device)
    ttt = variant == "e2e"
    if what == "prefill":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x[:, :-1], labels=x[:, 1:], ttt=ttt)
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1], labels=x[:, 1:], ttt=ttt)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step


def profile_case(case: str, device: torch.device, top: int) -> dict[str, Any]:
    what, preset, variant, tokens, batch, *flags = case.split(":")
    step = _make_step(what, preset, variant, int(tokens), int(batch), device,
                      compiled="compiled" in flags,
                      graphs=next((GRAPH_CHUNKS[f] for f in flags if f in GRAPH_CHUNKS), None))
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall_plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        kernels[event.key][0] += _device_time(event) / 1e6
        kernels[event.key][1] += event.count
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (sec, count) in kernels.items():
        groups[_group(name)][0] += sec
        groups[_group(name)][1] += count
    gpu = sum(sec for sec, _ in kernels.values())
    launches = int(sum(count for _, count in kernels.values()))
    result = {"case": case, "wall_s": wall_plain, "gpu_kernel_s": gpu, "launches": launches,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "groups": {g: {"s": s, "launches": int(c)} for g, (s, c) in
                         sorted(groups.items(), key=lambda kv: -kv[1][0])},
              "top": [{"kernel": k[:140], "s": s, "launches": int(c)} for k, (s, c) in
                      sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]}
    print(f"\n=== {case}: wall {wall_plain * 1e3:.1f} ms, GPU kernels {gpu * 1e3:.1f} ms "
          f"({gpu / wall_plain:.0%} busy), {launches} launches, "
          f"peak {result['peak_gib']:.1f} GiB", flush=True)
    for g, v in result["groups"].items():
        print(f"  {g:34s} {v['s'] * 1e3:9.2f} ms {v['launches']:7d} launches")
    for k in result["top"]:
        print(f"    {k['s'] * 1e3:8.2f} ms {k['launches']:6d}  {k['kernel'][:100]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+",
                        help="what:preset:variant:tokens:batch[:compiled][:launched|:graphed]")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--attention", default="auto",
                        help="attention backend (tttlm.ops.attention names, e.g. first-order)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict[str, Any] = {"env": environment(device), "cases": []}
    for case in args.cases:
        try:
            with attention_backend(args.attention):
                report["cases"].append(profile_case(case, device, args.top))
        except Exception as err:  # keep the other cases
            print(f"{case}: {err!r}"[:2000], flush=True)
            report["cases"].append({"case": case, "error": repr(err)[:2000]})
        # the card's clocks and power as the case left them (at the start they are idle's)
        report["cases"][-1]["gpu_state_after"] = environment(device)["gpu_state"]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
