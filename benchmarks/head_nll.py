"""The inner step's work over a chunk's logits at 3b's vocabulary (CUDA only): the NLL and
``softmax − one-hot`` through the Triton kernel (``ops/triton_head_nll.py``) against
``nll_and_dlogits`` compiled by Inductor (what ran before) and eager, each checked against the
eager reference first (largest differences). CUDA-event medians, with the bandwidth the
kernel's minimum traffic implies (two reads of the logits and one write).

    python benchmarks/head_nll.py --rows 1024 4096 --out OUT/head_nll_3b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds, environment
from tttlm.ops.linear_nll import nll_and_dlogits
from tttlm.ops.triton_head_nll import nll_dlogits


def _measure(n: int, V: int, repeats: int) -> dict[str, float | int]:
    torch.manual_seed(0)
    z = (torch.randn(n, V, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (n,), device="cuda")
    compiled = torch.compile(nll_and_dlogits, dynamic=True)
    ref_nll, ref_dz = nll_and_dlogits(z, labels, torch.float32)
    row: dict[str, float | int] = {"rows": n, "vocab": V}
    paths = {"eager": lambda: nll_and_dlogits(z, labels, torch.float32),
             "compiled": lambda: compiled(z, labels, torch.float32),
             "triton": lambda: nll_dlogits(z, labels)}
    for name, fn in paths.items():
        nll, dz = fn()
        row[f"{name}_nll_err"] = (nll - ref_nll).abs().max().item()
        row[f"{name}_dz_err"] = (dz.float() - ref_dz.float()).abs().max().item()
        sec = cuda_event_seconds(fn, repeats)
        row[f"{name}_ms"] = 1e3 * sec
        row[f"{name}_gb_per_s_at_min_traffic"] = 3 * z.numel() * 2 / sec / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("head_nll.py: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    rows = [_measure(n, args.vocab, args.repeats) for n in args.rows]
    report = {"env": environment(torch.device("cuda")), "command": " ".join(sys.argv),
              "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
