"""Sliding-window attention kernels at 3b's shapes, side by side on one GPU (CUDA only).

Compares, for what a 3b e2e prefill runs (32 heads of 80, window 8192, chunks of 1024):

* prefix blocks past the window (forward only, one sequence of 128K): ``flex_attention`` with
  a block mask (what ``auto`` runs) against FlashAttention's own sliding window
  (``aten._flash_attention_forward`` with ``window_size_left``: one launch, no mask);
* a TTT chunk over a full cache (forward and first-order backward): ``flex_attention``
  against the FlashAttention window;
* a TTT chunk over a cache that fits the window: SDPA's lower-right causal bias against the
  FlashAttention window (bottom-right aligned, the same kernel family);
* full causal attention at 8K (cuDNN and flash through SDPA) for scale.

Each fast path is first checked against the fp32 naive reference on a small problem (outputs
and gradients); then each is timed with CUDA events (median of ``--repeats`` after warm-up).

    python benchmarks/attention_window.py --out results/attention_window_3b
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tttlm.bench.common import cuda_event_seconds
from tttlm.ops.attention import flex, naive, pieces, sdpa


def flash_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int) -> torch.Tensor:
    """``q [B, c, H, d]`` over ``k, v [B, n, H, d]``, causal aligned bottom-right, each query
    seeing its last ``window`` keys (itself included): FlashAttention's local attention."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
        window_size_left=window - 1, window_size_right=0)[0]
    return out


