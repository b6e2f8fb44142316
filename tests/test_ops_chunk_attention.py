"""The Triton chunk attention against the naive reference (outputs, gradients, gradients of
gradients; the whole model's evaluation and outer gradient), and the whole model with the kernel
against the official fixture (tests/data/official-tiny: loss, per-token NLL, fast weights, every
parameter's outer gradient, with test_model_parity's tolerances).

Without a GPU the kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before Triton compiles anything), in float64, on small shapes; skipped when Triton is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers import assert_close, triton_or_skip

triton = triton_or_skip()

import triton.language as tl  # noqa: E402

from tttlm.ops.attention import (  # noqa: E402
    attention_backend,
    chunk_attention,
    naive_attention,
    window_mask,
)
from tttlm.ops.triton_chunk_attention import (  # noqa: E402
    _key_tiles,
    _query_tiles,
    triton_chunk_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp64 under the interpreter (exact up to summation order); fp32 on a GPU (no fp64 tile products
# there), where the kernel multiplies fp32 tiles with 3xTF32 (about fp32 accuracy).
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = 1e-10 if DTYPE is torch.float64 else 2e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp64: max-abs error at summation-order level; fp32 (GPU): relative L2 error, since
    second-order terms grow with the inputs' scale."""
    if DTYPE is torch.float64:
        assert_close(actual, expected, atol=100 * TOL, name=name)
    else:
        assert_close(actual, expected, rel_l2=1e-4, name=name)


def _inputs(B: int, c: int, past: int, H: int, d: int, start: int,
            seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE).to(DEVICE).requires_grad_(True)

    q, k, v = rand(B, c, H, d), rand(B, past + c, H, d), rand(B, past + c, H, d)
    q_pos = torch.arange(start, start + c, device=DEVICE)
    k_pos = torch.arange(start - past, start + c, device=DEVICE)
    return q, k, v, q_pos, k_pos


# (B, c, past, H, d, window, start): the cache full, partly before position 0 (masked keys),
# empty; no window; a head dim that is not a power of two; lengths that are not tile multiples.
CASES = {
    "B1-c20-past30-H2-d16-w24": (1, 20, 30, 2, 16, 24, 40),
    "B2-c16-past0-H1-d8-nowin": (2, 16, 0, 1, 8, None, 0),
    "B1-c21-past43-H2-d24-w40-cachebefore0": (1, 21, 43, 2, 24, 40, 20),
    "B1-c7-past17-H3-d5-w9": (1, 7, 17, 3, 5, 9, 17),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_naive_to_second_order(case: tuple) -> None:
    B, c, past, H, d, window, start = case
    q, k, v, q_pos, k_pos = _inputs(B, c, past, H, d, start)
    ref = naive_attention(q, k, v, window_mask(q_pos, k_pos, window))
    out = triton_chunk_attention(q, k, v, q_pos, k_pos, window)
    _close(out, ref, "output")

    do = torch.randn_like(out).requires_grad_(True)
    g_ref = torch.autograd.grad(ref, (q, k, v), do, create_graph=True)
    g_out = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
    for name, a, e in zip("qkv", g_out, g_ref):
        _close(a, e, f"d{name}")

    # Gradient of a random functional of (dQ, dK, dV) w.r.t. Q, K, V and the incoming dO.
    w = [torch.randn_like(g) for g in g_ref]
    h_ref = torch.autograd.grad(sum((g * x).sum() for g, x in zip(g_ref, w)), (q, k, v, do))
    h_out = torch.autograd.grad(sum((g * x).sum() for g, x in zip(g_out, w)), (q, k, v, do))
    for name, a, e in zip(("q", "k", "v", "dO"), h_out, h_ref):
        _close(a, e, f"second-order {name}")


def test_partial_cotangents() -> None:
    """Only dQ used downstream (the others' cotangents arrive as zeros) still matches."""
    q, k, v, q_pos, k_pos = _inputs(1, 9, 11, 2, 8, 11)
    grads = []
    for fn in (triton_chunk_attention,
               lambda *a: naive_attention(*a[:3], window_mask(a[3], a[4], a[5]))):
        out = fn(q, k, v, q_pos, k_pos, 12)
        dq = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)[0]
        grads.append(torch.autograd.grad(dq.sin().sum(), (q, k, v)))
    for name, a, e in zip("qkv", *grads):
        _close(a, e, name)


