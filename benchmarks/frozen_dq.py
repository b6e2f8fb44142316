"""A TTT chunk's first-order backward over a frozen cache at 3b's shapes, on one GPU (CUDA).

FlashAttention's window (what ``auto`` runs) computes dq, dk and dv for every key; the
``frozen-dq`` path (``tttlm.ops.attention.frozen``) runs FlashAttention's backward on the
chunk's own keys and a Triton kernel for the cache's share of dq only. For 32 heads of 80, a
window of 8192 and chunks of 1024 (a full cache of one and two sequences, half-full and
nearly empty caches of two), this times forward + backward of each with CUDA events, and
the Triton kernel alone for each tile configuration asked for (``--configs``; the first is
the module's default unless named). Each path is checked against the flash window first.
The Triton forward (``tttlm.ops.triton_window_fwd``, 80 = 64 + 16 unpadded) is timed alone
against FlashAttention's, and in forward + backward, for each of ``--fwd-configs``; then the
own keys' backward in Triton too (``tttlm.ops.triton_own_dkdv``, attention ``frozen-triton``):
its error against the flash window, forward + backward, and its dk/dv kernel alone for each of
``--own-configs``.

    python benchmarks/frozen_dq.py --out results/frozen_dq_3b
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
from tttlm.ops.attention import frozen
from tttlm.ops.attention.flash import flash_chunk_attention
from tttlm.ops.triton_frozen_dq import DEFAULT_CONFIG, frozen_dq
from tttlm.ops.triton_own_dkdv import DEFAULT_CONFIG as OWN_DEFAULT
from tttlm.ops.triton_own_dkdv import own_dkdv
from tttlm.ops.triton_window_fwd import DEFAULT_CONFIG as FWD_DEFAULT
from tttlm.ops.triton_window_fwd import window_forward

SHAPES = [(1, 8192), (2, 8192), (2, 4096), (2, 1024)]  # (sequences, cached keys)


def _bwd_flops(B: int, c: int, P: int, H: int, d: int, window: int) -> float:
    """FLOPs of FlashAttention's backward (five products per visible query-key pair)."""
    pairs = sum(min(P + i + 1, window) for i in range(c))
    return 5 * 2 * B * H * d * pairs


