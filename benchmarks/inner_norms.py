"""The inner gradient's per-tensor norms at 3b's shapes, two ways, on one GPU (CUDA only).

A 3b e2e prefill chunk takes the norm of each of its 24 fast-weight gradients (8 TTT blocks ×
the prime MLP's three matrices of 2560 × 5632, bf16) before the clip: ``tensor_norms``
(:mod:`tttlm.ttt.inner`) runs one ATen reduction per tensor, 3048 launches and 49 ms of a
128K × 1 step on one H100 (``results/prefill_own_dkdv_3b_h100.md``, section 3), about half the
card's bandwidth. This times it against ``torch._foreach_norm`` over the same tensors (one
multi-tensor pass, what ``torch.nn.utils.clip_grad_norm_`` runs on CUDA), side by side in one
process, and reports the largest relative difference of the norms (the summation order
differs, so the bits may).

    python benchmarks/inner_norms.py --out results/inner_norms_3b
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds, environment
from tttlm.config import TTTConfig
from tttlm.files import atomic_write_text
from tttlm.ttt.inner import tensor_norms


def foreach_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """``[N, B]`` fp32 norms of each sequence's rows of each tensor, one multi-tensor pass."""
    rows = [row for g in grads for row in g.unbind(0)]
    return torch.stack(torch._foreach_norm(rows, 2, dtype=torch.float32)).view(
        len(grads), -1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="3b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("inner_norms: error: needs a CUDA device; run it on a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    config = TTTConfig.from_preset(args.preset)
    shape = (config.hidden_size, config.prime_intermediate_size)
    count = 3 * config.num_ttt_layers
    rows = []
    for batch in args.batch:
        gen = torch.Generator(device=device).manual_seed(0)
        grads = [torch.randn(batch, *shape, device=device, dtype=torch.bfloat16, generator=gen)
                 for _ in range(count)]
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        ref = tensor_norms(grads)
        diff = ((foreach_norms(grads) - ref).abs() / ref).max().item()
        for name, fn in (("tensor_norms", tensor_norms), ("foreach_norm", foreach_norms)) * 2:
            s = cuda_event_seconds(functools.partial(fn, grads), args.repeats)
            rows.append({"batch": batch, "tensors": count, "way": name, "us": s * 1e6,
                         "gb_per_s": nbytes / s / 1e9, "max_rel_diff": diff})
            print(f"batch {batch} {name:13s} {s * 1e6:8.1f} us  {nbytes / s / 1e9:7.0f} GB/s")
    report = {"title": f"Inner-gradient norms, {args.preset}: {count} tensors of "
                       f"{shape[0]} x {shape[1]} bf16 a sequence",
              "env": environment(device), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=1))
    lines = [f"# {report['title']}", "", "| batch | way | µs a chunk | GB/s | max rel diff |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['way']} | {r['us']:.1f} | {r['gb_per_s']:.0f} | "
              f"{r['max_rel_diff']:.2e} |" for r in rows]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