@pytest.mark.parametrize("B, c, past, H, d, window, start", [
    (2, 20, 30, 2, 16, 24, 40), (1, 7, 17, 3, 5, 9, 17), (1, 6, 6, 1, 8, None, 6)])
def test_frozen_keys_skip_only_their_gradient(B: int, c: int, past: int, H: int, d: int,
                                              window: int | None, start: int) -> None:
    """frozen_keys = past (a detached cache): same output and dQ, same dK, dV for the chunk's
    own keys, zeros for the cache's; a second derivative is refused."""
    q, k, v, q_pos, k_pos = _inputs(B, c, past, H, d, start)
    do = torch.randn(B, c, H, d, dtype=DTYPE, device=DEVICE)
    full = triton_chunk_attention(q, k, v, q_pos, k_pos, window)
    g_full = torch.autograd.grad(full, (q, k, v), do)
    part = triton_chunk_attention(q, k, v, q_pos, k_pos, window, frozen_keys=past)
    g_part = torch.autograd.grad(part, (q, k, v), do, create_graph=True)
    _close(part, full, "output")
    _close(g_part[0], g_full[0], "dq")
    for name, a, e in zip("kv", g_part[1:], g_full[1:]):
        _close(a[:, past:], e[:, past:], f"d{name} of the chunk's keys")
        assert not a[:, :past].any(), f"d{name} of frozen keys must be zero"
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g_part[0].sum(), q)
    with pytest.raises(ValueError, match="frozen_keys"):
        triton_chunk_attention(q, k, v, q_pos, k_pos, window, frozen_keys=past + c + 1)


def test_model_evaluation_with_kernel_matches_naive() -> None:
    """Evaluation (inner steps without outer gradient: detached caches, frozen keys in the
    kernel) gives the naive path's token losses and fast weights."""
    from _helpers import tiny_model, tokens

    model = tiny_model(dtype=DTYPE, window=8).to(DEVICE)
    x, y = (t.to(DEVICE) for t in tokens(model, batch=2, length=15))
    results = []
    for backend in ("triton", "naive"):
        with attention_backend(backend), torch.no_grad():
            out = model(x, y, ttt=True, return_fast_weights=True)
        results.append((out.token_nll, out.fast_weights[-1]))
    (nll, fast), (nll_ref, fast_ref) = results
    _close(nll, nll_ref, "token nll")
    for name in fast_ref:
        _close(fast[name], fast_ref[name], name)


@pytest.mark.skipif(DTYPE is not torch.float64, reason="gradcheck needs float64 (interpreter only)")
def test_gradcheck_and_gradgradcheck() -> None:
    q, k, v, q_pos, k_pos = _inputs(1, 5, 4, 1, 4, 4)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return triton_chunk_attention(q, k, v, q_pos, k_pos, 6)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def test_dispatch_override() -> None:
    q, k, v, q_pos, k_pos = _inputs(1, 8, 8, 1, 8, 8)
    with attention_backend("triton"):
        fast = chunk_attention(q, k, v, q_pos, k_pos, 10)
    with attention_backend("naive"):
        ref = chunk_attention(q, k, v, q_pos, k_pos, 10)
    assert "ChunkAttention" in type(fast.grad_fn).__name__
    assert "ChunkAttention" not in type(ref.grad_fn).__name__
    _close(fast, ref, "dispatch")


def test_model_meta_gradient_with_kernel_matches_naive() -> None:
    """The whole outer gradient (second order through every inner step and the KV caches)
    with the kernel equals the naive path's, over chunks that wrap the window."""
    from _helpers import grads, tiny_model, tokens

    # Window 8, chunk 4, 3 chunks (the last partial): the third chunk's window drops key 0.
    model = tiny_model(dtype=DTYPE, window=8).to(DEVICE)
    x, y = (t.to(DEVICE) for t in tokens(model, batch=2, length=11))
    results = []
    for backend in ("triton", "naive"):
        with attention_backend(backend):
            out = model(x, y, ttt=True)
            out.loss.backward()
        results.append((out.loss.detach(), grads(model)))
    (loss, g_fast), (loss_ref, g_ref) = results
    _close(loss, loss_ref, "meta loss")
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        assert_close(g_fast[name], g_ref[name], rel_l2=1e-8 if DTYPE is torch.float64 else 1e-4,
                     name=name)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tile products need a GPU")