def rand(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def check(name: str, fast: Callable[..., torch.Tensor], B: int, c: int, n: int, H: int,
          d: int, window: int, backward: bool) -> dict[str, float]:
    """Max abs error of ``fast`` (bf16) against naive in fp32, output and (with
    ``backward``) the gradients of q, k, v."""
    torch.manual_seed(0)
    q, k, v = rand(B, c, H, d, grad=True), rand(B, n, H, d, grad=True), rand(B, n, H, d, grad=True)
    q_pos = torch.arange(n - c, n, device="cuda")
    k_pos = torch.arange(n, device="cuda")
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = naive.naive_chunk_attention(qf, kf, vf, q_pos, k_pos, window)
    out = fast(q, k, v, window)
    errs = {"out": (out.float() - ref).abs().max().item(), "ref_scale": ref.abs().max().item()}
    if backward:
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g.to(out.dtype))
        for nm, a, b in (("dq", q, qf), ("dk", k, kf), ("dv", v, vf)):
            errs[nm] = (a.grad.float() - b.grad).abs().max().item()
    print(f"check {name} B={B} c={c} n={n} window={window}: {errs}", flush=True)
    return errs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_window.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    H, d, W, c = args.heads, args.head_dim, args.window, args.chunk
    report: dict[str, object] = {"device": torch.cuda.get_device_name(),
                                 "torch": torch.__version__, "heads": H, "head_dim": d,
                                 "window": W, "chunk": c, "checks": {}, "times_s": {}}
    checks: dict[str, object] = report["checks"]  # type: ignore[assignment]
    times: dict[str, float] = report["times_s"]  # type: ignore[assignment]

    def chunk_flex(q, k, v, window):  # noqa: ANN001, ANN202
        return flex.flex_chunk_attention(q, k, v, window)

    def lower_right(q, k, v, window):  # noqa: ANN001, ANN202
        return sdpa.suffix_causal_attention(q, k, v)

    def cudnn_pieces(q, k, v, window):  # noqa: ANN001, ANN202
        return pieces.chunk_attention_pieces(q, k, v, window)

    def flash_pieces(q, k, v, window):  # noqa: ANN001, ANN202
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return pieces.chunk_attention_pieces(q, k, v, window)

    # Correctness on small problems: a full cache (n = window + c) and one that fits.
    sw, sc = 1024, 256
    for name, fn in (("flash_window", flash_window), ("flex_chunk", chunk_flex),
                     ("cudnn_pieces", cudnn_pieces), ("flash_pieces", flash_pieces)):
        try:
            checks[f"{name}_full"] = check(name, fn, 2, sc, sw + sc, H, d, sw, True)
        except Exception as e:  # noqa: BLE001 - a path that cannot run is reported, not fatal
            checks[f"{name}_full"] = repr(e)[:300]
            print(f"check {name}: {e!r}"[:400], flush=True)
    for name, fn in (("flash_window", flash_window), ("lower_right", lower_right),
                     ("cudnn_pieces", cudnn_pieces)):
        try:
            checks[f"{name}_fits"] = check(name, fn, 2, sc, 3 * sc, H, d, sw, True)
        except Exception as e:  # noqa: BLE001
            checks[f"{name}_fits"] = repr(e)[:300]
            print(f"check {name}: {e!r}"[:400], flush=True)
    # The prefix's whole-sequence window against flex at a smaller length.
    try:
        torch.manual_seed(0)
        T = 4 * sw
        q, k, v = rand(1, T, H, d), rand(1, T, H, d), rand(1, T, H, d)
        ref = naive.naive_sequence_attention(q.float(), k.float(), v.float(), sw)
        for name, out in (("flash_window_seq", flash_window(q, k, v, sw)),
                          ("flex_seq", flex.flex_window_attention(q, k, v, sw))):
            checks[name] = (out.float() - ref).abs().max().item()
            print(f"check {name}: {checks[name]}", flush=True)
    except Exception as e:  # noqa: BLE001
        checks["seq"] = repr(e)[:300]
        print(f"check seq: {e!r}"[:400], flush=True)

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            times[name] = cuda_event_seconds(fn, args.repeats)
            print(f"{name}: {times[name] * 1e3:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            times[name] = float("nan")
            print(f"{name}: {e!r}"[:400], flush=True)

    with torch.no_grad():
        T = 131072
        q, k, v = rand(1, T, H, d), rand(1, T, H, d), rand(1, T, H, d)
        run("prefix_128k_flex", lambda: flex.flex_window_attention(q, k, v, W))
        run("prefix_128k_flash_window", lambda: flash_window(q, k, v, W))
        q, k, v = rand(4, 8192, H, d), rand(4, 8192, H, d), rand(4, 8192, H, d)  # noqa: F841
        for backend in ("cudnn", "flash"):
            kind = getattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION" if backend == "cudnn"
                           else "FLASH_ATTENTION")
            with torch.nn.attention.sdpa_kernel(kind):
                run(f"causal_8k_x4_{backend}", lambda: sdpa.causal_attention(q, k, v))

    def fwd_bwd(fn: Callable[..., torch.Tensor], B: int, n: int) -> Callable[[], object]:
        q = rand(B, c, H, d, grad=True)
        k, v = rand(B, n, H, d, grad=True), rand(B, n, H, d, grad=True)
        g = rand(B, c, H, d)

        def step() -> object:
            out = fn(q, k, v, W)
            return torch.autograd.grad(out, (q, k, v), g)
        return step

    def fwd(fn: Callable[..., torch.Tensor], B: int, n: int) -> Callable[[], object]:
        q, k, v = rand(B, c, H, d), rand(B, n, H, d), rand(B, n, H, d)
        return lambda: fn(q, k, v, W)

    for B in (1, 2):
        n = W + c
        run(f"chunk_full_b{B}_fwd_flex", fwd(chunk_flex, B, n))
        run(f"chunk_full_b{B}_fwd_flash_window", fwd(flash_window, B, n))
        run(f"chunk_full_b{B}_fwdbwd_flex", fwd_bwd(chunk_flex, B, n))
        run(f"chunk_full_b{B}_fwdbwd_flash_window", fwd_bwd(flash_window, B, n))
        run(f"chunk_full_b{B}_fwd_cudnn_pieces", fwd(cudnn_pieces, B, n))
        run(f"chunk_full_b{B}_fwdbwd_cudnn_pieces", fwd_bwd(cudnn_pieces, B, n))
        run(f"chunk_full_b{B}_fwdbwd_flash_pieces", fwd_bwd(flash_pieces, B, n))
        n = W // 2 + c
        run(f"chunk_half_b{B}_fwdbwd_lower_right", fwd_bwd(lower_right, B, n))
        run(f"chunk_half_b{B}_fwdbwd_flash_window", fwd_bwd(flash_window, B, n))
        run(f"chunk_half_b{B}_fwdbwd_cudnn_pieces", fwd_bwd(cudnn_pieces, B, n))
    # Whether cuDNN aligns a causal mask with fewer queries than keys at the bottom right
    # (then cache and chunk could be one piece); reported, not used.
    try:
        torch.manual_seed(1)
        q, k, v = rand(1, 64, H, d), rand(1, 192, H, d), rand(1, 192, H, d)
        got = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False, 0.0, True,
            False)[0].transpose(1, 2).float()
        pos = torch.arange(192, device="cuda")
        for align, q_pos in (("bottom_right", pos[-64:]), ("top_left", pos[:64])):
            ref = naive.naive_chunk_attention(q.float(), k.float(), v.float(), q_pos, pos, None)
            checks[f"cudnn_causal_{align}"] = (got - ref).abs().max().item()
        print("cudnn causal alignment:", {a: checks[f"cudnn_causal_{a}"]
                                          for a in ("bottom_right", "top_left")}, flush=True)
    except Exception as e:  # noqa: BLE001
        checks["cudnn_causal"] = repr(e)[:300]
        print(f"cudnn causal: {e!r}"[:400], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
