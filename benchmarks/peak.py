"""Measured ceilings of the card: dense bf16 matmul rate and device-memory bandwidth.

    PYTHONPATH=src python benchmarks/peak.py --out benchmarks/results/peak_h100

MFU in the reports divides by the datasheet peak (989 TFLOP/s on H100 SXM); this measures what
a large cuBLAS product and a large device-to-device copy reach on the card at hand, the two
ceilings the misses in the reports are counted against. Medians of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds, environment, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peak"))
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = 1e3 * cuda_event_seconds(lambda a=a, b=b: a @ b, 20)
        rows.append({"what": f"bf16 matmul {n}^3", "ms_median": ms,
                     "tflops": 2 * n**3 / ms / 1e9})
        print(rows[-1], flush=True)
    src = torch.randn(2**30, device=device)  # 4 GiB of fp32
    dst = torch.empty_like(src)
    ms = 1e3 * cuda_event_seconds(lambda: dst.copy_(src), 20)
    rows.append({"what": "device copy 4 GiB (read + write)", "ms_median": ms,
                 "gb_per_s": 2 * src.numel() * 4 / ms / 1e6})
    print(rows[-1], flush=True)
    write_report(args.out, "Measured ceilings of the card", environment(device), rows,
                 ["what", "ms_median", "tflops", "gb_per_s"],
                 ["Random inputs (never zeros), medians of 20 CUDA-event timings after 3 "
                  "warm-ups. Copy bandwidth counts bytes read plus bytes written."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