def test_bf16_error_like_naive_bf16() -> None:
    """In bf16 the kernel's error (against an fp32 reference) is no worse than the naive
    path's own bf16 error, for outputs, gradients and second-order terms."""
    q, k, v, q_pos, k_pos = _inputs(2, 128, 384, 4, 64, 1000)
    do = torch.randn_like(q)
    w = [torch.randn_like(t) for t in (q, k, v)]

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        dox = do.to(dtype).requires_grad_(True)
        out = fn(*xs)
        g = torch.autograd.grad(out, xs, dox, create_graph=True)
        h = torch.autograd.grad(sum((a * b.to(dtype)).sum() for a, b in zip(g, w)), [*xs, dox])
        return [t.detach().float() for t in (out, *g, *h)]

    def naive(*x: torch.Tensor) -> torch.Tensor:
        return naive_attention(*x, window_mask(q_pos, k_pos, 256))

    def fast(*x: torch.Tensor) -> torch.Tensor:
        return triton_chunk_attention(*x, q_pos, k_pos, 256)

    ref = run(naive, torch.float32)
    names = ["out", "dq", "dk", "dv", "q2", "k2", "v2", "do2"]
    for name, a, b, e in zip(names, run(fast, torch.bfloat16), run(naive, torch.bfloat16), ref):
        err_naive = float((b - e).norm() / e.norm())
        # bf16 operands: 1e-3..1e-2 relative error is their rounding; allow 2x the naive path.
        assert_close(a, e, rel_l2=max(2 * err_naive, 1e-2), name=name)


@pytest.mark.slow
def test_model_with_kernel_matches_official_fixture(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """The official fixture's tiny model with the kernel in every TTT block (chunks of 32 over a
    cache of 64 keys that wraps) against the official JAX numbers, with test_model_parity's
    tolerances: evaluation (the kernel's frozen-key path and its first-order backward in the
    inner steps): loss, per-token NLL, per-chunk losses, fast weights after every chunk; meta
    training: loss and every parameter's outer gradient (the kernel's double backward)."""
    import numpy as np

    import tttlm.ops.triton_chunk_attention as kernel
    from test_model_parity import FAST_REL, FIXTURE, GRAD_REL, LOSS_ATOL, NLL_ATOL, batch
    from tttlm import TTTForCausalLM
    from tttlm.convert import convert_official, to_official

    calls = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs.get("frozen_keys", args[6] if len(args) > 6 else 0))
        return triton_chunk_attention(*args, **kwargs)

    # The dispatch imports the kernel function on each call, so this sees every use of it.
    monkeypatch.setattr(kernel, "triton_chunk_attention", counted)
    if DEVICE == "cpu":
        # Interpreter tiles of 32 (one per chunk of queries; keys still cut by the window
        # inside a tile) instead of 16: 30 s instead of 130 s. Tile edges are the tests above.
        monkeypatch.setattr(kernel, "_INTERPRETER_CONFIG",
                            kernel.KernelConfig(32, 32, num_warps=1, num_stages=1))
    with np.load(FIXTURE / "parity.npz") as data:
        ref = {k: data[k] for k in data.files}
    convert_official(FIXTURE / "parity.npz", tmp_path, window=64, chunk_size=32,
                     rope_theta=10000.0, bos_token_id=1)
    # fp64 under the interpreter: the error left is the official fp32 run's own, which the
    # fixture's tolerances (met by an exact fp32 re-implementation) cover; fp32 on a GPU.
    model = TTTForCausalLM.from_pretrained(tmp_path).to(DEVICE, DTYPE)
    inputs = {k: t.to(DEVICE) for k, t in batch(ref, official_mask=False).items()}
    config = model.config

    with attention_backend("triton"), torch.no_grad():
        out = model(**inputs, ttt=True, return_fast_weights=True)
    n_chunks = len(ref["meta/chunk_loss"])
    assert len(calls) == n_chunks * config.num_ttt_layers and any(calls), "kernel not used"
    assert_close(out.loss, ref["meta/loss"], atol=LOSS_ATOL, name="meta loss")
    assert_close(out.token_nll[0], ref["meta/token_nll"], atol=NLL_ATOL, name="token nll")
    assert_close(out.chunk_losses[0], ref["meta/chunk_loss"], atol=LOSS_ATOL, name="chunks")
    first = config.num_prefix_layers
    for c, fast in enumerate(out.fast_weights):
        for w in ("w1", "w2", "w3"):
            ours = torch.stack([fast[f"layers.{first + j}.prime.{w}.weight"][0].T
                                for j in range(config.num_ttt_layers)])
            assert_close(ours, ref[f"inner/prime_after_chunk/{w}"][c], rel_l2=FAST_REL,
                         name=f"chunk {c} {w}")

    calls.clear()
    with attention_backend("triton"):
        out = model(**inputs, ttt=True)
        out.loss.backward()
    # With the outer gradient every cache is part of the graph: no key is frozen.
    assert len(calls) == n_chunks * config.num_ttt_layers and not any(calls)
    assert_close(out.loss.detach(), ref["meta/loss"], atol=LOSS_ATOL, name="meta loss")
    grads = to_official({k: p.grad for k, p in model.named_parameters()}, config)
    expected = {k[len("grad/"):]: v for k, v in ref.items() if k.startswith("grad/")}
    assert set(grads) == set(expected)
    for name, g in grads.items():
        assert_close(g, expected[name], rel_l2=GRAD_REL, name=name)