def _measure(B: int, P: int, c: int, H: int, d: int, W: int, repeats: int,
             configs: list[str], fwd_configs: list[str], own_configs: list[str]
             ) -> dict[str, float]:
    """One shape: the error against the flash window, then the timings."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, n, H, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for n in (c, P + c, P + c))
    g = torch.randn(B, c, H, d, device="cuda", dtype=torch.bfloat16)
    ref = flash_chunk_attention(q, k, v, W)
    want = torch.autograd.grad(ref, (q, k, v), g)
    got = torch.autograd.grad(frozen.frozen_chunk_attention(q, k, v, W), (q, k, v), g)
    err = max((a.float() - b.float()).abs().max().item() for a, b in (
        (got[0], want[0]), (got[1][:, P:], want[1][:, P:]), (got[2][:, P:], want[2][:, P:])))

    def step(fn):  # forward and backward, as the inner step runs them
        return lambda: torch.autograd.grad(fn(q, k, v, W), (q, k, v), g)

    row = {"batch": B, "cached": P, "chunk": c, "heads": H, "head_dim": d, "window": W,
           "max_abs_err_vs_flash": err,
           "flash_fwd_bwd_ms": 1e3 * cuda_event_seconds(step(flash_chunk_attention), repeats),
           "flash_fwd_ms": 1e3 * cuda_event_seconds(
               lambda: flash_chunk_attention(q, k, v, W), repeats),
           "bwd_tflop_if_flash": _bwd_flops(B, c, P, H, d, W) / 1e12}
    with torch.no_grad():
        o, lse, rng, unused = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, c, P + c, 0.0, True, False,
            window_size_left=W - 1, window_size_right=0)[:4]
    for config in configs:
        os.environ["TTTLM_FROZEN_DQ"] = config
        row[f"frozen_fwd_bwd_ms[{config}]"] = 1e3 * cuda_event_seconds(
            step(frozen.frozen_chunk_attention), repeats)
        row[f"kernel_ms[{config}]"] = 1e3 * cuda_event_seconds(
            lambda: frozen_dq(q, k, v, o, g, lse, P, W, 1 / math.sqrt(d)), repeats)
    os.environ.pop("TTTLM_FROZEN_DQ", None)

    def triton_path(q, k, v, W):  # noqa: ANN001, ANN202  (the step's signature)
        return frozen.frozen_chunk_attention(q, k, v, W, triton_forward=True)

    for config in fwd_configs:
        os.environ["TTTLM_WINDOW_FWD"] = config
        with torch.no_grad():
            o2, lse2 = window_forward(q, k, v, W, 1 / math.sqrt(d))
        row[f"fwd_err[{config}]"] = max((o2.float() - o.float()).abs().max().item(),
                                        (lse2 - lse).abs().max().item())
        row[f"fwd_ms[{config}]"] = 1e3 * cuda_event_seconds(
            lambda: window_forward(q, k, v, W, 1 / math.sqrt(d)), repeats)
        row[f"triton_fwd_bwd_ms[{config}]"] = 1e3 * cuda_event_seconds(
            step(triton_path), repeats)
    os.environ.pop("TTTLM_WINDOW_FWD", None)

    def all_triton(q, k, v, W):  # noqa: ANN001, ANN202  (the step's signature)
        return frozen.frozen_chunk_attention(q, k, v, W, triton_forward=True,
                                             triton_backward=True)

    got = torch.autograd.grad(all_triton(q, k, v, W), (q, k, v), g)
    row["all_triton_err_vs_flash"] = max((a.float() - b.float()).abs().max().item() for a, b in (
        (got[0], want[0]), (got[1][:, P:], want[1][:, P:]), (got[2][:, P:], want[2][:, P:])))
    row["all_triton_fwd_bwd_ms"] = 1e3 * cuda_event_seconds(step(all_triton), repeats)
    row["own_flash_bwd_ms"] = 1e3 * cuda_event_seconds(
        lambda: torch.ops.aten._flash_attention_backward(
            g, q, k[:, P:], v[:, P:], o, lse, None, None, c, c, 0.0, True, rng, unused,
            window_size_left=-1, window_size_right=0), repeats)
    for config in own_configs:
        os.environ["TTTLM_OWN_DKDV"] = config
        row[f"own_dkdv_ms[{config}]"] = 1e3 * cuda_event_seconds(
            lambda: own_dkdv(q, k[:, P:], v[:, P:], o, g, lse, 1 / math.sqrt(d)), repeats)
    os.environ.pop("TTTLM_OWN_DKDV", None)
    row["dq_own_kernel_ms"] = 1e3 * cuda_event_seconds(
        lambda: frozen_dq(q, k, v, o, g, lse, P, W, 1 / math.sqrt(d), own=True), repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--configs", nargs="*", default=[],
                    help="extra BM,BN,WARPS,STAGES tile configurations of the kernel")
    ap.add_argument("--fwd-configs", nargs="*", default=[],
                    help="extra tile configurations of the Triton forward")
    ap.add_argument("--own-configs", nargs="*", default=[],
                    help="extra BN,BM,WARPS,STAGES tile configurations of the own keys' dk/dv")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("frozen_dq.py: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    c, H, d, W = args.chunk, args.heads, args.head_dim, args.window
    configs = [",".join(map(str, DEFAULT_CONFIG))] + [x for x in args.configs
                                                       if x != ",".join(map(str, DEFAULT_CONFIG))]
    first = ",".join(map(str, FWD_DEFAULT))
    fwd_configs = [first] + [x for x in args.fwd_configs if x != first]
    own = ",".join(map(str, OWN_DEFAULT))
    own_configs = [own] + [x for x in args.own_configs if x != own]
    rows = []
    for B, P in SHAPES:
        rows.append(_measure(B, P, c, H, d, W, args.repeats, configs, fwd_configs,
                             own_configs))
        print(json.dumps(rows[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/frozen_dq.py " + " ".join(argv or sys.argv[1:]),
              "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
