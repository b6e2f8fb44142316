"""The prefix blocks' whole-sequence window attention at 3b's shapes, forward only (CUDA only).

A 3b e2e prefill runs its first 24 blocks over whole sequences, without gradient: at 128K
their sliding window (8192) goes through cuDNN pieces merged by log-sum-exp
(``ops/attention/pieces.py``, what ``auto`` runs: 692 ms of a 4.4 s step on an H100,
``benchmarks/results/frozen_dq_3b_h100.md`` section 5), and at 8K (no key leaves the window)
through SDPA's causal attention (cuDNN). This times, per shape, those paths against the Triton
window forward (``ops/triton_window_fwd.py``: the head width split 80 = 64 + 16 instead of
padded to 96) for each tile configuration, each checked against the path ``auto`` runs
first (largest difference of the outputs). CUDA-event medians.

    python benchmarks/window_sequence.py --out OUT/window_sequence_3b \\
        --fwd-configs 64,32,4,3 128,64,8,3 128,32,8,3 128,64,4,3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds
from tttlm.ops.attention import pieces, sdpa
from tttlm.ops.triton_window_fwd import DEFAULT_CONFIG, window_forward

# (sequences, length): what 8K x 16 (in TTT groups of 2: the prefix runs all 16), 32K x 4
# and 128K x 1 give the prefix blocks
SHAPES = ((16, 8192), (4, 32768), (1, 131072))


def _pairs(T: int, W: int) -> int:
    """Query-key pairs a causal window of ``W`` over ``T`` positions attends."""
    if W >= T:
        return T * (T + 1) // 2
    return W * (W + 1) // 2 + (T - W) * W


def _measure(B: int, T: int, H: int, d: int, W: int, repeats: int,
             configs: list[str]) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    if W >= T:
        name = "sdpa_causal"

        def current() -> torch.Tensor:
            return sdpa.causal_attention(q, k, v)
    else:
        name = "cudnn_pieces"

        def current() -> torch.Tensor:
            return pieces.window_attention_pieces(q, k, v, W, W)
    window = W if W < T else None
    flops = 4 * B * H * d * _pairs(T, W)
    with torch.no_grad():
        ref = current().float()
        row: dict[str, float | int | str] = {"batch": B, "tokens": T, "heads": H,
                                              "head_dim": d, "window": W, "current": name}
        sec = cuda_event_seconds(current, repeats)
        row[f"{name}_ms"] = 1e3 * sec
        row[f"{name}_tflops"] = flops / sec / 1e12
        scale = 1.0 / math.sqrt(d)
        for config in configs:
            os.environ["TTTLM_WINDOW_FWD"] = config
            try:
                got = window_forward(q, k, v, window, scale)[0]
                row[f"triton_err[{config}]"] = (got.float() - ref).abs().max().item()
                sec = cuda_event_seconds(lambda: window_forward(q, k, v, window, scale),
                                         repeats)
            except Exception as err:  # noqa: BLE001 - a tile that cannot run is reported
                row[f"triton_error[{config}]"] = repr(err)[:200]
                continue
            row[f"triton_ms[{config}]"] = 1e3 * sec
            row[f"triton_tflops[{config}]"] = flops / sec / 1e12
        os.environ.pop("TTTLM_WINDOW_FWD", None)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fwd-configs", nargs="*", default=[],
                    help="extra BM,BN,WARPS,STAGES tile configurations of the Triton forward")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("window_sequence.py: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    first = ",".join(map(str, DEFAULT_CONFIG))
    configs = [first] + [x for x in args.fwd_configs if x != first]
    rows = []
    for B, T in SHAPES:
        rows.append(_measure(B, T, args.heads, args.head_dim, args.window, args.repeats,
                             configs))
        print(json.dumps(rows[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/window_sequence.py "
                         + " ".join(argv or sys.argv[1:]),
              "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