# ------------------------------------------------------------------ skipping masked tiles
def _all_orders(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                k_pos: torch.Tensor, window: int | None,
                frozen: int = 0) -> list[torch.Tensor]:
    """Output, first and (unless frozen) second derivatives, for a bit-for-bit comparison."""
    out = triton_chunk_attention(q, k, v, q_pos, k_pos, window, frozen_keys=frozen)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                     dtype=out.dtype).to(out.device).requires_grad_(True)
    first = torch.autograd.grad(out, (q, k, v), do, create_graph=not frozen)
    if frozen:
        return [out, *first]
    w = [torch.randn(g.shape, generator=torch.Generator().manual_seed(8 + i),
                     dtype=g.dtype).to(g.device) for i, g in enumerate(first)]
    second = torch.autograd.grad(sum((g * x).sum() for g, x in zip(first, w)), (q, k, v, do))
    return [out, *first, *second]


# (B, c, past, H, d, window, start, permute keys, frozen keys): a full cache whose window
# leaves whole key tiles out of every query tile (interpreter tiles are 16 x 16); a short cache
# (the causal diagonal); keys before position 0; no window; keys in shuffled order.
SKIP_CASES = {
    "full-cache-w24": (1, 40, 64, 2, 8, 24, 200, False, 0),
    "short-cache-causal": (2, 48, 16, 1, 8, 100, 16, False, 0),
    "cache-before-0": (1, 33, 50, 2, 8, 40, 20, False, 0),
    "no-window": (1, 35, 20, 1, 8, None, 20, False, 0),
    "shuffled-keys-w20": (1, 40, 50, 1, 8, 20, 100, True, 0),
    "frozen-cache-w24": (2, 40, 64, 1, 8, 24, 200, False, 64),
}


