"""The attention kernels reading key and value tiles through pointers against tensor
descriptors (``ops/triton_kv.py``) at 3b's shapes (CUDA only): the window forward over a
full-cache chunk (one and two sequences) and over whole sequences (1 × 128K, 16 × 8K), and
the cache-dq kernel over a full-cache chunk, each per tile configuration asked for. Each
descriptor run is checked against the pointer run of the first configuration (largest
difference). CUDA-event medians, with TFLOP/s of the pairs each kernel attends.

    python benchmarks/kv_descriptors.py --out OUT/kv_descriptors_3b \\
        --fwd-configs 128,64,4,3 128,64,4,2 --dq-configs 64,64,4,3 128,64,4,3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds, environment

H, D, WINDOW, CHUNK = 32, 80, 8192, 1024
# (name, sequences, queries, cached keys); no cache: a whole sequence
FWD_CASES = (("chunk_1", 1, CHUNK, WINDOW), ("chunk_2", 2, CHUNK, WINDOW),
             ("sequence_128k", 1, 131072, 0), ("sequence_8k_x16", 16, 8192, 0))
DQ_CASES = (("dq_1", 1), ("dq_2", 2))


def _pairs(c: int, P: int) -> int:
    """Query-key pairs a window attends for ``c`` queries after ``P`` cached keys."""
    return sum(min(WINDOW, P + i + 1) for i in range(c))


def _forward(kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, window: int | None, sequence: bool,
             desc: bool) -> torch.Tensor:
    return kernel(q, k, v, window, 1 / math.sqrt(D), sequence=sequence, descriptors=desc)[0]


def _dq(kernel: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, extra: torch.Tensor,
        desc: bool) -> torch.Tensor:
    return kernel(q, k, v, out, dout, lse, WINDOW, WINDOW, 1 / math.sqrt(D), dq_chunk=extra,
                  descriptors=desc)


def _sweep(case: str, variable: str, configs: list[str], flops: float, repeats: int,
           call: Callable[[bool], torch.Tensor]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    ref = None
    for config in configs:
        os.environ[variable] = config
        for desc in (False, True):
            row: dict[str, object] = {"case": case, "config": config, "descriptors": desc}
            try:
                out = call(desc).float()
                ref = out if ref is None else ref
                row["max_diff"] = (out - ref).abs().max().item()
                sec = cuda_event_seconds(lambda d=desc: call(d), repeats)
                row["ms"] = 1e3 * sec
                row["tflops"] = flops / sec / 1e12
            except Exception as err:  # noqa: BLE001 - a tile that cannot run is reported
                row["error"] = repr(err)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop(variable, None)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fwd-configs", nargs="+", default=["128,64,4,3"])
    ap.add_argument("--dq-configs", nargs="+", default=["64,64,4,3"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kv_descriptors.py: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    from tttlm.ops.triton_frozen_dq import frozen_dq
    from tttlm.ops.triton_window_fwd import window_forward

    rows: list[dict[str, object]] = []
    torch.manual_seed(0)
    for case, B, c, P in FWD_CASES:
        q = torch.randn(B, c, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, P + c, H, D, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        sequence = P == 0
        window = None if sequence and c <= WINDOW else WINDOW
        flops = 4 * B * H * D * _pairs(c, P)
        rows += _sweep(case, "TTTLM_WINDOW_SEQ" if sequence else "TTTLM_WINDOW_FWD",
                       args.fwd_configs, flops, args.repeats,
                       functools.partial(_forward, window_forward, q, k, v, window, sequence))
    for case, B in DQ_CASES:
        q, dout, extra = (torch.randn(B, CHUNK, H, D, device="cuda", dtype=torch.bfloat16)
                          for _ in range(3))
        k, v = (torch.randn(B, WINDOW + CHUNK, H, D, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        out, lse = window_forward(q, k, v, WINDOW, 1 / math.sqrt(D))
        # three products per cached pair (S, dP, dQ)
        flops = 6 * B * H * D * (_pairs(CHUNK, WINDOW) - CHUNK * (CHUNK + 1) // 2)
        rows += _sweep(case, "TTTLM_FROZEN_DQ", args.dq_configs, flops, args.repeats,
                       functools.partial(_dq, frozen_dq, q, k, v, out, dout, lse, extra))
    report = {"env": environment(torch.device("cuda")), "command": " ".join(sys.argv),
              "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
