"""The inner step's head products at 3b's shapes, as laid out now and transposed (CUDA).

An inner step forms ``logits = x Wᵀ`` (``x [N, 2560]``, ``W [128256, 2560]``, bf16) and
``dx = dz W`` (``dz [N, 128256]``). At one sequence ``N`` is a chunk, 1024 rows: the profile of
a 3b 128K step shows a matmul kernel with 320 × 128 tiles, 248 launches at 1.77 ms, which would
leave a fifth of its row tiles empty if it is the logits. This times each product as it is
called (``F.linear``, ``@``) and transposed (``W xᵀ``, ``Wᵀ dzᵀ``), with CUDA events, for
``N`` of one and two sequences, and prints TFLOP/s; the kernel names come from a profiler pass.

    python benchmarks/head_matmul.py --out results/head_matmul_3b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tttlm.bench.common import cuda_event_seconds, environment


def _kernels(fn) -> list[str]:  # noqa: ANN001  (a zero-argument callable)
    """The CUDA kernels one call of ``fn`` launches (names, in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _measure(N: int, D: int, V: int, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
    dz = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) / V ** 0.5
    flop = 2 * N * D * V
    paths = {
        "logits F.linear(x, W)": lambda: F.linear(x, W),
        "logits (W @ x.T).T": lambda: (W @ x.T).T,
        "dx dz @ W": lambda: dz @ W,
        "dx (W.T @ dz.T).T": lambda: (W.T @ dz.T).T,
    }
    row: dict[str, object] = {"rows": N, "dim": D, "vocab": V}
    err = max((F.linear(x, W).float() - (W @ x.T).T.float()).abs().max().item(),
              ((dz @ W).float() - (W.T @ dz.T).T.float()).abs().max().item())
    row["max_abs_diff_transposed"] = err
    for name, fn in paths.items():
        s = cuda_event_seconds(fn, repeats)
        row[f"{name} ms"] = 1e3 * s
        row[f"{name} TFLOP/s"] = flop / s / 1e12
        row[f"{name} kernels"] = _kernels(fn)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--dim", type=int, default=2560)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("head_matmul.py: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    rows = []
    for N in args.rows:
        rows.append(_measure(N, args.dim, args.vocab, args.repeats))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("kernels")}),
              flush=True)
    report = {"env": environment(torch.device("cuda")), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