@pytest.mark.parametrize("case", list(SKIP_CASES.values()), ids=list(SKIP_CASES))
def test_skipping_masked_tiles_changes_no_bit(case: tuple,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels skip key (query) tiles that the window and causal masks cover wholly;
    every output, gradient and second derivative is the same to the last bit as running
    every tile."""
    from tttlm.ops import triton_chunk_attention as kernel

    B, c, past, H, d, window, start, shuffle, frozen = case
    q, k, v, q_pos, k_pos = _inputs(B, c, past, H, d, start, seed=3)
    if shuffle:
        order = torch.randperm(past + c, generator=torch.Generator().manual_seed(5))
        k_pos = k_pos[order.to(k_pos.device)]
        k = k.detach()[:, order].requires_grad_(True)
        v = v.detach()[:, order].requires_grad_(True)
    results = {}
    for skip in (False, True):
        monkeypatch.setattr(kernel, "SKIP_MASKED_TILES", skip)
        results[skip] = _all_orders(q, k, v, q_pos, k_pos, window, frozen)
    for i, (a, e) in enumerate(zip(results[True], results[False])):
        assert torch.equal(a, e), f"result {i} differs when masked tiles are skipped"
    ref = naive_attention(q, k, v, window_mask(q_pos, k_pos, window))
    _close(results[True][0], ref, "output")


@triton.jit
def _ranges_kernel(QP, KP, OUT_K, OUT_Q, Tq, Tk, window, BM: tl.constexpr, BN: tl.constexpr):
    """Stores what _key_tiles / _query_tiles return for query (key) block ``program_id``."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    qp = tl.load(QP + rows, mask=rows < Tq, other=0)
    lo, hi = _key_tiles(KP, Tk, qp, rows < Tq, window, True, BN)
    tl.store(OUT_K + 2 * pid, lo)
    tl.store(OUT_K + 2 * pid + 1, hi)
    cols = pid * BN + tl.arange(0, BN)
    kp = tl.load(KP + cols, mask=cols < Tk, other=0)
    lo, hi = _query_tiles(QP, Tq, kp, cols < Tk, window, True, BM)
    tl.store(OUT_Q + 2 * pid, lo)
    tl.store(OUT_Q + 2 * pid + 1, hi)


def test_tile_ranges_cover_exactly_the_visible_tiles() -> None:
    """The ranges the kernels loop over: for consecutive positions (every caller's), exactly
    the tiles that hold a visible (query, key) pair; for shuffled keys, a superset."""
    def brute(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, BM: int, BN: int,
              over_keys: bool) -> list[tuple[int, int]]:
        seen = window_mask(q_pos, k_pos, window).cpu()  # [Tq, Tk], True where visible
        if over_keys:
            seen = seen.T
        out = []
        n_other, step = (BM, BN) if not over_keys else (BN, BM)
        for b in range(0, seen.shape[0], n_other):
            hit = [t for t in range(0, seen.shape[1], step)
                   if seen[b:b + n_other, t:t + step].any()]
            out.append((hit[0], hit[-1] + step) if hit else (seen.shape[1], 0))
        return out

    BM = BN = 16
    for c, past, window, start, shuffle in [(40, 64, 24, 200, False), (48, 16, 100, 16, False),
                                             (33, 50, 40, 20, False), (40, 50, 20, 100, True)]:
        q_pos = torch.arange(start, start + c)
        k_pos = torch.arange(start - past, start + c)
        if shuffle:
            k_pos = k_pos[torch.randperm(past + c, generator=torch.Generator().manual_seed(5))]
        n = max(triton.cdiv(c, BM), triton.cdiv(past + c, BN))
        out_k = torch.zeros(2 * n, dtype=torch.int32)
        out_q = torch.zeros(2 * n, dtype=torch.int32)
        q_dev, k_dev = q_pos.to(DEVICE), k_pos.to(DEVICE)
        out_k, out_q = out_k.to(DEVICE), out_q.to(DEVICE)
        _ranges_kernel[(n,)](q_dev, k_dev, out_k, out_q, c, past + c, window, BM=BM, BN=BN)
        got_k = [tuple(p) for p in out_k.view(-1, 2).tolist()][:triton.cdiv(c, BM)]
        got_q = [tuple(p) for p in out_q.view(-1, 2).tolist()][:triton.cdiv(past + c, BN)]
        want_k = brute(q_pos, k_pos, window, BM, BN, over_keys=False)
        want_q = brute(q_pos, k_pos, window, BM, BN, over_keys=True)
        if not shuffle:
            assert got_k == want_k and got_q == want_q
            assert any(hi - lo < past + c for lo, hi in got_k), "nothing skipped"
        else:
            for (lo, hi), (wlo, whi) in zip(got_k + got_q, want_k + want_q):
                assert wlo >= whi or (lo <= wlo and hi >= whi)
